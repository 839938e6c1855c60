"""Liveness and durability: a round goes on without a silent device after its deadline (or fails below quorum), one
service per state folder, a job's files appear whole, and registry updates do not lose each other's fields."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from coordinator.errors import ConfigError
from coordinator.fleet.broker import free_port
from coordinator.fleet.registry import Registry
from coordinator.fleet.service import lock_state
from device_profiles import load_profile
from edge_runtime.backends import installed_backends
from edge_runtime.daemon import DaemonConfig, EdgeDaemon
from edge_runtime.mqtt import BrokerAddress
from exporters.bundle import load_private_key
from tests.fleet.conftest import Amqtt, tiny_spec, wait_for


def _silent_device(fleet, device: str) -> None:
    """A device that announced itself (enrolled, profile, dataset) and then never answers."""
    fleet.enroll(device)
    fleet.service.registry.device_profile(device, load_profile("laptop-16gb").to_dict(), {"reviews": 24},
                                          installed_backends())  # fmt: skip


def test_a_round_goes_on_without_a_silent_device_after_its_deadline(make_fleet, tmp_path) -> None:
    broker = Amqtt(tmp_path / "broker").start()
    try:
        fleet = make_fleet(broker)
        fleet.start_service()
        fleet.start_daemon("a")
        _silent_device(fleet, "b")
        registry = fleet.service.registry
        job = registry.add_job(tiny_spec(fleet.files, rounds=1, devices=["a", "b"], deadline_s=25.0))
        wait_for(lambda: registry.job(job)["state"] in ("done", "failed"), 120, "the round past its deadline")
        assert registry.job(job)["state"] == "done", registry.job(job)["detail"]
        states = {t["device"]: (t["state"], t["detail"].get("reason")) for t in registry.tasks(job)}
        assert states == {"a": ("received", None), "b": ("skipped", "no result within the round's 25 s deadline")}

        strict = registry.add_job(tiny_spec(fleet.files, rounds=1, devices=["a", "b"], deadline_s=1.0, quorum=2))
        wait_for(lambda: registry.job(strict)["state"] in ("done", "failed"), 60, "the strict job to give up")
        assert registry.job(strict)["state"] == "failed"
        assert "devices answered round 1; the job needs 2 (--quorum)" in registry.job(strict)["detail"]["reason"]
    finally:
        broker.kill()


def test_a_second_service_on_the_same_state_folder_is_refused(tmp_path: Path) -> None:
    held = lock_state(tmp_path / "state")
    with pytest.raises(ConfigError, match=r"another `coordinator serve` \(pid \d+\) is serving"):
        lock_state(tmp_path / "state")
    other = subprocess.run(  # another process too (flock is per open file, across processes)
        [sys.executable, "-c", "import sys; from coordinator.fleet.service import lock_state; from pathlib import "
         f"Path; lock_state(Path({str(tmp_path / 'state')!r}))"], capture_output=True, text=True,
    )  # fmt: skip
    assert other.returncode != 0 and "is serving" in other.stderr
    del held
    lock_state(tmp_path / "state")  # free again once the first is gone


def test_workers_share_a_state_folder_that_a_single_service_holds_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    workers = [lock_state(state, shared=True), lock_state(state, shared=True)]
    with pytest.raises(ConfigError, match="only when each runs with --worker"):
        lock_state(state)
    del workers
    single = lock_state(state)
    with pytest.raises(ConfigError, match="is serving"):
        lock_state(state, shared=True)
    del single


def test_concurrent_task_updates_keep_every_field(tmp_path: Path) -> None:
    """Read-then-write in one transaction: threads merging different detail fields into one task lose none."""
    registry = Registry(tmp_path / "state")
    job = registry.add_job({"dataset": "reviews"})
    registry.add_task(job, 1, "a", "bundle.tar")

    def update(index: int) -> None:
        for step in range(20):
            registry.set_task(job, 1, "a", "training", **{f"field_{index}_{step}": step})

    threads = [threading.Thread(target=update, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(registry.task(job, 1, "a")["detail"]) == 80


def test_a_job_folder_appears_with_its_state_or_not_at_all(fleet_files, tmp_path) -> None:
    """A crash between writing job.json and state.json killed the daemon on every re-send; now both appear at once,
    and a folder half made (a crash inside the write) is never read as a job."""
    from tests.security.test_hostile_messages import _job

    config = DaemonConfig(
        "a", load_profile("laptop-16gb"), {"reviews": fleet_files["a"]}, fleet_files["trust"], tmp_path / "device"
    )
    daemon = EdgeDaemon(config, BrokerAddress("127.0.0.1", free_port()))
    for folder in (daemon.jobs_dir, daemon.bundles_dir, daemon.downloads_dir):
        folder.mkdir(parents=True, exist_ok=True)
    half = daemon.jobs_dir / ".job-0-r1.abc.tmp"
    half.mkdir()
    (half / "job.json").write_text("{}")  # what a crash inside the write leaves
    daemon.inbox.put(("offsite/devices/a/jobs", _job(load_private_key(fleet_files["key"]))))
    daemon.step(wait=0.05)
    folder = daemon.jobs_dir / "job-1-r1"
    assert json.loads((folder / "job.json").read_text())["job"] == "job-1-r1"
    assert json.loads((folder / "state.json").read_text())["state"] in ("downloading", "failed")
    assert daemon._next_job() in (None, "job-1-r1")  # never the half-made folder
