"""Layer sharing (CRaSh): cluster adjacent middle layers by how alike they act, keep one layer per cluster.

Training-free. What each middle layer adds to the residual stream on the calibration tokens (its output minus
its input) is compared with every other layer's by linear CKA; the middle is cut into `keep` runs of adjacent
layers most alike within (dynamic programming), and each run keeps its medoid, the layer most like the rest.
Mode `share` runs the medoid in every position of its run (weights held once, compute as the full middle);
mode `drop` runs it once (a plain layer drop whose choice of layers follows the clusters).

CRaSh compares the layers' outputs. On a model with massive activations that says nothing: SmolLM2's residual
stream is dominated from layer 11 on by a few huge channels, and the outputs of layers 11..27 all have CKA 1.000
with each other. The layers' updates are what running one layer in place of another has to reproduce.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from transformers import PreTrainedModel

from coordinator.architectures import decoder_layers, spec_for
from coordinator.compression.calibration import Calibration
from coordinator.emulator import Split, build_emulator, emulator_record, set_emulator_record
from edge_runtime.shared_layers import share_layers

MODES = ("share", "drop")


@torch.inference_mode()
def middle_updates(model: PreTrainedModel, split: Split, calibration: Calibration) -> list[torch.Tensor]:
    """What each middle layer adds to the hidden states on the calibration's measure blocks, as [tokens, hidden]."""
    layers = decoder_layers(model)
    middle = range(split.bottom, len(layers) - split.top)
    captured: dict[int, list[torch.Tensor]] = {index: [] for index in middle}

    def recorder(index: int):
        def record(_module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            before = args[0] if args else kwargs["hidden_states"]
            after = output[0] if isinstance(output, tuple) else output
            captured[index].append((after - before).reshape(-1, after.shape[-1]).double())

        return record

    handles = [layers[index].register_forward_hook(recorder(index), with_kwargs=True) for index in middle]
    try:
        for ids in calibration.measure_batches():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(captured[index]) for index in middle]


def linear_cka(first: torch.Tensor, second: torch.Tensor) -> float:
    """Linear centered kernel alignment of two [tokens, features] representations: 1 for the same one up to
    rotation and scale, near 0 for unrelated ones.

    >>> x = torch.randn(50, 4, dtype=torch.float64)
    >>> round(linear_cka(x, 3 * x), 6)
    1.0
    """
    a, b = first - first.mean(0), second - second.mean(0)
    cross = (b.T @ a).pow(2).sum()
    return float(cross / ((a.T @ a).norm() * (b.T @ b).norm()))


def cluster_adjacent(similarity: list[list[float]], keep: int) -> list[tuple[int, int, int]]:
    """Cut offsets 0..n-1 into `keep` runs of adjacent offsets, each with a medoid, minimizing the summed
    dissimilarity (1 − similarity) of every offset to its run's medoid. Returns (first, last, medoid) per run.

    >>> cluster_adjacent([[1, .9, .1], [.9, 1, .1], [.1, .1, 1]], 2)
    [(0, 1, 0), (2, 2, 2)]
    """
    size = len(similarity)

    def run_cost(first: int, last: int) -> tuple[float, int]:
        members = range(first, last + 1)
        return min((sum(1 - similarity[j][medoid] for j in members), medoid) for medoid in members)

    best: dict[tuple[int, int], tuple[float, list[tuple[int, int, int]]]] = {(0, -1): (0.0, [])}
    for runs in range(1, keep + 1):
        for last in range(runs - 1, size):
            options = []
            for first in range(runs - 1, last + 1):
                if (runs - 1, first - 1) in best:
                    cost, medoid = run_cost(first, last)
                    before_cost, before = best[(runs - 1, first - 1)]
                    options.append((before_cost + cost, [*before, (first, last, medoid)]))
            if options:
                best[(runs, last)] = min(options, key=lambda option: option[0])
    return best[(keep, size - 1)][1]


def select_shared(model: PreTrainedModel, split: Split, calibration: Calibration) -> tuple[list[tuple], dict]:
    """The clusters of the middle (offsets) and what was measured: the CKA of each layer's update with the next's."""
    updates = middle_updates(model, split, calibration)
    similarity = [[linear_cka(a, b) if i != j else 1.0 for j, b in enumerate(updates)] for i, a in enumerate(updates)]
    clusters = cluster_adjacent(similarity, split.keep)
    adjacent = [round(similarity[i][i + 1], 4) for i in range(len(updates) - 1)]
    return clusters, {"clusters": [list(cluster) for cluster in clusters], "adjacent_cka": adjacent}


def build_shared(
    model: PreTrainedModel, split: Split, calibration: Calibration, mode: str
) -> tuple[PreTrainedModel, dict]:
    """The emulator of `mode` ('share' or 'drop') over the CKA clusters of the middle, and the clusters."""
    clusters, details = select_shared(model, split, calibration)
    medoids = [medoid for _, _, medoid in clusters]
    if mode == "drop":
        return build_emulator(model, split, medoids, "share"), details
    middle = split.middle_size(model.config.num_hidden_layers)
    emulator = build_emulator(model, replace(split, keep=middle), list(range(middle)), "share")
    ties = {
        str(split.bottom + offset): split.bottom + medoid
        for first, last, medoid in clusters
        for offset in range(first, last + 1)
        if offset != medoid
    }
    share_layers(emulator, spec_for(model.config.model_type).layers, ties)
    record = emulator_record(emulator)
    sources = [record.layer_map[ties.get(str(position), position)] for position in range(len(record.layer_map))]
    set_emulator_record(emulator.config, replace(record, layer_map=sources))
    return emulator, details
