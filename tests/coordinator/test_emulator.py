"""Emulator construction: the layer formula, exact reproduction at no drop, independence, save/load."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from coordinator.emulator import Split, build_emulator, emulator_record, layer_map, uniform_drop
from coordinator.errors import ConfigError
from tests.conftest import make_model

IDS = torch.tensor([[5, 9, 3, 17, 22, 8, 41, 7], [1, 2, 3, 4, 5, 6, 7, 8]])


def test_formula_matches_the_worked_example():
    # The worked example of uniform layer drop: for 24 layers, 2-8-2 keeps 2,5,7,10,13,16,18,21 in the middle.
    assert uniform_drop(20, 8) == [0, 3, 5, 8, 11, 14, 16, 19]
    assert Split(2, 2, keep=8).kept_layers(24) == [0, 1, 2, 5, 7, 10, 13, 16, 18, 21, 22, 23]


@pytest.mark.parametrize("middle", [2, 3, 7, 20, 26])
def test_drop_keeps_first_and_last_and_is_increasing(middle):
    for keep in range(2, middle + 1):
        kept = uniform_drop(middle, keep)
        assert kept[0] == 0 and kept[-1] == middle - 1
        assert len(kept) == keep and kept == sorted(set(kept))
    assert uniform_drop(middle, middle) == list(range(middle))


def test_keeping_every_layer_reproduces_the_full_logits_exactly(family):
    model = make_model(family)
    emulator = build_emulator(model, Split(1, 1, keep=4))
    assert emulator.config.num_hidden_layers == 6
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, emulator(IDS).logits)


def test_dropping_layers_makes_a_smaller_model_with_other_logits(family):
    model = make_model(family)
    emulator = build_emulator(model, Split(1, 1, keep=2))
    assert emulator.config.num_hidden_layers == 4
    assert layer_map(emulator) == [0, 1, 4, 5]
    assert type(emulator) is type(model)
    with torch.no_grad():
        assert not torch.allclose(model(IDS).logits, emulator(IDS).logits)


def test_emulator_shares_no_tensor_with_the_full_model():
    model = make_model("llama")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    emulator = build_emulator(model, Split(1, 1, keep=4))
    with torch.no_grad():
        for parameter in emulator.parameters():
            parameter.add_(1.0)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_emulator_round_trips_through_save_and_load(family, tmp_path):
    emulator = build_emulator(make_model(family), Split(2, 1, keep=2))
    emulator.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert emulator_record(reloaded) == emulator_record(emulator)
    assert layer_map(reloaded) == [0, 1, 2, 4, 5]
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, emulator(IDS).logits)


def test_qwen2_layer_types_follow_the_kept_layers():
    model = make_model("qwen2")
    model.config.layer_types = [f"full_attention_{i}" for i in range(6)]
    emulator = build_emulator(model, Split(1, 1, keep=2))
    assert emulator.config.layer_types == [
        "full_attention_0",
        "full_attention_1",
        "full_attention_4",
        "full_attention_5",
    ]


@pytest.mark.parametrize(
    ("split", "layers", "expected"),
    [
        ((2, 2, 9), 12, "choose keep in 2..8"),
        ((2, 2, 1), 12, "choose keep in 2..8"),
        ((6, 6, 2), 12, "at most 11"),
        ((0, 0, 4), 12, "at least one bottom or top layer"),
        ((-1, 2, 4), 12, "negative"),
        ((2, 2, 0), 12, "at least 1"),
    ],
)
def test_invalid_splits_name_the_valid_range(split, layers, expected):
    with pytest.raises(ConfigError, match=expected):
        Split(*split[:2], keep=split[2]).kept_layers(layers)
