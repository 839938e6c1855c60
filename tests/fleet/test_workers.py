"""Two `coordinator serve --worker` processes behind Mosquitto's shared subscriptions, one killed mid-round."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from edge_runtime.daemon import EdgeDaemon
from edge_runtime.wire import Chunk
from tests.fleet.conftest import tiny_spec, wait_for

DEVICES = ("a", "b", "c")


def start_worker(fleet, registry_url: str | None, log: Path) -> subprocess.Popen:
    """A real worker process on the fleet's state folder and registry, which another worker takes over from 5 s
    after it falls silent."""
    command = [
        sys.executable, "-m", "coordinator.cli", "serve", "--worker", "--worker-timeout", "5",
        "--broker", f"mqtt://127.0.0.1:{fleet.broker.port}", "--username", "coordinator",
        "--state", str(fleet.root / "coordinator"), "--key", str(fleet.files["key"]),
    ] + (["--registry", registry_url] if registry_url else [])  # fmt: skip
    environment = os.environ | {"OFFSITE_EDGE_MQTT_PASSWORD": "coordinator-secret"}
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=environment)


def test_two_workers_one_killed_mid_round_finish_the_job_counting_each_result_once(
    mosquitto, make_fleet, registry_url, monkeypatch, tmp_path: Path
) -> None:
    publish = EdgeDaemon._publish

    def slow_uplink(self, channel: str, payload: bytes, job: str | None = None, retain: bool = False) -> None:
        if channel == "results" and Chunk.is_frame(payload):  # a result takes seconds to arrive: time to kill
            time.sleep(0.01)
        publish(self, channel, payload, job, retain)

    monkeypatch.setattr(EdgeDaemon, "_publish", slow_uplink)
    fleet = make_fleet(mosquitto, registry_url)
    registry = fleet.service.registry  # the shared registry; this service object never runs
    logs = [tmp_path / "worker-1.log", tmp_path / "worker-2.log"]
    workers = [start_worker(fleet, registry_url, log) for log in logs]
    try:
        wait_for(lambda: len(registry.workers()) == 2, 120, "both workers to start")
        for device in DEVICES:
            fleet.start_daemon(device, chunk_bytes=512)
        job = registry.add_job(tiny_spec(fleet.files, devices=list(DEVICES)))

        def receiving() -> dict | None:
            """A round-1 task whose result one worker has begun to fetch (some chunks on disk), not yet whole."""
            for task in registry.tasks(job, 1):
                incoming = fleet.root / "coordinator" / "files" / "incoming" / task["device"]
                if task["receiver"] and task["state"] != "received" and len(list(incoming.glob(".*.parts/0*"))) >= 8:
                    return task
            return None

        wait_for(receiving, 180, "a worker fetching a result")
        task = receiving()
        assert task is not None
        victim = next(w for w in registry.workers() if w["id"] == task["receiver"])
        os.kill(victim["pid"], signal.SIGKILL)
        killed = next(w for w in workers if w.pid == victim["pid"])
        killed.wait(timeout=10)
        wait_for(lambda: registry.job(job)["state"] in ("done", "failed"), 240, "the job after the kill")
    finally:
        for worker in workers:
            worker.terminate()
            worker.wait(timeout=30)
    record = registry.job(job)
    assert record["state"] == "done", record["detail"]
    survivor = next(w for w in registry.workers() if w["id"] != victim["id"])
    assert registry.task(job, 1, task["device"])["receiver"] == survivor["id"]  # it took the download over
    assert [(r["round"], r["state"]) for r in registry.rounds(job)] == [(1, "done"), (2, "done")]
    text = "".join(log.read_text() for log in logs)
    for round_ in (1, 2):
        tasks = registry.tasks(job, round_)
        assert [(t["device"], t["state"]) for t in tasks] == [(d, "received") for d in DEVICES], record
        aggregate = fleet.root / "coordinator" / "files" / "jobs" / job / f"round-{round_}" / "aggregate"
        metrics = json.loads((aggregate / "metrics.json").read_text())
        assert metrics["aggregate"]["devices"] == len(DEVICES)
        assert metrics["examples"] == sum(t["examples"] for t in tasks)  # every result in it, none twice
        assert text.count(f"{job} round {round_} aggregated") == 1, text[-4000:]


def test_a_worker_needs_an_mqtt5_broker_of_its_own(tmp_path: Path, capsys) -> None:
    from coordinator.cli import main as coordinator

    assert coordinator(["serve", "--worker", "--state", str(tmp_path)]) != 0
    assert "--worker needs --broker" in capsys.readouterr().err


def test_a_registry_outage_costs_the_service_a_tick_not_its_life(tmp_path: Path, fleet_files, monkeypatch) -> None:
    from coordinator.fleet.database import RegistryUnavailable
    from coordinator.fleet.registry import Registry
    from coordinator.fleet.service import FleetService
    from edge_runtime.mqtt import BrokerAddress
    from edge_runtime.wire import Topics

    registry = Registry(tmp_path / "state")
    service = FleetService(registry, BrokerAddress("127.0.0.1", 1), fleet_files["key"], tmp_path / "files", Topics())
    job = registry.add_job(tiny_spec(fleet_files, devices=["nobody"]))
    jobs = registry.jobs
    outage = iter([True, False])

    def flaky(state: str | None = None) -> list:
        if next(outage, False):
            raise RegistryUnavailable("the registry at postgresql://db:5432/fleet is unavailable: server closed")
        return jobs(state)

    monkeypatch.setattr(registry, "jobs", flaky)
    service.step(wait=0.01)  # the outage: logged, the tick skipped
    service.step(wait=0.01)  # the next tick sees the job (and fails it: no such device)
    assert registry.job(job)["state"] == "failed"
    assert "never announced a profile" in registry.job(job)["detail"]["reason"]
