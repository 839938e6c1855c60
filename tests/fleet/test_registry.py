"""The registry's state machine on both databases: one worker claims each step, a silent one's are taken back,
a round finishes once, a result counts once."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from coordinator.errors import ConfigError
from coordinator.fleet.registry import Registry
from edge_runtime.manifest import (
    RESULT_FORMAT,
    RESULT_SCHEMA,
    EmulatorRecord,
    ModelRecord,
    ResultMetrics,
)

LATER = 1e12  # an `alive_after` no heartbeat is after: every worker counts as silent


def device_run(examples: int) -> ResultMetrics:
    """The metrics of a device's 10-step run on `examples` examples (the registry keeps them whole)."""
    return ResultMetrics(
        RESULT_FORMAT,
        RESULT_SCHEMA,
        ModelRecord("tiny", "0" * 64, 4),
        EmulatorRecord("uniform", 4, [0, 2, 3], 1, 1),
        "onnxruntime",
        steps=10,
        samples=80,
        examples=examples,
        first_loss=2.0,
        final_loss=1.0,
        loss_curve=[2.0, 1.0],
        wall_seconds=3.0,
        peak_memory_bytes=2**20,
    )


def two_workers(tmp_path: Path, url: str | None) -> tuple[Registry, Registry]:
    """Two connections to one registry, as two worker processes have; both workers alive."""
    first, second = Registry(tmp_path, url), Registry(tmp_path, url)
    first.heartbeat("w1", "host", 1)
    second.heartbeat("w2", "host", 2)
    return first, second


def test_one_worker_prepares_a_job_and_a_silent_one_loses_it(tmp_path: Path, registry_url: str | None) -> None:
    w1, w2 = two_workers(tmp_path, registry_url)
    job = w1.add_job({"dataset": "reviews"})
    assert w1.claim_job(job, "pending", "preparing", "w1", devices=["a", "b"])
    assert not w2.claim_job(job, "pending", "preparing", "w2")
    assert w2.reclaim(time.time() - 15) == []  # w1 is alive
    assert w2.reclaim(LATER) == [job]  # w1 fell silent: the job goes back to pending, unowned
    assert (w2.job(job)["state"], w2.job(job)["owner"]) == ("pending", None)
    assert w2.claim_job(job, "pending", "preparing", "w2")
    assert not w1.start_round(job, 1, {"a": "bundle-a"}, "w1", "preparing")  # w1's late work is dropped
    assert w2.start_round(job, 1, {"a": "bundle-a", "b": "bundle-b"}, "w2", "preparing", detail={"model": "m"})
    record = w1.job(job)
    assert (record["state"], record["round"], record["owner"]) == ("running", 1, None)
    assert record["detail"] == {"devices": ["a", "b"], "model": "m"}
    assert [(t["device"], t["state"], t["bundle"]) for t in w1.tasks(job, 1)] == [
        ("a", "sent", "bundle-a"),
        ("b", "sent", "bundle-b"),
    ]
    assert [(r["round"], r["state"]) for r in w1.rounds(job)] == [(1, "running")]


def test_a_round_is_finished_once(tmp_path: Path, registry_url: str | None) -> None:
    w1, w2 = two_workers(tmp_path, registry_url)
    job = w1.add_job({})
    assert w1.claim_job(job, "pending", "preparing", "w1")
    assert w1.start_round(job, 1, {"a": "bundle"}, "w1", "preparing")
    assert w2.claim_job(job, "running", "aggregating", "w2")
    assert not w1.claim_job(job, "running", "aggregating", "w1")
    finished = (tmp_path / "round-1" / "adapter", {"accuracy": 0.75})
    assert w2.start_round(job, 2, {"a": "bundle"}, "w2", "aggregating", finished=finished)
    assert not w2.start_round(job, 2, {"a": "bundle"}, "w2", "aggregating", finished=finished)  # not twice
    rounds = w1.rounds(job)
    assert [(r["round"], r["state"]) for r in rounds] == [(1, "done"), (2, "running")]
    assert rounds[0]["evaluation"] == {"accuracy": 0.75} and rounds[0]["finished"] > 0
    assert w1.claim_job(job, "running", "aggregating", "w1")
    assert not w2.finish_job(job, 2, "w2", tmp_path / "round-2", {"accuracy": 0.8})  # w1 holds it now
    assert w1.finish_job(job, 2, "w1", tmp_path / "round-2", {"accuracy": 0.8})
    assert not w1.finish_job(job, 2, "w1", tmp_path / "round-2", {"accuracy": 0.8})
    assert (w2.job(job)["state"], w2.job(job)["detail"]["aggregate"]) == ("done", str(tmp_path / "round-2"))
    assert not w2.fail_job(job, "too late")  # a done job stays done
    assert w2.job(job)["state"] == "done"


def test_a_result_counts_once_and_a_finished_task_stays_finished(tmp_path: Path, registry_url: str | None) -> None:
    w1, w2 = two_workers(tmp_path, registry_url)
    job = w1.add_job({})
    w1.add_task(job, 1, "a", "bundle")
    metrics = device_run(examples=40)
    assert w1.set_task(job, 1, "a", "training", step=3)
    assert w1.task_result(job, 1, "a", tmp_path / "a", metrics)
    assert not w2.task_result(job, 1, "a", tmp_path / "a-again", metrics)
    assert not w2.set_task(job, 1, "a", "skipped", reason="deadline")  # a worker that read it open too late
    task = w1.task(job, 1, "a")
    assert (task["state"], task["result"], task["examples"], task["detail"]) == (
        "received",
        str(tmp_path / "a"),
        40,
        {"step": 3},
    )


