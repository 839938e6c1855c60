"""Poisoned updates: of ten devices one sends a scaled, random or over-weighted update. FedAvg follows it; the
median, trimmed mean and Krum stay by the honest devices' aggregate. Non-finite or foreign adapters are refused
on receipt, claimed example counts are capped by what the device announced, updates can be clipped."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from coordinator.errors import ConfigError, DataError
from coordinator.fleet.aggregate import federated_average
from coordinator.fleet.jobs import JobSpec
from coordinator.fleet.registry import Registry
from coordinator.fleet.robust import AggregationRule, clip_updates
from coordinator.fleet.work import Workshop, _capped, check_result_adapter
from coordinator.results import DeviceResult
from tests.conftest import device_result

START = {"w": torch.zeros(64), "b": torch.zeros(8)}
ROBUST = ["median", "trimmed-mean:0.2", "krum:f=1"]


def _result(weights: dict[str, torch.Tensor], examples: int = 40) -> DeviceResult:
    return device_result(weights, examples, "lora")


def _fleet(attack: str) -> tuple[list[DeviceResult], dict[str, torch.Tensor]]:
    """Nine honest devices around one true update, one attacker; and the honest devices' own FedAvg."""
    generator = torch.Generator().manual_seed(0)
    true = {name: torch.randn(t.shape, generator=generator) for name, t in START.items()}
    honest = [
        _result({n: true[n] + 0.1 * torch.randn(t.shape, generator=generator) for n, t in true.items()})
        for _ in range(9)
    ]
    if attack == "scaled":  # the update reversed and blown up
        bad = _result({name: -20 * tensor for name, tensor in true.items()})
    elif attack == "random":
        bad = _result({name: 30 * torch.randn(t.shape, generator=generator) for name, t in true.items()})
    else:  # "examples": a plausible-looking wrong update, claiming a billion examples
        bad = _result({name: -tensor for name, tensor in true.items()}, examples=10**9)
    return [*honest, bad], federated_average(honest)


def _distance(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((one[name] - two[name]).pow(2).sum() for name in one)))


@pytest.mark.parametrize("attack", ["scaled", "random", "examples"])
def test_one_poisoned_device_steers_fedavg_but_not_the_robust_rules(attack):
    results, clean = _fleet(attack)
    scale = _distance(clean, START)  # the size of the honest update itself
    assert _distance(federated_average(results), clean) > scale  # FedAvg is taken over by one device
    for rule in ROBUST:
        aggregate = federated_average(results, AggregationRule.parse(rule))
        assert _distance(aggregate, clean) < 0.15 * scale, rule
    clipped = federated_average(results, start=START, clip_norm=1.2 * scale)  # FedAvg with every update clipped
    assert _distance(clipped, clean) < _distance(federated_average(results), clean) / 5 or attack == "examples"


def test_clipping_bounds_each_update_and_keeps_small_ones():
    results = [{"w": torch.full((4,), 3.0), "b": torch.zeros(8)}, {"w": torch.full((4,), 0.1), "b": torch.zeros(8)}]
    start = {"w": torch.zeros(4), "b": torch.zeros(8)}
    big, small = clip_updates(results, start, 1.0)
    assert float(big["w"].norm()) == pytest.approx(1.0)
    torch.testing.assert_close(small["w"], results[1]["w"])


def test_rules_are_parsed_with_clear_errors_and_krum_needs_enough_devices():
    assert AggregationRule.parse("trimmed-mean:0.1").label() == "trimmed-mean:0.1"
    assert AggregationRule.parse("krum:f=2").faulty == 2
    for text, says in [("mean", "not one of"), ("krum:g=1", "krum:f=1"), ("trimmed-mean:0.7", "between 0 and 0.5")]:
        with pytest.raises(ConfigError, match=says):
            AggregationRule.parse(text)
    with pytest.raises(ConfigError, match="not one of"):
        JobSpec("reviews", aggregate="mode")
    with pytest.raises(ConfigError, match="positive"):
        JobSpec("reviews", clip_norm=0.0)
    results, _ = _fleet("scaled")
    with pytest.raises(DataError, match="at least 5 device results"):
        federated_average(results[:4], AggregationRule.parse("krum:f=1"))
    with pytest.raises(DataError, match="NaN or infinite"):
        federated_average([*results[:2], _result({"w": torch.full((64,), float("nan")), "b": torch.zeros(8)})])


def test_a_claimed_example_count_is_capped_by_what_the_device_announced(tmp_path):
    registry = Registry(tmp_path)
    registry.device_profile("a", {}, {"reviews": 40}, ["ort"])
    shop = Workshop(registry, None, tmp_path)  # type: ignore[arg-type]
    claimed = _result(dict(START), examples=10**9)
    assert _capped(claimed, shop, "a", JobSpec("reviews")).metrics.examples == 40
    honest = _result(dict(START), examples=24)
    assert _capped(honest, shop, "a", JobSpec("reviews")) is honest
    assert replace(claimed.metrics, examples=40) == _capped(claimed, shop, "a", JobSpec("reviews")).metrics


def test_a_result_adapter_that_is_not_finite_or_not_the_bundles_is_refused(tmp_path):
    (tmp_path / "bundle").mkdir()
    initial = {"w": np.zeros((4, 2), np.float32)}
    save_file(initial, str(tmp_path / "bundle" / "adapter.safetensors"))
    archive = tmp_path / "bundle.tar"
    for name, tensors, says in [
        ("nan", {"w": np.full((4, 2), np.nan, np.float32)}, "NaN or infinite values in w"),
        ("other", {"v": np.zeros((4, 2), np.float32)}, "other tensors"),
        ("shape", {"w": np.zeros((4, 3), np.float32)}, "other tensors"),
    ]:
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(DataError, match=says):
            check_result_adapter(tmp_path / f"{name}.safetensors", archive, "a's result")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(DataError, match="not a safetensors file"):
        check_result_adapter(tmp_path / "junk.safetensors", archive, "a's result")
    save_file({"w": np.ones((4, 2), np.float32)}, str(tmp_path / "good.safetensors"))
    check_result_adapter(tmp_path / "good.safetensors", archive, "a's result")


def test_a_fleet_round_aggregated_by_the_median_says_so(mosquitto, make_fleet) -> None:
    from pathlib import Path

    from safetensors.torch import load_file

    from tests.fleet.conftest import tiny_spec, wait_for

    fleet = make_fleet(mosquitto)
    fleet.start_service()
    fleet.start_daemon("a")
    fleet.start_daemon("b")
    registry = fleet.service.registry
    job = registry.add_job(tiny_spec(fleet.files, rounds=1, aggregate="median", clip_norm=1e6))
    wait_for(lambda: registry.job(job)["state"] in ("done", "failed"), 120, "the job to finish")
    assert registry.job(job)["state"] == "done", registry.job(job)["detail"]
    results = {t["device"]: load_file(Path(t["result"]) / "adapter.safetensors") for t in registry.tasks(job)}
    folder = Path(registry.rounds(job)[0]["aggregate"])
    aggregate = load_file(str(folder / "adapter.safetensors"))
    for name, tensor in aggregate.items():  # the median of two is their plain mean, whatever the example counts
        torch.testing.assert_close(tensor, (results["a"][name] + results["b"][name]) / 2)
    record = json.loads((folder / "metrics.json").read_text())["aggregate"]
    assert (record["method"], record["clip_norm"], record["devices"]) == ("median", 1e6, 2)
