"""Emulator recipes on tiny models: null settings are exact, compression meets its targets, sensitivity finds
a broken layer, distillation pulls the emulator toward the full middle, specs reject bad input."""

import random

import pytest
import torch

from coordinator.architectures import decoder_layers
from coordinator.compression import Calibration, EmulatorSpec, greedy, make_emulator, recipes
from coordinator.compression.calibration import divergence, linear_modules, log_probs
from coordinator.compression.distill import CURVE_POINTS, DistillConfig, distill
from coordinator.compression.importance import removal_importance
from coordinator.compression.luc import BIT_WIDTHS, SPARSITIES, LayerCost, allocate, measure_costs
from coordinator.emulator import Split, build_emulator, emulator_record
from coordinator.errors import ConfigError
from edge_runtime.low_rank import LowRankLinear, load_causal_lm
from tests.conftest import WORDS, make_model, make_tokenizer

SPLIT = Split(1, 1, keep=6)  # an 8-layer model: every middle layer kept unless a recipe says otherwise


def calibration(blocks: int = 24) -> Calibration:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(32)) for _ in range(blocks)]
    return Calibration(make_tokenizer(), texts, "toy words", length=32, measure_blocks=8)


def tiny(family: str = "llama") -> torch.nn.Module:
    return make_model(family, num_layers=8, vocab_size=len(make_tokenizer()))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


NULL_SPECS = ("uniform", "importance", "greedy", "share", "share:mode=drop", "luc:size=1.0", "lowrank:energy=1.0")


@pytest.mark.parametrize("text", [*NULL_SPECS, "uniform:harmonize=4"])
def test_null_settings_reproduce_the_full_logits(family, text):
    model, data = tiny(family), calibration()
    emulator = make_emulator(model, SPLIT, EmulatorSpec.parse(text, keep=6), calibration=data)
    ids = data.blocks[:2]
    assert torch.allclose(logits(emulator, ids), logits(model, ids), atol=1e-5, rtol=0)
    assert emulator_record(emulator).details["footprint"]["middle_fraction"] == 1.0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_layerwise_compression_meets_its_size_with_the_bits_and_sparsity_it_records(family):
    model, data = tiny(family), calibration()
    emulator = make_emulator(model, SPLIT, EmulatorSpec.parse("luc:size=0.3", keep=6), calibration=data)
    details = emulator_record(emulator).details
    assert 0.2 < details["size_fraction"] <= 0.3
    assert details["footprint"]["middle_fraction"] == details["size_fraction"]
    chosen = details["layers"]
    assert any(layer["bits"] < 32 for layer in chosen) and len(chosen) == 6
    for layer, choice in zip(list(decoder_layers(emulator))[1:-1], chosen, strict=True):
        for name, parameter in layer.named_parameters():
            if parameter.dim() != 2:
                continue
            matrix = parameter if family != "gpt2" else parameter.t()  # rows are output channels
            assert (matrix == 0).float().mean() >= choice["sparsity"] - 1e-6, name
            if choice["bits"] < 32:
                levels = max(len(torch.unique(row[row != 0])) for row in matrix)
                assert levels <= 2 ** choice["bits"] - 2, name  # symmetric levels, zero excluded


def test_low_rank_factorizes_to_its_size_and_round_trips_through_a_folder(tmp_path):
    model, data = tiny(), calibration()
    emulator = make_emulator(model, SPLIT, EmulatorSpec.parse("lowrank:size=0.5", keep=6), calibration=data)
    details = emulator_record(emulator).details
    factored = [m for m in emulator.modules() if isinstance(m, LowRankLinear)]
    assert len(factored) == len(details["ranks"]) == 6 * 7  # q, k, v, o, gate, up, down in every middle layer
    assert 0.4 < details["weight_fraction"] <= 0.5
    assert details["footprint"]["device_parameters"] < sum(p.numel() for p in model.parameters())
    emulator.save_pretrained(tmp_path / "emulator")
    reloaded = load_causal_lm(tmp_path / "emulator")
    ids = data.blocks[:2]
    assert torch.equal(logits(reloaded, ids), logits(emulator, ids))


def test_low_rank_keeps_more_rank_for_more_energy():
    model, data = tiny(), calibration()
    params = [
        emulator_record(
            make_emulator(model, SPLIT, EmulatorSpec.parse(f"lowrank:energy={e}"), calibration=data)
        ).details["footprint"]["middle_parameters"]
        for e in (0.5, 0.8, 0.95)
    ]
    assert params == sorted(params) and params[0] < params[-1]


