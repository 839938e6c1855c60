"""Layer adapters: full-model names, plug-in in both directions, safetensors round trip, bad weights."""

import pytest
import torch
from safetensors.torch import save_file

from coordinator.adapters import plugged_in
from coordinator.adapters.files import load_adapter, save_adapter
from coordinator.adapters.layers import LayerAdapter, adapter_parameters, adapter_state, plug_in
from coordinator.emulator import Split, build_emulator
from coordinator.errors import ConfigError, DataError
from tests.conftest import make_model

IDS = torch.tensor([[5, 9, 3, 17, 22, 8, 41, 7]])


def _layers_named(weights):
    return sorted({int(name.split(".")[name.split(".").index("layers") + 1]) for name in weights})


def test_emulator_adapter_uses_full_model_layer_names():
    emulator = build_emulator(make_model("llama"), Split(1, 1, keep=2))  # layers 0,1,4,5 of 6
    names = adapter_parameters(emulator, 1, 1)
    assert _layers_named(names) == [0, 5]
    assert set(names) == set(adapter_parameters(make_model("llama"), 1, 1))


def test_plugging_an_untrained_adapter_changes_nothing(family):
    model = make_model(family)
    emulator = build_emulator(model, Split(2, 1, keep=2))
    with torch.no_grad():
        before = model(IDS).logits.clone()
    plug_in(model, adapter_state(emulator, 2, 1))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)


def test_plug_in_copies_trained_adapter_layers_only():
    model = make_model("llama")
    emulator = build_emulator(model, Split(1, 1, keep=2))
    with torch.no_grad():
        for parameter in emulator.parameters():
            parameter.mul_(1.5)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    plug_in(model, adapter_state(emulator, 1, 1))
    for name, tensor in model.state_dict().items():
        in_adapter = name.startswith(("model.layers.0.", "model.layers.5."))
        assert torch.equal(tensor, before[name]) != in_adapter, name
    assert torch.equal(model.model.layers[5].mlp.up_proj.weight, emulator.model.layers[3].mlp.up_proj.weight)


def test_full_model_adapter_plugs_into_the_emulator():
    model = make_model("gpt2")
    emulator = build_emulator(model, Split(1, 1, keep=2))
    with torch.no_grad():
        for parameter in model.transformer.h[5].parameters():
            parameter.add_(0.25)
    plug_in(emulator, adapter_state(model, 1, 1))
    assert torch.equal(emulator.transformer.h[3].mlp.c_fc.weight, model.transformer.h[5].mlp.c_fc.weight)


def test_adapter_round_trips_through_safetensors(tmp_path):
    weights = adapter_state(make_model("opt"), 2, 2)
    path = tmp_path / "adapter.safetensors"
    save_adapter(weights, path, {"model": "tiny-opt", "bottom": 2, "top": 2})
    loaded, metadata = load_adapter(path)
    assert metadata == {"model": "tiny-opt", "bottom": 2, "top": 2}
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[name], weights[name]) for name in weights)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]


def test_foreign_safetensors_is_not_an_adapter(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(DataError, match="not an offsite-edge adapter"):
        load_adapter(path)
    with pytest.raises(DataError, match="does not exist"):
        load_adapter(tmp_path / "missing.safetensors")


def test_mismatched_weights_are_refused_before_any_copy():
    model = make_model("llama")
    good = adapter_state(model, 1, 1)
    wrong_shape = dict(good) | {"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(ConfigError, match="shape"):
        plug_in(model, {name: t + 1 for name, t in wrong_shape.items()})
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)
    with pytest.raises(ConfigError, match="no matching parameter"):
        plug_in(model, {"model.layers.0.not_a_weight": torch.zeros(1)})
    emulator = build_emulator(model, Split(1, 1, keep=2))
    with pytest.raises(ConfigError, match="does not hold"):
        plug_in(emulator, {"model.layers.2.mlp.up_proj.weight": torch.zeros(64, 32)})


def test_plugged_in_holds_the_weights_while_open_and_restores_even_after_an_error():
    model = make_model("llama")
    before = adapter_state(model, 1, 1)
    trained = {name: tensor + 1.0 for name, tensor in before.items()}
    with pytest.raises(RuntimeError, match="scoring failed"), plugged_in(LayerAdapter(), model, trained, 1, 1):
        assert all(torch.equal(adapter_state(model, 1, 1)[name], trained[name]) for name in trained)
        raise RuntimeError("scoring failed")
    assert all(torch.equal(adapter_state(model, 1, 1)[name], before[name]) for name in before)
