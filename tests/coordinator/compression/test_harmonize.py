"""Harmonizers on tiny models: fitting lowers each gap's hidden-state error on held-out text, the emulator
round-trips through a folder, and the adapter never carries a harmonizer into the full model."""

import pytest
import torch

from coordinator.adapters.layers import adapter_parameters
from coordinator.compression import EmulatorSpec, make_emulator
from coordinator.compression.distill import normalized_mse
from coordinator.compression.harmonize import find_gaps
from coordinator.emulator import Split, build_emulator, emulator_record
from edge_runtime.low_rank import load_causal_lm
from tests.coordinator.compression.test_recipes import calibration, logits, tiny

SPLIT = Split(1, 1, keep=3)  # 8 layers: middle 1..6, uniform keeps 1, 3, 6 -> gaps before layers 3 and 6


def hidden_states(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """transformers' own record of the hidden state entering each layer (before any hook rewrites it)."""
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fitted_harmonizers_lower_each_gaps_error_on_held_out_text(family):
    model, data = tiny(family), calibration(blocks=64)
    emulator = make_emulator(model, SPLIT, EmulatorSpec.parse("uniform:harmonize=8"), calibration=data)
    details = emulator_record(emulator).details["harmonize"]
    assert [gap["replaces"] for gap in details["gaps"]] == [[2], [4, 5]]
    held = data.blocks[-details["held_out_blocks"] :]
    student, teacher = hidden_states(emulator, held), hidden_states(model, held)
    harmonizers = emulator.get_submodule("model" if family == "llama" else "transformer").offsite_harmonizers
    for gap in details["gaps"]:
        position, after_gap = gap["position"], gap["replaces"][-1] + 1
        arriving, wanted = student[position], teacher[after_gap]
        with torch.no_grad():
            before = float(normalized_mse(arriving, wanted))
            after = float(normalized_mse(harmonizers[str(position)](arriving), wanted))
        assert after < 0.9 * before, gap
        assert after == pytest.approx(gap["held_out_nmse_after"], rel=1e-3)
    plain = build_emulator(model, SPLIT)  # the same layers without harmonizers: the whole emulator got closer
    ids = data.blocks[-4:]
    full = torch.log_softmax(logits(model, ids), -1)

    def divergence(candidate: torch.nn.Module) -> float:
        got = torch.log_softmax(logits(candidate, ids), -1)
        return float(torch.nn.functional.kl_div(got, full, log_target=True, reduction="batchmean"))

    assert divergence(emulator) < divergence(plain)


def test_a_harmonized_emulator_round_trips_and_its_adapter_holds_only_full_model_names(tmp_path):
    model, data = tiny(), calibration(blocks=32)
    emulator = make_emulator(model, SPLIT, EmulatorSpec.parse("uniform:harmonize=4"), calibration=data)
    footprint = emulator_record(emulator).details["footprint"]
    harmonizer_parameters = emulator_record(emulator).details["harmonize"]["parameters"]
    assert harmonizer_parameters == 2 * (32 + 2 * 32 * 4)  # two gaps: norm weight, down and up
    assert footprint["middle_parameters"] == sum(p.numel() for p in model.model.layers[1].parameters()) * 3 + (
        harmonizer_parameters
    )
    emulator.save_pretrained(tmp_path / "emulator")
    reloaded = load_causal_lm(tmp_path / "emulator")
    ids = data.blocks[:2]
    assert torch.equal(logits(reloaded, ids), logits(emulator, ids))
    assert not torch.equal(logits(reloaded, ids), logits(build_emulator(model, SPLIT), ids))
    names = adapter_parameters(reloaded, 1, 1)
    assert names and all("harmoniz" not in name for name in names)
    assert set(names) <= {name for name, _ in model.named_parameters()}


def test_gaps_are_found_between_kept_layers_and_after_the_last():
    assert find_gaps([0, 1, 2, 3], 4) == {}
    assert find_gaps([1, 2], 4) == {0: [0], 2: [3]}
    assert find_gaps([0, 3, 4, 7], 8) == {1: [1, 2], 3: [5, 6]}
