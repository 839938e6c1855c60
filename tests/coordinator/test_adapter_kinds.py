"""Adapter kinds: the registry, what each kind trains, and how it averages across a fleet."""

import json

import pytest
import torch

from coordinator.adapters import KINDS, adapter_kind
from coordinator.adapters.layers import adapter_parameters
from coordinator.architectures import spec_for
from coordinator.cli import main as coordinator
from coordinator.emulator import Split, build_emulator
from coordinator.errors import ConfigError, DataError
from coordinator.fleet.aggregate import federated_average
from coordinator.request import BundleRequest
from coordinator.results import DeviceResult
from edge_runtime.manifest import RESULT_FORMAT, RESULT_SCHEMA, read_metrics
from tests.conftest import make_bundle, make_model


def _result(weights: dict[str, torch.Tensor], examples: int, kind: str = "layers") -> DeviceResult:
    metrics = {
        "format": RESULT_FORMAT,
        "schema": RESULT_SCHEMA,
        "model": {"name": "tiny", "sha256": "0" * 64, "num_layers": 6},
        "emulator": {"recipe": "uniform", "source_num_layers": 6, "layer_map": [0, 5], "bottom": 1, "top": 1},
        "backend": "ort",
        "steps": 1,
        "samples": 8,
        "examples": examples,
        "first_loss": 1.0,
        "final_loss": 0.5,
        "loss_curve": [1.0],
        "wall_seconds": 1.0,
        "peak_memory_bytes": 1,
        "adapter_kind": kind,
    }
    return DeviceResult(weights, read_metrics(json.dumps(metrics)))


def test_layers_trains_every_parameter_of_the_adapter_layers_of_each_family(family):
    model = make_model(family, num_layers=6)
    emulator = build_emulator(model, Split(1, 1, keep=2))
    trained = adapter_kind("layers").trainable(emulator, 1, 1)
    assert trained.keys() == adapter_parameters(emulator, 1, 1).keys()
    layers = spec_for(model.config.model_type).layers
    assert {name[len(layers) + 1 :].split(".")[0] for name in trained} == {"0", "5"}  # source layers, not emulator's
    assert sum(p.numel() for p in trained.values()) < sum(p.numel() for p in emulator.parameters())


@pytest.mark.parametrize(
    ("text", "named"),
    [("lora:r=8", "'lora' is not one of: layers"), ("layers:r=8", "takes no options"), ("layers:r", "not KEY=VALUE")],
)
def test_an_unknown_kind_or_option_is_refused_naming_it(text, named):
    with pytest.raises(ConfigError, match=named):
        adapter_kind(text)
    with pytest.raises(ConfigError, match=named):
        BundleRequest(adapter_kind=text)
    assert "layers" in KINDS


def test_export_refuses_an_unknown_adapter_kind_before_building_anything(tmp_path, capsys):
    paths = make_bundle(tmp_path)
    command = ["export", "--model", str(paths["model"]), "--profile", "laptop-16gb", "--keep", "2"]
    assert coordinator([*command, "--adapter-kind", "prompt:tokens=20", "--out", str(tmp_path / "b")]) == 2
    assert "adapter kind 'prompt' is not one of: layers" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_fedavg_of_layers_weighs_each_device_by_its_examples():
    one = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    two = {"w": torch.tensor([4.0, -1.0]), "b": torch.tensor([3.0])}
    average = federated_average([_result(one, 10), _result(two, 30)])
    torch.testing.assert_close(average["w"], torch.tensor([0.25 * 1 + 0.75 * 4, 0.25 * 2 + 0.75 * -1]))
    torch.testing.assert_close(average["b"], torch.tensor([2.25]))
    assert average["w"].dtype == torch.float32


def test_fedavg_refuses_results_of_different_tensors_or_kinds():
    with pytest.raises(DataError, match="name different tensors"):
        federated_average([_result({"w": torch.zeros(1)}, 1), _result({"v": torch.zeros(1)}, 1)])
    with pytest.raises(DataError, match="different kinds"):
        federated_average([_result({"w": torch.zeros(1)}, 1), _result({"w": torch.zeros(1)}, 1, "lora")])
    with pytest.raises(DataError, match="nothing to aggregate"):
        federated_average([])