def broken(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """Every layer's weight matrices scaled to a fifth (a calm, near-residual model), except `layer`'s, scaled 5×
    instead: that layer amplifies any error in its weights 25× more than the others."""
    with torch.no_grad():
        for index, block in enumerate(decoder_layers(model)):
            for module in linear_modules(block).values():
                module.weight.mul_(5.0 if index == layer else 0.2)
    return model


def test_sensitivity_ranks_a_broken_layer_most_sensitive_to_pruning_and_quantization():
    model = broken(tiny(), layer=4)
    costs = measure_costs(model, list(range(1, 7)), calibration())[0]
    for sparsity in SPARSITIES[1:]:
        assert max(range(6), key=lambda i: costs[i].pruning[sparsity]) == 3
    for bits in BIT_WIDTHS[1:]:
        assert max(range(6), key=lambda i: costs[i].quantization[bits]) == 3


def test_importance_ranks_a_broken_layer_first_and_drops_a_layer_that_does_nothing():
    model = broken(tiny(), layer=4)
    with torch.no_grad():  # layer 2 adds nothing to the residual stream
        decoder_layers(model)[2].mlp.down_proj.weight.zero_()
        decoder_layers(model)[2].self_attn.o_proj.weight.zero_()
    scores = removal_importance(model, SPLIT, calibration())
    assert max(range(6), key=scores.__getitem__) == 3
    assert scores[1] == pytest.approx(0.0, abs=1e-7)
    emulator = make_emulator(model, SPLIT, EmulatorSpec.parse("importance", keep=5), calibration=calibration())
    assert emulator_record(emulator).layer_map == [0, 1, 3, 4, 5, 6, 7]


def test_greedy_removes_the_layers_that_do_nothing_first_and_keeps_the_broken_one():
    model = broken(tiny(), layer=4)
    with torch.no_grad():  # layers 2 and 5 add nothing to the residual stream
        for index in (2, 5):
            decoder_layers(model)[index].mlp.down_proj.weight.zero_()
            decoder_layers(model)[index].self_attn.o_proj.weight.zero_()
    emulator = make_emulator(model, SPLIT, EmulatorSpec.parse("greedy", keep=3), calibration=calibration())
    record = emulator_record(emulator)
    path = record.details["greedy_path"]
    assert {step["removed"] for step in path[:2]} == {2, 5}
    assert path[1]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert 4 in record.layer_map and len(record.layer_map) == 5
    assert record.details["select"] == "greedy"


def test_greedy_path_is_cached_reused_for_a_larger_keep_and_continued_for_a_smaller(tmp_path, monkeypatch):
    model, data = tiny(), calibration()
    passes = []
    measure = greedy._divergence_without
    monkeypatch.setattr(greedy, "_divergence_without", lambda *args: passes.append(1) or measure(*args))
    fresh, _ = greedy.select_greedy(model, Split(1, 1, keep=3), data)
    assert len(passes) == 6 + 5 + 4
    passes.clear()
    four, details = greedy.select_greedy(model, Split(1, 1, keep=4), data, tmp_path)
    assert len(passes) == 6 + 5 and len(details["greedy_path"]) == 2
    passes.clear()
    five, _ = greedy.select_greedy(model, Split(1, 1, keep=5), data, tmp_path)
    three, _ = greedy.select_greedy(model, Split(1, 1, keep=3), data, tmp_path)
    assert len(passes) == 4  # keep 5 is a prefix of the saved path; keep 3 measures one more round only
    assert three == fresh and set(three) < set(four) < set(five)


def test_allocation_compresses_the_least_sensitive_layers_first_and_refuses_the_impossible():
    def layer(sensitivity: float) -> LayerCost:
        return LayerCost(
            pruning={s: sensitivity * s for s in SPARSITIES},
            quantization={32: 0.0, 8: sensitivity * 0.01, 4: sensitivity * 0.2},
            weights=1000,
            rows=10,
            other=0,
        )

    costs = [layer(10.0), layer(0.1)]
    choice = allocate(costs, 0.6)
    sizes = [c.bits(*o) for c, o in zip(costs, choice, strict=True)]
    assert sum(sizes) <= 0.6 * sum(c.full_bits() for c in costs)
    assert choice == [(0.0, 32), (0.0, 4)]  # 4 bits on the insensitive layer beats 8 bits on both
    assert allocate(costs, 1.0) == [(0.0, 32), (0.0, 32)]
    with pytest.raises(ConfigError, match=r"size=0\.01 is below the smallest"):
        allocate(costs, 0.01)


def test_distillation_pulls_the_emulator_middle_toward_the_full_middle():
    model, data, split = tiny(), calibration(blocks=64), Split(1, 1, keep=2)
    emulator = build_emulator(model, split)
    report = distill(emulator, model, split, data, DistillConfig(steps=100, lr=3e-3, kl_weight=0.0))
    assert report["final_nmse"] < 0.7 * report["first_nmse"]


def test_distillation_moves_the_emulator_predictions_toward_the_full_model_on_text_it_did_not_train_on():
    model, data, split = tiny(), calibration(blocks=64), Split(1, 1, keep=2)
    held_out = calibration(blocks=80).blocks[64:].split(4)  # the same word stream, blocks past the training ones
    reference = log_probs(model, held_out)
    emulator = build_emulator(model, split)
    before = divergence(emulator, held_out, reference)
    report = distill(emulator, model, split, data, DistillConfig(steps=100, lr=3e-3, hidden_weight=0.0))
    assert divergence(emulator, held_out, reference) < 0.7 * before
    assert report["final_kl"] < report["first_kl"]
    steps = [point[0] for point in report["curve"]]
    assert steps == sorted(steps) and steps[-1] == 100 and len(steps) <= CURVE_POINTS + 1


def test_a_trained_emulator_is_cached_and_a_damaged_cache_entry_is_built_again(monkeypatch, tmp_path):
    private_cache = tmp_path / "cache"
    monkeypatch.setenv("OFFSITE_EDGE_CACHE", str(private_cache))
    model, data = tiny(), calibration(blocks=32)
    spec = EmulatorSpec.parse("uniform:keep=3,distill=5,harmonize=4")
    first = make_emulator(model, SPLIT, spec, calibration=data)
    (entry,) = (private_cache / "emulators").iterdir()
    monkeypatch.setattr(recipes, "distill", lambda *args: pytest.fail("a cached emulator was distilled again"))
    again = make_emulator(model, SPLIT, spec, calibration=data)
    ids = data.blocks[:2]
    assert torch.equal(logits(again, ids), logits(first, ids))
    assert emulator_record(again).details == emulator_record(first).details
    monkeypatch.setattr(recipes, "distill", distill)  # undo() would lift the cache too
    (entry / "model.safetensors").write_bytes(b"not a safetensors file")
    rebuilt = make_emulator(model, SPLIT, spec, calibration=data)
    assert torch.allclose(logits(rebuilt, ids), logits(first, ids), atol=1e-5)
    other = make_emulator(model, SPLIT, EmulatorSpec.parse("uniform:keep=3,distill=6,harmonize=4"), calibration=data)
    assert len(list((private_cache / "emulators").iterdir())) == 2 and not torch.equal(
        logits(other, ids), logits(first, ids)
    )


def test_distilling_a_compressed_emulator_trains_only_its_middle_and_keeps_it_compressed():
    model, data, split = tiny(), calibration(blocks=64), Split(1, 1, keep=3)
    spec = EmulatorSpec.parse("luc:size=0.2,distill=5")
    emulator = make_emulator(model, split, spec, calibration=data)
    assert emulator_record(emulator).details["distill"]["steps"] == 5
    plain = build_emulator(model, split)
    changed = {name for name, p in emulator.named_parameters() if not torch.equal(p, plain.get_parameter(name))}
    assert changed and all(
        name.startswith(("model.layers.1.", "model.layers.2.", "model.layers.3.")) for name in changed
    )
    chosen = emulator_record(emulator).details["layers"]
    for block, choice in zip(list(decoder_layers(emulator))[1:-1], chosen, strict=True):
        for module in linear_modules(block).values():
            assert (module.weight == 0).float().mean() >= choice["sparsity"] - 1e-6


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prune", "emulator recipe 'prune' is unknown"),
        ("luc", "luc needs size=F"),
        ("lowrank:size=0.5,energy=0.9", "exactly one of energy=E or size=F"),
        ("uniform:size=0.5", "size, energy, select are for luc/lowrank"),
        ("luc:size=0.3,bits=4", "'bits=4' in emulator spec"),
        ("luc:size=half", "size='half' in emulator spec"),
        ("luc:size=0.3,select=random", "select='random' is unknown"),
        ("greedy:harmonize=-2", "harmonize=-2 must be 0"),
        ("greedy:mode=share", "mode='share' is for the share recipe only"),
        ("share:mode=copy", "mode='copy' is for the share recipe only, one of share, drop"),
        ("share:harmonize=8", "no gap to harmonize; use share:mode=drop,harmonize=RANK"),
    ],
)
def test_bad_specs_name_the_bad_value(text, message):
    with pytest.raises(ConfigError, match=message):
        EmulatorSpec.parse(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [("luc:size=1.5", "size=1.5 must be in"), ("lowrank:energy=0", r"energy=0.0 must be in \(0, 1\]")],
)
def test_out_of_range_targets_are_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        make_emulator(tiny(), SPLIT, EmulatorSpec.parse(text), calibration=calibration())