def test_one_worker_resends_a_job_and_one_fetches_a_result(tmp_path: Path, registry_url: str | None) -> None:
    w1, w2 = two_workers(tmp_path, registry_url)
    job = w1.add_job({})
    w1.add_task(job, 1, "a", "bundle")
    assert not w1.claim_resend(job, 1, "a", every=15)  # just sent
    time.sleep(0.6)
    assert w1.claim_resend(job, 1, "a", every=0.5)
    assert not w2.claim_resend(job, 1, "a", every=0.5)  # the other worker has just sent it
    assert w1.claim_receiver(job, 1, "a", "w1", alive_after=time.time() - 15)
    assert w1.claim_receiver(job, 1, "a", "w1", alive_after=time.time() - 15)  # its own again
    assert not w2.claim_receiver(job, 1, "a", "w2", alive_after=time.time() - 15)
    assert w2.claim_receiver(job, 1, "a", "w2", alive_after=LATER)  # w1 fell silent
    assert w2.task(job, 1, "a")["receiver"] == "w2"


def test_traffic_adds_up_on_open_and_just_finished_tasks(tmp_path: Path, registry_url: str | None) -> None:
    w1, w2 = two_workers(tmp_path, registry_url)
    job = w1.add_job({})
    for device in ("a", "b"):
        w1.add_task(job, 1, device, "bundle")
    w1.add_traffic({"a": (100, 10), "b": (5, 5)})
    w2.add_traffic({"a": (1, 2)})
    w1.set_task(job, 1, "a", "skipped", reason="gone")
    w2.add_traffic({"a": (1000, 0)})  # within the grace after it finished
    assert [(t["bytes_sent"], t["bytes_received"]) for t in w1.tasks(job, 1)] == [(1101, 12), (5, 5)]


def test_racing_workers_claim_a_step_exactly_once(tmp_path: Path, registry_url: str | None) -> None:
    registries = [Registry(tmp_path, registry_url) for _ in range(6)]
    job = registries[0].add_job({})
    start = threading.Barrier(len(registries))
    won: list[str] = []

    def claim(index: int) -> None:
        start.wait()
        if registries[index].claim_job(job, "pending", "preparing", f"w{index}"):
            won.append(f"w{index}")

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(registries))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and registries[0].job(job)["owner"] == won[0]


def test_a_registry_written_before_workers_gains_their_columns(tmp_path: Path) -> None:
    """A SQLite registry from an earlier version (no owner, sent_at, receiver) opens, keeps its rows and claims."""
    old = sqlite3.connect(tmp_path / "fleet.sqlite3")
    old.executescript(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, spec TEXT NOT NULL, state TEXT NOT NULL, round INTEGER NOT NULL, "
        "detail TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);"
        "CREATE TABLE tasks (job TEXT NOT NULL, round INTEGER NOT NULL, device TEXT NOT NULL, state TEXT NOT NULL, "
        "detail TEXT NOT NULL, bundle TEXT, result TEXT, metrics TEXT, examples INTEGER, bytes_sent INTEGER NOT NULL "
        "DEFAULT 0, bytes_received INTEGER NOT NULL DEFAULT 0, started REAL NOT NULL, finished REAL, "
        "PRIMARY KEY (job, round, device));"
        "INSERT INTO jobs VALUES ('job-old', '{}', 'aggregating', 1, '{}', 1.0, 1.0);"
    )
    old.close()
    registry = Registry(tmp_path)
    assert registry.reclaim(LATER) == ["job-old"]  # cut off while aggregating by the old service
    assert registry.claim_job("job-old", "running", "aggregating", "w1")
    registry.add_task("job-old", 1, "a", "bundle")
    assert registry.claim_receiver("job-old", 1, "a", "w1", alive_after=0)


def test_a_bad_registry_url_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not postgresql://USER@HOST:PORT/DATABASE"):
        Registry(tmp_path, "mysql://db/fleet")


def test_an_unreachable_registry_server_is_a_clear_error(tmp_path: Path, postgres_server) -> None:
    from coordinator.fleet.broker import free_port

    with pytest.raises(ConfigError, match=r"cannot open the registry at postgresql://127.0.0.1:\d+/fleet"):
        Registry(tmp_path, f"postgresql://fleet@127.0.0.1:{free_port()}/fleet")


def test_fleet_status_names_the_workers_and_the_silent_one(tmp_path: Path, registry_url: str | None) -> None:
    from coordinator.fleet.cli import format_status

    w1, _ = two_workers(tmp_path, registry_url)
    w1.db.run("UPDATE workers SET heartbeat = ? WHERE id = 'w2'", time.time() - 60)
    job = w1.add_job({"dataset": "reviews", "rounds": 2})
    w1.claim_job(job, "pending", "preparing", "w1")
    status = format_status(w1, None)
    assert f"{job}  preparing by w1" in status
    assert status.endswith("service workers: w1 (alive), w2 (silent 60 s)")


def test_a_lost_registry_server_is_a_clear_error_and_the_next_statement_reconnects(
    tmp_path: Path, postgres_server
) -> None:
    from coordinator.fleet.database import RegistryUnavailable

    registry = Registry(tmp_path, postgres_server.database("fleet_reconnect"))
    job = registry.add_job({})
    (row,), _ = registry.db.run("SELECT pg_backend_pid() AS pid")
    Registry(tmp_path, postgres_server.url("fleet_reconnect")).db.run("SELECT pg_terminate_backend(?)", row["pid"])
    lost = r"registry at postgresql://127\.0\.0\.1:\d+/fleet_reconnect is unavailable"
    with pytest.raises(RegistryUnavailable, match=lost):
        registry.jobs()
    assert [j["id"] for j in registry.jobs()] == [job]
