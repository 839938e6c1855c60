"""The fleet registry: devices, federated jobs, each device's task per round, each round's aggregate, and the
service workers sharing them. In a SQLite file (the default) or on a PostgreSQL server (`--registry`)."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

from coordinator.errors import ConfigError
from coordinator.fleet.database import FOR_UPDATE, Run, open_database
from edge_runtime.manifest import ResultMetrics

# The same on both databases: DOUBLE PRECISION (PostgreSQL's REAL holds a time to the minute), BIGINT for bytes.
SCHEMA = """
CREATE TABLE IF NOT EXISTS enrolled (
    device TEXT PRIMARY KEY, public_key TEXT NOT NULL, enrolled DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, profile TEXT, datasets TEXT, backends TEXT,
    last_seen DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, spec TEXT NOT NULL, state TEXT NOT NULL, round INTEGER NOT NULL, detail TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL, updated DOUBLE PRECISION NOT NULL, owner TEXT
);
CREATE TABLE IF NOT EXISTS tasks (
    job TEXT NOT NULL, round INTEGER NOT NULL, device TEXT NOT NULL, state TEXT NOT NULL, detail TEXT NOT NULL,
    bundle TEXT, result TEXT, metrics TEXT, examples INTEGER, bytes_sent BIGINT NOT NULL DEFAULT 0,
    bytes_received BIGINT NOT NULL DEFAULT 0, started DOUBLE PRECISION NOT NULL, finished DOUBLE PRECISION,
    sent_at DOUBLE PRECISION, receiver TEXT, PRIMARY KEY (job, round, device)
);
CREATE TABLE IF NOT EXISTS rounds (
    job TEXT NOT NULL, round INTEGER NOT NULL, state TEXT NOT NULL, aggregate TEXT, evaluation TEXT,
    finished DOUBLE PRECISION, PRIMARY KEY (job, round)
);
CREATE INDEX IF NOT EXISTS tasks_by_device ON tasks (device, state);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, started DOUBLE PRECISION NOT NULL,
    heartbeat DOUBLE PRECISION NOT NULL
);
"""
# Columns a SQLite registry written by an earlier version lacks (PostgreSQL registries are made with them).
ADDED_COLUMNS = (("jobs", "owner", "TEXT"), ("tasks", "sent_at", "DOUBLE PRECISION"), ("tasks", "receiver", "TEXT"))
TASK_DONE = ("received", "skipped")
JOB_DONE = ("done", "failed")
_OPEN_TASK = "state NOT IN ('received', 'skipped')"
_JSON_COLUMNS = ("profile", "datasets", "backends", "spec", "detail", "metrics", "evaluation")
HEARTBEAT_SECONDS = 2.0  # a service worker says it is alive this often (and looks for silent workers' jobs)
WORKER_TIMEOUT_SECONDS = 15.0  # a worker silent this long is gone: its jobs and result downloads are taken over
# Traffic counted within this long after a task finished is still its own (the last chunks, the acknowledgement).
TRAFFIC_GRACE_SECONDS = 5.0


def default_state_directory() -> Path:
    return Path.home() / ".local" / "state" / "offsite-edge" / "fleet"


def _row(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    for column in _JSON_COLUMNS:
        if isinstance(row.get(column), str):
            row[column] = json.loads(row[column])
    return row


def _alive(column: str) -> str:
    """SQL: `column` names a worker whose heartbeat is later than the statement's last parameter."""
    return f"({column} IS NOT NULL AND {column} IN (SELECT id FROM workers WHERE heartbeat > ?))"


