"""A heterogeneous fleet over Mosquitto: each device gets the configuration its memory and speed allow."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from safetensors.torch import load_file

from coordinator.adapters.files import load_adapter
from coordinator.fleet.cli import format_configurations
from coordinator.fleet.configure import candidate_shapes, candidates
from coordinator.fleet.cost import PRIOR_EFFICIENCY, step_flops
from coordinator.fleet.jobs import JobSpec
from coordinator.fleet.work import throughput
from coordinator.models import load_model
from device_profiles import GIB, DeviceProfile, validate
from edge_runtime.memory import estimate
from edge_runtime.trainer import PLAN_MARGIN
from edge_runtime.transfer import sha256_file
from tests.fleet.conftest import tiny_spec, wait_for

DEADLINE = 120.0


def _profile(name: str, budget_bytes: float, gflops: float) -> DeviceProfile:
    record = {
        "name": name,
        "description": f"{name}, made in a test",
        "memory_gb": 64.0,
        "training_budget_gb": budget_bytes / GIB,
        "cpu_cores": 2,
        "architecture": "aarch64",
        "execution_providers": ["CPUExecutionProvider"],
        "onnxruntime_training": False,
        "peak_fp32_gflops": gflops,
    }
    return validate(record, "test profile")


def _spec(fleet, steps: int, adapter_kind: str = "layers", **change: object) -> JobSpec:
    """The tiny fleet's job through a uniform emulator of 4 middle layers, with `change` to its JobSpec fields."""
    spec = JobSpec.from_dict(tiny_spec(fleet.files, steps=steps, checkpoint_every=4, adapter_kind=adapter_kind))
    return replace(spec, bundle=replace(spec.bundle, keep=4, emulator="uniform"), **change)


def _finished(fleet, job: str) -> dict:
    wait_for(lambda: fleet.service.registry.job(job)["state"] in ("done", "failed"), 240, f"{job} to finish")
    return fleet.service.registry.job(job)


def test_three_profiles_train_three_configurations_and_the_aggregate_plugs_in(mosquitto, make_fleet) -> None:
    fleet = make_fleet(mosquitto)
    spec = _spec(fleet, steps=12, per_device=True, candidate_emulators=("uniform:keep=2",), deadline_s=DEADLINE)
    order = candidates(spec)
    shapes = candidate_shapes(load_model(str(fleet.files["model"])), spec, order)
    keep4, keep2 = order[0], order[2]
    peak = {c: estimate(shapes[c], 1, 32, "classification", "torch").total for c in (keep4, keep2)}
    flops = step_flops(shapes[keep4], 8, 32, "classification")
    profiles = {
        "a": _profile("roomy", 64 * GIB, 5000),
        "b": _profile("tight", (peak[keep4] + peak[keep2]) / 2 * (1 + PLAN_MARGIN), 5000),  # only keep 2 fits
        "c": _profile("slow", 64 * GIB, flops * 6 / (DEADLINE * 0.7) / 1e9 / PRIOR_EFFICIENCY),  # 6 steps fit
    }
    fleet.start_service()
    for device, profile in profiles.items():
        fleet.start_daemon(device, profile=profile)
    job = fleet.service.registry.add_job(spec.to_dict())
    record = _finished(fleet, job)
    assert record["state"] == "done", record["detail"]

    chosen = record["detail"]["configurations"]
    assert {d: (c["candidate"]["emulator"], c["steps"]) for d, c in chosen.items()} == {
        "a": ("uniform:keep=4", 12),
        "b": ("uniform:keep=2", 12),
        "c": ("uniform:keep=4", 6),
    }
    shown = format_configurations(record["detail"])  # what `fleet status JOB` prints under the job
    print(shown)
    assert all(f"  {d} ({profiles[d].name}): " in shown for d in profiles) and "would be: uniform:keep=2" in shown
    tasks = fleet.service.registry.tasks(job)
    assert [(t["round"], t["device"], t["state"]) for t in tasks] == [
        (r, d, "received") for r in (1, 2) for d in ("a", "b", "c")
    ]
    for task in tasks:  # each device trained the steps and emulator chosen for it, planned within its budget
        metrics, choice = task["metrics"], chosen[task["device"]]
        assert metrics["steps"] == choice["steps"]
        assert len(metrics["emulator"]["layer_map"]) == 2 + int(choice["candidate"]["emulator"].split("=")[1])
        assert metrics["predicted_peak_bytes"] * (1 + PLAN_MARGIN) <= metrics["budget_bytes"] <= choice["budget_bytes"]
    rounds = fleet.service.registry.rounds(job)
    assert all(r["evaluation"]["examples"] == 32 for r in rounds)  # the aggregate plugged into the full model
    results = [load_file(Path(t["result"]) / "adapter.safetensors") for t in tasks if t["round"] == 2]
    aggregate = load_file(Path(rounds[1]["aggregate"]) / "adapter.safetensors")
    name = next(iter(aggregate))
    expected = (40 * results[0][name] + 24 * results[1][name] + 32 * results[2][name]) / 96  # FedAvg by examples
    assert float((aggregate[name] - expected).abs().max()) < 1e-5
    assert fleet.service.refused == 0, list(fleet.service.rejections)
    # The next per-device job times each device by its own results, not by its profile.
    measured = throughput(fleet.service.registry, "c", profiles["c"])
    last = fleet.service.registry.task(job, 2, "c")
    assert measured.source == f"measured: {job} round 2"
    seconds, sequence = last["metrics"]["step_seconds_median"], last["metrics"]["sequence"]
    assert measured.gflops == step_flops(shapes[keep4], 8, sequence, "classification") / seconds / 1e9


