"""A split job through the fleet over Mosquitto: signed split bundles, the service's split server, devices training
in their isolated processes (one on ONNX Runtime, one on PyTorch), a broker restart mid-round, the prompts
aggregated and plugged in."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coordinator.cli import main as coordinator_main
from coordinator.errors import ConfigError
from coordinator.fleet.dashboard_data import job_view
from coordinator.fleet.jobs import JobSpec
from coordinator.fleet.work import split_server
from coordinator.split.job import SplitJob
from device_profiles import load_profile
from edge_runtime.bundle import ADAPTER_FILE, verify_bundle
from tests.fleet.conftest import tiny_spec, wait_for

PROMPT_NAME = "model.soft_prompt"


def _split_spec(files: dict[str, Path], **change: object) -> dict[str, object]:
    return tiny_spec(files, adapter_kind="prompt:tokens=2", steps=8, checkpoint_every=4, **change) | {
        "split": {"cut_after": 2}
    }


def test_a_split_job_survives_a_broker_restart_mid_round_and_its_prompt_plugs_in(
    mosquitto, make_fleet, monkeypatch
) -> None:
    from coordinator.fleet import service

    builds = []  # each copy of the server's layers the service makes
    monkeypatch.setattr(service, "split_server", lambda *args: builds.append(args) or split_server(*args))
    fleet = make_fleet(mosquitto)
    registry = fleet.service.registry
    fleet.start_service()
    fleet.start_daemon("a")  # a laptop: the device side on ONNX Runtime
    fleet.start_daemon("b", profile=load_profile("jetson-orin-nano-8gb"))  # no ONNX Runtime training: PyTorch
    job = registry.add_job(_split_spec(fleet.files))

    def answered() -> int:
        host = fleet.service.split_hosts.hosts.get(job)
        return host.service.server.answered if host is not None and host.round == 1 else 0

    wait_for(lambda: answered() >= 6, 180, "round 1's third split exchange")  # of 2 devices x 8 steps x 2 answers
    mosquitto.kill()  # mid-round, mid-epoch; down longer than a device waits before asking again
    threading.Timer(3.0, mosquitto.start).start()
    wait_for(lambda: registry.job(job)["state"] in ("done", "failed"), 300, f"{job} to finish")
    record = registry.job(job)
    assert record["state"] == "done", record["detail"]

    tasks = registry.tasks(job)
    assert [(t["round"], t["device"], t["state"]) for t in tasks] == [
        (r, d, "received") for r in (1, 2) for d in ("a", "b")
    ]
    assert sum(t["metrics"]["split"]["asked_again"] for t in tasks if t["round"] == 1) >= 1  # the restart was felt
    for task in tasks:
        split = task["metrics"]["split"]
        assert (split["exchanges"], split["samples"]) == (8, 64)
        assert split["bytes_up"] > 0 and split["bytes_down"] > 0
        assert task["metrics"]["adapter_kind"] == "prompt"
        assert task["metrics"]["backend"] == {"a": "ort", "b": "torch"}[task["device"]]
    assert len(builds) == 1  # one server side served both rounds
    shown = job_view(registry, job)["rounds_detail"][1]["tasks"][0]["ran"]  # what the dashboard shows of a's run
    assert shown["split_bytes_up"] == tasks[2]["metrics"]["split"]["bytes_up"] and shown["cut_epsilon"] is None

    for task in tasks[:2]:
        manifest = verify_bundle(Path(task["bundle"]).parent / "bundle", fleet.files["trust"])
        assert manifest.split is not None and manifest.split.cut_after == 2 and manifest.plan.shape.layers == 2
        assert manifest.plan.predicted["logits"] == 0  # the head never ships, nor do the layers after the cut
    bundle = Path(tasks[0]["bundle"]).parent / "bundle"

    rounds = registry.rounds(job)
    start = load_file(str(bundle / ADAPTER_FILE))[PROMPT_NAME]
    results = {t["device"]: load_file(Path(t["result"]) / "adapter.safetensors") for t in tasks if t["round"] == 1}
    assert set(results["a"]) == {PROMPT_NAME}
    assert not torch.allclose(results["a"][PROMPT_NAME], start)  # the prompt trained
    aggregate = load_file(Path(rounds[0]["aggregate"]) / "adapter.safetensors")[PROMPT_NAME]
    torch.testing.assert_close(aggregate, (40 * results["a"][PROMPT_NAME] + 24 * results["b"][PROMPT_NAME]) / 64)
    assert all(r["evaluation"]["examples"] == 32 for r in rounds)  # each aggregate scored plugged into the model
    assert all(t["metrics"]["start_adapter"] for t in tasks if t["round"] == 2)  # round 2 from round 1's prompt
    assert fleet.service.refused == 0, list(fleet.service.rejections)
    wait_for(lambda: not fleet.service.split_hosts.hosts, 10, "the split server to close with the job")


def test_a_split_job_asks_for_what_its_device_side_trains(fleet_files) -> None:
    with pytest.raises(ConfigError, match="soft prompt"):
        JobSpec.from_dict(tiny_spec(fleet_files, adapter_kind="lora:r=2") | {"split": {"cut_after": 2}})
    with pytest.raises(ConfigError, match="--per-device"):
        JobSpec.from_dict(_split_spec(fleet_files, per_device=True))
    with pytest.raises(ConfigError, match="at least one layer"):
        SplitJob(0)


def test_dispatch_refuses_split_options_without_a_split(fleet_files, tmp_path, capsys) -> None:
    arguments = ["fleet", "dispatch", "--dataset", "reviews", "--model", str(fleet_files["model"]),
                 "--prune-fraction", "0.3", "--state", str(tmp_path)]  # fmt: skip
    assert coordinator_main(arguments) == 2
    assert "--split-after" in capsys.readouterr().err