class Registry:
    """Thread-safe access to the registry; every read-then-write is one transaction, so several service workers
    (threads or processes, on one machine with SQLite or on several with PostgreSQL) can share it.

    registry = Registry(Path("state"))                                  # state/fleet.sqlite3
    registry = Registry(Path("state"), "postgresql://fleet@db:5432/fleet")
    """

    def __init__(self, state: Path, url: str | None = None) -> None:
        self.db = open_database(state, url)
        self.db.create(SCHEMA, ADDED_COLUMNS)

    def _exec(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return [_row(row) for row in self.db.run(sql, *args)[0]]  # type: ignore[misc]

    @staticmethod
    def _one(run: Run, sql: str, *args: Any) -> dict[str, Any] | None:
        rows, _ = run(sql, *args)
        return _row(rows[0]) if rows else None

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
        return self.db.run("DELETE FROM enrolled WHERE device = ?", device)[1] > 0

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

    def device_heard(self, device: str) -> None:
        """`device` sent a signed record just now: it is alive, whatever its last status said when."""
        self._exec("UPDATE devices SET last_seen = ? WHERE id = ?", time.time(), device)

    def devices(self) -> list[dict[str, Any]]:
        return self._exec("SELECT * FROM devices ORDER BY id")

    def device(self, device: str) -> dict[str, Any] | None:
        rows = self._exec("SELECT * FROM devices WHERE id = ?", device)
        return rows[0] if rows else None

    # service workers: each one's heartbeat says it is alive; what a silent one held, another takes over
    def heartbeat(self, worker: str, host: str, pid: int) -> None:
        now = time.time()
        self._exec(
            "INSERT INTO workers VALUES (?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET heartbeat = excluded.heartbeat",
            worker,
            host,
            pid,
            now,
            now,
        )

    def workers(self) -> list[dict[str, Any]]:
        return self._exec("SELECT * FROM workers ORDER BY started")

    def reclaim(self, alive_after: float) -> list[str]:
        """Jobs whose owner's last heartbeat is not after `alive_after` go back a step (preparing → pending,
        aggregating → running) for any worker to take up again; the job ids (math.inf: every owner is gone)."""
        alive_after = min(alive_after, 1e300)  # a float both databases take
        with self.db.transaction() as run:
            rows, _ = run(
                f"SELECT id FROM jobs WHERE state IN ('preparing', 'aggregating') AND NOT {_alive('owner')}"
                + FOR_UPDATE,
                alive_after,
            )
            for row in rows:
                run(
                    "UPDATE jobs SET state = CASE state WHEN 'preparing' THEN 'pending' ELSE 'running' END, "
                    "owner = NULL, updated = ? WHERE id = ?",
                    time.time(),
                    row["id"],
                )
        return [row["id"] for row in rows]

    # jobs
    def add_job(self, spec: dict[str, Any]) -> str:
        job = f"job-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        now = time.time()
        self._exec(
            "INSERT INTO jobs (id, spec, state, round, detail, created, updated) "
            "VALUES (?, ?, 'pending', 0, '{}', ?, ?)",
            job,
            json.dumps(spec),
            now,
            now,
        )
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

    def _update_job(
        self,
        run: Run,
        job: str,
        state: str,
        detail: dict[str, Any],
        round_: int | None = None,
        owner: str | None = None,
        condition: tuple[str, ...] = ("1 = 1",),
    ) -> bool:
        """Set a job's state, round, owner and (merged) detail if the SQL `condition[0]` (its parameters after it)
        holds; whether it did."""
        where, *args = condition
        current = self._one(run, f"SELECT round, detail FROM jobs WHERE id = ? AND {where}" + FOR_UPDATE, job, *args)
        if current is None:
            return False
        run(
            "UPDATE jobs SET state = ?, round = ?, owner = ?, detail = ?, updated = ? WHERE id = ?",
            state,
            current["round"] if round_ is None else round_,
            owner,
            json.dumps(current["detail"] | detail),
            time.time(),
            job,
        )
        return True

    def set_job(self, job: str, state: str, round_: int | None = None, **detail: Any) -> None:
        """Set a job's state whatever it was (the operator's lever; the service claims and fails instead)."""
        with self.db.transaction() as run:
            changed = self._update_job(run, job, state, detail, round_)
        if not changed:
            self.job(job)  # raises the clear error for an unknown job

    def claim_job(self, job: str, expected: str, state: str, owner: str, **detail: Any) -> bool:
        """Move `job` from `expected` to `state`, owned by `owner`, unless another worker moved it first."""
        with self.db.transaction() as run:
            return self._update_job(run, job, state, detail, owner=owner, condition=("state = ?", expected))

    def fail_job(self, job: str, reason: str, owner: str | None = None) -> bool:
        """Fail a job not yet done or failed; with `owner`, only while that worker holds it (a worker whose job was
        taken over leaves it alone)."""
        where = "state NOT IN ('done', 'failed')" + (" AND owner = ?" if owner else "")
        condition = (where, owner) if owner else (where,)
        with self.db.transaction() as run:
            return self._update_job(run, job, "failed", {"reason": reason}, condition=condition)  # type: ignore[arg-type]

    def start_round(
        self,
        job: str,
        round_: int,
        bundles: dict[str, str],
        owner: str,
        expected: str,
        detail: dict[str, Any] | None = None,
        finished: tuple[Path, Any] | None = None,
    ) -> bool:
        """As one unit, if `owner` still holds `job` in state `expected`: record the finished previous round
        (`finished` = its aggregate and evaluation), and start round `round_` with a task per device (its bundle).
        False: another worker took the job over, and this one's work is dropped."""
        with self.db.transaction() as run:
            condition = ("state = ? AND owner = ?", expected, owner)
            if not self._update_job(run, job, "running", detail or {}, round_, None, condition):
                return False
            if finished is not None:
                self._finish_round(run, job, round_ - 1, *finished)
            self._put_round(run, job, round_, "running", None, None, None)
            for device, bundle in bundles.items():
                self._insert_task(run, job, round_, device, bundle)
        return True

    def finish_job(self, job: str, round_: int, owner: str, aggregate: Path, evaluation: Any) -> bool:
        """As one unit, if `owner` still holds `job` aggregating: its last round and the job are done."""
        with self.db.transaction() as run:
            condition = ("state = 'aggregating' AND owner = ?", owner)
            if not self._update_job(run, job, "done", {"aggregate": str(aggregate)}, round_, None, condition):
                return False
            self._finish_round(run, job, round_, aggregate, evaluation)
        return True

    # tasks
    @staticmethod
    def _insert_task(run: Run, job: str, round_: int, device: str, bundle: str) -> None:
        """A task just sent (a second insert of it changes nothing)."""
        now = time.time()
        run(
            "INSERT INTO tasks (job, round, device, state, detail, bundle, started, sent_at) "
            "VALUES (?, ?, ?, 'sent', '{}', ?, ?, ?) ON CONFLICT DO NOTHING",
            *(job, round_, device, bundle, now, now),
        )

    def add_task(self, job: str, round_: int, device: str, bundle: str) -> None:
        self._insert_task(self.db.run, job, round_, device, bundle)

    def tasks(self, job: str, round_: int | None = None) -> list[dict[str, Any]]:
        if round_ is None:
            return self._exec("SELECT * FROM tasks WHERE job = ? ORDER BY round, device", job)
        return self._exec("SELECT * FROM tasks WHERE job = ? AND round = ? ORDER BY device", job, round_)

    def open_tasks(self, device: str) -> list[dict[str, Any]]:
        """`device`'s tasks not yet received or skipped, in running jobs."""
        return self._exec(
            f"SELECT tasks.* FROM tasks JOIN jobs ON jobs.id = tasks.job AND jobs.round = tasks.round "
            f"WHERE tasks.device = ? AND tasks.{_OPEN_TASK} AND jobs.state IN ('running', 'aggregating')",
            device,
        )

    def task(self, job: str, round_: int, device: str) -> dict[str, Any] | None:
        rows = self._exec("SELECT * FROM tasks WHERE job = ? AND round = ? AND device = ?", job, round_, device)
        return rows[0] if rows else None

    def set_task(self, job: str, round_: int, device: str, state: str, **detail: Any) -> bool:
        """Move an open task on (merging `detail`); a received or skipped task stays as it is. Whether it moved."""
        key = (job, round_, device)
        with self.db.transaction() as run:
            current = self._one(
                run,
                f"SELECT detail FROM tasks WHERE job = ? AND round = ? AND device = ? AND {_OPEN_TASK}" + FOR_UPDATE,
                *key,
            )
            if current is None:
                return False
            finished = time.time() if state in TASK_DONE else None
            run(
                "UPDATE tasks SET state = ?, detail = ?, finished = ? WHERE job = ? AND round = ? AND device = ?",
                state,
                json.dumps(current["detail"] | detail),
                finished,
                *key,
            )
        return True

    def _change_task(self, key: tuple, assignments: str, values: tuple, condition: str, *condition_values: Any) -> bool:
        """Set one task's `assignments` (SQL, with `values`) if `condition` holds (SQL); whether it did."""
        sql = f"UPDATE tasks SET {assignments} WHERE job = ? AND round = ? AND device = ? AND {condition}"
        return self.db.run(sql, *values, *key, *condition_values)[1] > 0

    def claim_resend(self, job: str, round_: int, device: str, every: float) -> bool:
        """Whether this worker sends `device` its job again now: still unanswered and last sent over `every` s ago."""
        now = time.time()
        condition = "state = 'sent' AND (sent_at IS NULL OR sent_at < ?)"
        return self._change_task((job, round_, device), "sent_at = ?", (now,), condition, now - every)

    def claim_receiver(self, job: str, round_: int, device: str, worker: str, alive_after: float) -> bool:
        """Whether `worker` fetches `device`'s result: nobody else is, or the one who was has gone silent."""
        condition = f"{_OPEN_TASK} AND (receiver = ? OR NOT {_alive('receiver')})"
        return self._change_task((job, round_, device), "receiver = ?", (worker,), condition, worker, alive_after)

    def task_result(self, job: str, round_: int, device: str, result: Path, metrics: ResultMetrics) -> bool:
        """Count `device`'s result, once: False when the task was already received or skipped."""
        values = (str(result), json.dumps(metrics.to_dict()), metrics.examples, time.time())
        assignments = "state = 'received', result = ?, metrics = ?, examples = ?, finished = ?"
        return self._change_task((job, round_, device), assignments, values, _OPEN_TASK)

    def add_traffic(self, traffic: dict[str, tuple[int, int]]) -> None:
        """Bytes (sent, received) each device's messages took, added to its open tasks (and to those finished within
        TRAFFIC_GRACE_SECONDS: the result's last chunks and its acknowledgement)."""
        recent = time.time() - TRAFFIC_GRACE_SECONDS
        with self.db.transaction() as run:
            for device, (sent, received) in traffic.items():
                run(
                    "UPDATE tasks SET bytes_sent = bytes_sent + ?, bytes_received = bytes_received + ? "
                    f"WHERE device = ? AND ({_OPEN_TASK} OR finished > ?)",
                    sent,
                    received,
                    device,
                    recent,
                )

    def device_results(self, device: str, limit: int = 5) -> list[dict[str, Any]]:
        """`device`'s latest received results, newest first."""
        return self._exec(
            "SELECT * FROM tasks WHERE device = ? AND state = 'received' ORDER BY finished DESC LIMIT ?", device, limit
        )

    def received_privacy(self) -> list[dict[str, Any]]:
        """Every received result's device and the ε its training spent (None: trained without DP)."""
        rows = self._exec("SELECT device, metrics FROM tasks WHERE state = 'received' ORDER BY finished")
        return [{"device": r["device"], "epsilon": ((r["metrics"] or {}).get("privacy") or {}).get("epsilon")}
                for r in rows]  # fmt: skip

    # rounds
    @staticmethod
    def _put_round(run: Run, job: str, round_: int, state: str, aggregate: Any, evaluation: Any, done: Any) -> None:
        run(
            "INSERT INTO rounds (job, round, state, aggregate, evaluation, finished) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(job, round) DO UPDATE SET state = excluded.state, aggregate = excluded.aggregate, "
            "evaluation = excluded.evaluation, finished = excluded.finished",
            job,
            round_,
            state,
            aggregate,
            evaluation,
            done,
        )

    def _finish_round(self, run: Run, job: str, round_: int, aggregate: Path, evaluation: Any) -> None:
        self._put_round(run, job, round_, "done", str(aggregate), json.dumps(evaluation), time.time())

    def rounds(self, job: str) -> list[dict[str, Any]]:
        return self._exec("SELECT * FROM rounds WHERE job = ? ORDER BY round", job)
