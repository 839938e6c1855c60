"""Layer sharing on tiny models: the clustering is optimal, alike layers share a cluster, a shared emulator holds
each kept layer once, runs it in every position of its cluster, keeps a correct KV cache and round-trips."""

import itertools
import random

import pytest
import torch
from safetensors import safe_open

from coordinator.compression import EmulatorSpec, make_emulator
from coordinator.compression.share import cluster_adjacent, select_shared
from coordinator.emulator import Split, emulator_record
from edge_runtime.low_rank import load_causal_lm
from tests.coordinator.compression.test_recipes import calibration, logits, tiny

SPLIT = Split(1, 1, keep=3)  # 8 layers: a middle of 6 cut into 3 clusters


def cost(similarity: list[list[float]], clusters: list[tuple[int, int, int]]) -> float:
    return sum(1 - similarity[j][medoid] for first, last, medoid in clusters for j in range(first, last + 1))


@pytest.mark.parametrize("seed", range(5))
def test_clustering_is_the_cheapest_cut_into_adjacent_runs(seed):
    rng = random.Random(seed)
    size, keep = 7, 3
    similarity = [[1.0 if i == j else rng.random() for j in range(size)] for i in range(size)]
    clusters = cluster_adjacent(similarity, keep)
    assert [c[0] for c in clusters] == [0, *(c[1] + 1 for c in clusters[:-1])] and clusters[-1][1] == size - 1
    assert all(first <= medoid <= last for first, last, medoid in clusters)
    best = float("inf")
    for cuts in itertools.combinations(range(1, size), keep - 1):  # brute force over every cut and medoid
        bounds = [0, *cuts, size]
        runs = [range(a, b) for a, b in itertools.pairwise(bounds)]
        best = min(best, sum(min(sum(1 - similarity[j][m] for j in run) for m in run) for run in runs))
    assert cost(similarity, clusters) == pytest.approx(best)


def test_copies_of_one_layer_fall_into_one_cluster():
    model, data = tiny(), calibration()
    layers = model.model.layers
    with torch.no_grad():
        for index in (3, 4, 5):  # layers 2..5 (middle offsets 1..4) become the same layer
            layers[index].load_state_dict(layers[2].state_dict())
    clusters, details = select_shared(model, SPLIT, data)
    assert (1, 4) in {(first, last) for first, last, _ in clusters}, clusters
    assert min(details["adjacent_cka"][1:4]) > max(details["adjacent_cka"][0], details["adjacent_cka"][4])


def test_a_shared_emulator_holds_each_kept_layer_once_and_runs_it_for_its_cluster(tmp_path):
    model, data = tiny(), calibration()
    emulator = make_emulator(model, SPLIT, EmulatorSpec.parse("share"), calibration=data)
    record = emulator_record(emulator)
    clusters = record.details["clusters"]
    assert len(clusters) == 3 and len(record.layer_map) == 8
    layers = emulator.model.layers
    for first, last, medoid in clusters:
        for offset in range(first, last + 1):
            assert record.layer_map[1 + offset] == 1 + medoid
            assert layers[1 + offset].mlp.up_proj.weight is layers[1 + medoid].mlp.up_proj.weight
    one_layer = sum(p.numel() for p in model.model.layers[1].parameters())
    assert record.details["footprint"]["middle_parameters"] == 3 * one_layer
    assert sum(p.numel() for p in emulator.parameters()) == sum(p.numel() for p in model.parameters()) - 3 * one_layer
    ids = data.blocks[:2]
    with torch.no_grad():  # each position keeps its own KV cache slot, so caching changes nothing
        cached = emulator(input_ids=ids, use_cache=True).logits
    assert torch.allclose(cached, logits(emulator, ids), atol=1e-5)
    dropped = make_emulator(model, SPLIT, EmulatorSpec.parse("share:mode=drop"), calibration=data)
    assert emulator_record(dropped).layer_map == [0, *(1 + medoid for _, _, medoid in clusters), 7]
    assert not torch.allclose(logits(dropped, ids), logits(emulator, ids))

    emulator.save_pretrained(tmp_path / "emulator")
    with safe_open(str(tmp_path / "emulator" / "model.safetensors"), "pt") as saved:
        assert len(list(saved.keys())) == len(dropped.state_dict())  # each shared tensor written once
    reloaded = load_causal_lm(tmp_path / "emulator")
    assert torch.equal(logits(reloaded, ids), logits(emulator, ids))
    assert reloaded.model.layers[2].mlp.up_proj.weight is reloaded.model.layers[1 + clusters[0][2]].mlp.up_proj.weight
