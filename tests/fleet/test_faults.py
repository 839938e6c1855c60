"""Faults: the broker killed mid-transfer, a daemon killed mid-training; each job still completes, counted once. A
failure the device reports while the broker is away still reaches the service."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from edge_runtime import transfer
from tests.fleet.conftest import tiny_spec, wait_for


def test_broker_restart_in_the_middle_of_a_result_transfer(mosquitto, make_fleet, monkeypatch) -> None:
    monkeypatch.setattr(transfer, "STALL_SECONDS", 1.0)
    receive = transfer.Download.receive

    def slow_link(self: transfer.Download, chunk: object) -> None:  # ~25 ms per chunk: time to cut the broker
        time.sleep(0.025)
        receive(self, chunk)

    monkeypatch.setattr(transfer.Download, "receive", slow_link)
    fleet = make_fleet(mosquitto)
    fleet.start_service()
    fleet.start_daemon("a", chunk_bytes=1024)
    fleet.start_daemon("b", chunk_bytes=1024)
    job = fleet.service.registry.add_job(tiny_spec(fleet.files, rounds=1))
    incoming = fleet.root / "coordinator" / "files" / "incoming"
    wait_for(lambda: len(list(incoming.glob("*/.*.parts/*"))) >= 10, 60, "a result transfer under way")
    mosquitto.kill()
    unfinished = [t["device"] for t in fleet.service.registry.tasks(job) if t["state"] != "received"]
    time.sleep(1.5)
    mosquitto.start()
    wait_for(lambda: fleet.service.registry.job(job)["state"] in ("done", "failed"), 120, "the job to finish")

    registry = fleet.service.registry
    assert registry.job(job)["state"] == "done"
    tasks = registry.tasks(job)
    assert [(t["device"], t["state"]) for t in tasks] == [("a", "received"), ("b", "received")]
    assert unfinished, "the broker was cut only after every result had arrived"
    results = {t["device"]: load_file(Path(t["result"]) / "adapter.safetensors") for t in tasks}
    aggregate = load_file(Path(registry.rounds(job)[0]["aggregate"]) / "adapter.safetensors")
    for name, tensor in aggregate.items():  # each result counted once: weights 40 and 24
        torch.testing.assert_close(tensor, (40 * results["a"][name] + 24 * results["b"][name]) / 64)


def _daemon_process(fleet, device: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "edge_runtime.cli",
        "run",
        "--broker",
        f"mqtt://127.0.0.1:{fleet.broker.port}",
        "--device-id",
        device,
        "--profile",
        "laptop-16gb",
        "--dataset",
        f"reviews={fleet.files[device]}",
        "--trust",
        str(fleet.files["trust"]),
        "--state",
        str(fleet.root / f"device-{device}"),
        "--threads",
        "1",
    ]
    environment = os.environ | {"OFFSITE_EDGE_MQTT_PASSWORD": f"{device}-secret"}
    return subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_daemon_killed_mid_training_resumes_and_completes(mosquitto, make_fleet) -> None:
    fleet = make_fleet(mosquitto)
    registry = fleet.service.registry
    fleet.start_service()
    fleet.enroll("a")
    process = _daemon_process(fleet, "a")
    try:
        wait_for(lambda: (registry.device("a") or {}).get("profile"), 60, "the daemon to announce itself")
        job = registry.add_job(tiny_spec(fleet.files, rounds=1, steps=1500, checkpoint_every=100, devices=["a"]))

        def step() -> int:
            tasks = registry.tasks(job)
            return tasks[0]["detail"].get("step", 0) if tasks else 0

        wait_for(lambda: step() >= 300, 120, "training past step 300")
        process.kill()
        process.wait()
        killed_at = step()
        wait_for(lambda: registry.device("a")["state"] == "offline", 30, "the Last Will to mark the device offline")
        process = _daemon_process(fleet, "a")
        wait_for(lambda: registry.job(job)["state"] in ("done", "failed"), 180, "the job to finish")
    finally:
        process.kill()
        process.wait()
    assert registry.job(job)["state"] == "done", registry.job(job)["detail"]
    metrics = registry.tasks(job)[0]["metrics"]
    assert metrics["steps"] == 1500
    assert 100 <= metrics["resumed_from_step"] <= killed_at + 100  # resumed from a checkpoint, not from scratch


def test_a_service_restarted_in_the_middle_of_a_bundle_download_completes_the_job(
    mosquitto, make_fleet, monkeypatch
) -> None:
    """The new service offers the running round's files again, so the device's pending chunk requests are answered."""
    import threading

    from coordinator.fleet import service as service_module
    from coordinator.fleet.registry import Registry
    from coordinator.fleet.service import FleetService
    from edge_runtime.wire import Topics

    monkeypatch.setattr(transfer, "STALL_SECONDS", 1.0)
    small = service_module.offer_for
    monkeypatch.setattr(service_module, "offer_for", lambda path, name: small(path, name, chunk_bytes=4096))
    receive = transfer.Download.receive

    def slow_link(self: transfer.Download, chunk: object) -> None:  # ~10 ms per 4 KiB chunk: a download of seconds
        time.sleep(0.01)
        receive(self, chunk)

    monkeypatch.setattr(transfer.Download, "receive", slow_link)
    fleet = make_fleet(mosquitto)
    first_stop = threading.Event()
    first = threading.Thread(target=fleet.service.run, args=(first_stop,), daemon=True)
    first.start()
    wait_for(fleet.service.connection.connected.is_set, 30, "the first service to connect")
    fleet.start_daemon("a")
    job = fleet.service.registry.add_job(tiny_spec(fleet.files, rounds=1, devices=["a"]))
    downloads = fleet.root / "device-a" / "downloads"
    wait_for(lambda: len(list(downloads.glob(".*.parts/*"))) >= 20, 60, "the bundle download under way")
    first_stop.set()
    first.join(timeout=30)
    whole = [path for path in downloads.iterdir() if path.is_file() and not path.name.startswith(".")]
    assert not whole, "the bundle arrived whole before the service stopped"
    second = FleetService(
        Registry(fleet.root / "coordinator"),
        mosquitto.address("coordinator"),
        fleet.files["key"],
        fleet.root / "coordinator" / "files",
        Topics(),
    )
    fleet._thread(second.run, "second service")
    wait_for(lambda: second.registry.job(job)["state"] in ("done", "failed"), 120, "the job after the restart")
    assert second.registry.job(job)["state"] == "done", second.registry.job(job)["detail"]


def test_a_failure_reported_while_the_broker_is_away_still_reaches_the_service(mosquitto, make_fleet, monkeypatch):
    from edge_runtime import daemon
    from edge_runtime.errors import OffsiteError

    broker_down = threading.Event()

    def fails_while_the_broker_is_away(*arguments: object) -> None:
        broker_down.wait(60)
        raise OffsiteError("the disk is full")

    monkeypatch.setattr(daemon, "train_bundle", fails_while_the_broker_is_away)
    fleet = make_fleet(mosquitto)
    fleet.start_service()
    fleet.start_daemon("a", isolate=False)
    registry = fleet.service.registry
    job = registry.add_job(tiny_spec(fleet.files, rounds=1))
    wait_for(lambda: (registry.task(job, 1, "a") or {}).get("state") == "accepted", 60, "a to accept the job")
    mosquitto.kill()
    broker_down.set()
    wait_for(lambda: daemon_state(fleet, job) == "failed", 30, "the job to fail on the device")
    mosquitto.start()  # the event went out while the broker was away: lost with it, and sent again on reconnect
    wait_for(lambda: registry.job(job)["state"] == "failed", 60, "the service to hear of it")
    assert registry.task(job, 1, "a")["state"] == "skipped"
    assert "the disk is full" in registry.task(job, 1, "a")["detail"]["reason"]


def daemon_state(fleet, job: str) -> str | None:
    path = fleet.root / "device-a" / "jobs" / f"{job}-r1" / "state.json"
    return json.loads(path.read_text())["state"] if path.exists() else None
