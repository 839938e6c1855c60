"""The fleet registry in SQLite: devices, federated jobs, each device's task per round, and each round's aggregate."""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from coordinator.errors import ConfigError
from edge_runtime.manifest import ResultMetrics

SCHEMA = """
CREATE TABLE IF NOT EXISTS enrolled (
    device TEXT PRIMARY KEY, public_key TEXT NOT NULL, enrolled REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, profile TEXT, datasets TEXT, backends TEXT, last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, spec TEXT NOT NULL, state TEXT NOT NULL, round INTEGER NOT NULL, detail TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    job TEXT NOT NULL, round INTEGER NOT NULL, device TEXT NOT NULL, state TEXT NOT NULL, detail TEXT NOT NULL,
    bundle TEXT, result TEXT, metrics TEXT, examples INTEGER, bytes_sent INTEGER NOT NULL DEFAULT 0,
    bytes_received INTEGER NOT NULL DEFAULT 0, started REAL NOT NULL, finished REAL,
    PRIMARY KEY (job, round, device)
);
CREATE TABLE IF NOT EXISTS rounds (
    job TEXT NOT NULL, round INTEGER NOT NULL, state TEXT NOT NULL, aggregate TEXT, evaluation TEXT,
    finished REAL, PRIMARY KEY (job, round)
);
"""
TASK_DONE = ("received", "skipped")
JOB_DONE = ("done", "failed")
_JSON_COLUMNS = ("profile", "datasets", "backends", "spec", "detail", "metrics", "evaluation")


def default_state_directory() -> Path:
    return Path.home() / ".local" / "state" / "offsite-edge" / "fleet"


