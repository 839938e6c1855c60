"""A real PostgreSQL server for the registry tests: Debian's binaries, a throwaway cluster on a loopback port."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from coordinator.fleet.broker import free_port

USER = "fleet"


def _binaries() -> Path | None:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    return versions[-1].parent if versions else None


class Postgres:
    """`initdb` and `postgres` as an unprivileged user (PostgreSQL refuses root: as root, Debian's `postgres` user),
    with fsync off (a test cluster); `database(name)` makes an empty database and returns its URL."""

    def __init__(self) -> None:
        binaries = _binaries()
        if binaries is None:
            message = "PostgreSQL is not installed (apt-get install -y postgresql; `make test` does it where it can)"
            if os.environ.get("OFFSITE_EDGE_REQUIRE_POSTGRES"):
                pytest.fail(message)
            pytest.skip(message)
        self.binaries, self.port = binaries, free_port()
        self.root = Path(tempfile.mkdtemp(prefix="offsite-postgres-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.process: subprocess.Popen | None = None

    def _run(self, *command: str) -> None:
        done = subprocess.run([*self.as_user, *command], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")

    def start(self) -> Postgres:
        data = self.root / "data"
        initdb = str(self.binaries / "initdb")
        self._run(initdb, "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync")
        self.process = subprocess.Popen(
            [*self.as_user, str(self.binaries / "postgres"), "-D", str(data), "-p", str(self.port),
             "-k", str(self.root), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"],
            stdout=subprocess.DEVNULL, stderr=(self.root / "postgres.log").open("w"),
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                self._connect("postgres").close()
                return self
            except Exception:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"postgres did not start: {(self.root / 'postgres.log').read_text()}") from None
                time.sleep(0.1)

    def _connect(self, database: str):
        import psycopg

        return psycopg.connect(self.url(database), autocommit=True, connect_timeout=2)

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def database(self, name: str) -> str:
        with self._connect("postgres") as db:
            db.execute(f'DROP DATABASE IF EXISTS "{name}"')
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)