def test_lora_devices_of_two_ranks_start_round_two_from_their_cut_of_the_aggregate(mosquitto, make_fleet) -> None:
    fleet = make_fleet(mosquitto)
    spec = _spec(fleet, steps=8, adapter_kind="lora:r=4", per_device=True, lora_ranks=(4, 2))
    order = [c for c in candidates(spec) if not c.recompute]
    shapes = candidate_shapes(load_model(str(fleet.files["model"])), spec, order)
    peaks = [estimate(shapes[c], 1, 32, "classification", "torch").total for c in order]
    assert peaks[1] < peaks[0]  # rank 2 holds fewer trainable values, and their gradients and moments
    fleet.start_service()
    fleet.start_daemon("a", profile=_profile("roomy", 64 * GIB, 5000))
    fleet.start_daemon("b", profile=_profile("tight", (peaks[0] + peaks[1]) / 2 * (1 + PLAN_MARGIN), 5000))
    job = fleet.service.registry.add_job(spec.to_dict())
    record = _finished(fleet, job)
    assert record["state"] == "done", record["detail"]
    ranks = {d: c["candidate"]["adapter_kind"] for d, c in record["detail"]["configurations"].items()}
    assert ranks == {"a": "lora:r=4,alpha=16", "b": "lora:r=2,alpha=16"}

    rounds = fleet.service.registry.rounds(job)
    first, metadata = load_adapter(Path(rounds[0]["aggregate"]) / "adapter.safetensors")
    assert metadata["lora_r"] == 4 + 2 and next(t for n, t in first.items() if n.endswith("lora_A")).shape[0] == 6
    for task in fleet.service.registry.tasks(job, 2):  # round 2 started from the aggregate cut to each rank
        rank = 4 if task["device"] == "a" else 2
        start = Path(rounds[0]["aggregate"]).parent / "starts" / f"lora-r-{rank}-alpha-16.safetensors"
        assert task["metrics"]["start_adapter"] == sha256_file(start)
        assert task["metrics"]["adapter_options"]["r"] == rank
    assert all(r["evaluation"]["examples"] == 32 for r in rounds)
    assert fleet.service.refused == 0, list(fleet.service.rejections)