def _row(row: sqlite3.Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    record = dict(row)
    for column in _JSON_COLUMNS:
        if isinstance(record.get(column), str):
            record[column] = json.loads(record[column])
    return record


class Registry:
    """Thread-safe access to `state/fleet.sqlite3` (WAL: the fleet commands read while `serve` writes)."""

    def __init__(self, state: Path) -> None:
        state.mkdir(parents=True, exist_ok=True)
        self.path = state / "fleet.sqlite3"
        self.lock = threading.Lock()
        self.db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def _exec(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        with self.lock:
            rows = self.db.execute(sql, args).fetchall()
        return [_row(row) for row in rows]  # type: ignore[misc]

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One read-then-write as a unit: this process's other threads wait on the lock, other processes (the fleet
        commands, a second worker) on SQLite's write lock, taken at the start (BEGIN IMMEDIATE)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    # enrolment: the operator's record of each device's public key
    def enroll(self, device: str, public_key_pem: str) -> None:
        self._exec(
            "INSERT INTO enrolled VALUES (?, ?, ?) ON CONFLICT(device) DO UPDATE SET "
            "public_key = excluded.public_key, enrolled = excluded.enrolled",
            device,
            public_key_pem,
            time.time(),
        )

    def enrolled_key(self, device: str) -> str | None:
        rows = self._exec("SELECT public_key FROM enrolled WHERE device = ?", device)
        return rows[0]["public_key"] if rows else None

    def unenroll(self, device: str) -> bool:
        with self._transaction() as db:
            return db.execute("DELETE FROM enrolled WHERE device = ?", (device,)).rowcount > 0

    # devices
    def device_status(self, device: str, state: str) -> None:
        self._exec(
            "INSERT INTO devices (id, state, last_seen) VALUES (?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET state = excluded.state, last_seen = excluded.last_seen",
            device,
            state,
            time.time(),
        )

    def device_profile(self, device: str, profile: dict, datasets: dict, backends: list) -> None:
        self._exec(
            "INSERT INTO devices (id, state, profile, datasets, backends, last_seen) VALUES (?, 'online', ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET profile = excluded.profile, datasets = excluded.datasets, "
            "backends = excluded.backends, last_seen = excluded.last_seen",
            device,
            json.dumps(profile),
            json.dumps(datasets),
            json.dumps(backends),
            time.time(),
        )

    def devices(self) -> list[dict[str, Any]]:
        return self._exec("SELECT * FROM devices ORDER BY id")

    def device(self, device: str) -> dict[str, Any] | None:
        rows = self._exec("SELECT * FROM devices WHERE id = ?", device)
        return rows[0] if rows else None

    # jobs
    def add_job(self, spec: dict[str, Any]) -> str:
        job = f"job-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        now = time.time()
        self._exec("INSERT INTO jobs VALUES (?, ?, 'pending', 0, '{}', ?, ?)", job, json.dumps(spec), now, now)
        return job

    def job(self, job: str) -> dict[str, Any]:
        rows = self._exec("SELECT * FROM jobs WHERE id = ?", job)
        if not rows:
            known = ", ".join(row["id"] for row in self.jobs()[-5:]) or "none yet"
            raise ConfigError(f"no fleet job {job!r} (latest: {known}); list them with `coordinator fleet status`")
        return rows[0]

    def jobs(self, state: str | None = None) -> list[dict[str, Any]]:
        if state is None:
            return self._exec("SELECT * FROM jobs ORDER BY created")
        return self._exec("SELECT * FROM jobs WHERE state = ? ORDER BY created", state)

    def set_job(self, job: str, state: str, round_: int | None = None, **detail: Any) -> None:
        with self._transaction() as db:
            current = _row(db.execute("SELECT round, detail FROM jobs WHERE id = ?", (job,)).fetchone())
            if current is not None:
                round_ = current["round"] if round_ is None else round_
                db.execute(
                    "UPDATE jobs SET state = ?, round = ?, detail = ?, updated = ? WHERE id = ?",
                    (state, round_, json.dumps(current["detail"] | detail), time.time(), job),
                )
        if current is None:
            self.job(job)  # raises the clear error for an unknown job (outside the lock it takes again)

    # tasks
    def add_task(self, job: str, round_: int, device: str, bundle: str) -> None:
        self._exec(
            "INSERT OR IGNORE INTO tasks (job, round, device, state, detail, bundle, started) "
            "VALUES (?, ?, ?, 'sent', '{}', ?, ?)",
            job,
            round_,
            device,
            bundle,
            time.time(),
        )

    def tasks(self, job: str, round_: int | None = None) -> list[dict[str, Any]]:
        if round_ is None:
            return self._exec("SELECT * FROM tasks WHERE job = ? ORDER BY round, device", job)
        return self._exec("SELECT * FROM tasks WHERE job = ? AND round = ? ORDER BY device", job, round_)

    def task(self, job: str, round_: int, device: str) -> dict[str, Any] | None:
        rows = self._exec("SELECT * FROM tasks WHERE job = ? AND round = ? AND device = ?", job, round_, device)
        return rows[0] if rows else None

    def set_task(self, job: str, round_: int, device: str, state: str, **detail: Any) -> None:
        key = (job, round_, device)
        with self._transaction() as db:
            current = _row(
                db.execute("SELECT detail FROM tasks WHERE job = ? AND round = ? AND device = ?", key).fetchone()
            )
            if current is None:
                return
            finished = time.time() if state in TASK_DONE else None
            db.execute(
                "UPDATE tasks SET state = ?, detail = ?, finished = ? WHERE job = ? AND round = ? AND device = ?",
                (state, json.dumps(current["detail"] | detail), finished, *key),
            )

    def task_result(
        self, job: str, round_: int, device: str, result: Path, metrics: ResultMetrics, sent: int, received: int
    ) -> None:
        self._exec(
            "UPDATE tasks SET state = 'received', result = ?, metrics = ?, examples = ?, bytes_sent = ?, "
            "bytes_received = ?, finished = ? WHERE job = ? AND round = ? AND device = ?",
            str(result),
            json.dumps(metrics.to_dict()),
            metrics.examples,
            sent,
            received,
            time.time(),
            job,
            round_,
            device,
        )

    def device_results(self, device: str, limit: int = 5) -> list[dict[str, Any]]:
        """`device`'s latest received results, newest first."""
        return self._exec(
            "SELECT * FROM tasks WHERE device = ? AND state = 'received' ORDER BY finished DESC LIMIT ?", device, limit
        )

    # rounds
    def set_round(self, job: str, round_: int, state: str, aggregate: Path | None = None, evaluation=None) -> None:
        self._exec(
            "INSERT INTO rounds (job, round, state, aggregate, evaluation, finished) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(job, round) DO UPDATE SET state = excluded.state, aggregate = excluded.aggregate, "
            "evaluation = excluded.evaluation, finished = excluded.finished",
            job,
            round_,
            state,
            str(aggregate) if aggregate else None,
            json.dumps(evaluation) if evaluation is not None else None,
            time.time() if state == "done" else None,
        )

    def rounds(self, job: str) -> list[dict[str, Any]]:
        return self._exec("SELECT * FROM rounds WHERE job = ? ORDER BY round", job)
