"""The fleet service's split servers: one per running split job, for its current round, on a connection of its own.

A split job's devices exchange every step with the server half of the model (`coordinator/split/serve.py`).
The service builds that half on its worker thread once per job (a copy of the layers after the cut and the
head), serves each round with a `SplitService` that hears only the round's devices, by the keys the operator
enrolled, and closes it when the round stops running (aggregating, done or failed).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.fleet.jobs import JobSpec
from coordinator.fleet.registry import JOB_DONE, Registry
from coordinator.split.serve import CutLimits, SplitServer, SplitService
from edge_runtime.errors import OffsiteError
from edge_runtime.identity import parse_public_key
from edge_runtime.mqtt import BrokerAddress
from edge_runtime.records import RecordError
from edge_runtime.wire import Topics

log = logging.getLogger(__name__)


@dataclass
class _Host:
    round: int
    service: SplitService


class SplitHosts:
    """Starts and stops the split servers of the running split jobs; `build(spec)` returns a future of the job's
    (server side, label token ids), run where the service's models live."""

    def __init__(self, registry: Registry, address: BrokerAddress, key: Ed25519PrivateKey, topics: Topics,
                 build: Callable[[JobSpec], Future]) -> None:  # fmt: skip
        self.registry, self.address, self.key, self.topics, self.build = registry, address, key, topics, build
        self.hosts: dict[str, _Host] = {}
        self.sides: dict[str, Future] = {}

    def tick(self, running: list[dict[str, Any]], wire_job: Callable[[str, int], str]) -> dict[str, str]:
        """Serve each running split job's current round; stop serving the rest. Returns the jobs whose server
        could not start, with why (the service fails them)."""
        serving = {job["id"]: job for job in running if job["spec"].get("split")}
        for job_id in [j for j in self.hosts if j not in serving or self.hosts[j].round != serving[j]["round"]]:
            self.hosts.pop(job_id).service.close()
        for job_id in [j for j in self.sides if j not in serving]:
            if self.registry.job(job_id)["state"] in JOB_DONE:  # kept while a round aggregates: the next is served
                del self.sides[job_id]  # by the same server side, not a second copy of the later layers
        failed = {}
        for job_id, job in serving.items():
            if job_id not in self.hosts:
                try:
                    self._start(job, wire_job(job_id, job["round"]))
                except (OffsiteError, RecordError) as error:
                    failed[job_id] = f"its split server did not start: {error}"
                except Exception as error:  # a bug in one job's server must not stop the service
                    log.exception("%s: the split server failed to start", job_id)
                    failed[job_id] = f"its split server did not start: internal error {error!r}"
        return failed

    def _start(self, job: dict[str, Any], wire_job: str) -> None:
        spec = JobSpec.from_dict(job["spec"])
        if job["id"] not in self.sides:  # built once per job (setdefault would ask again on every tick)
            self.sides[job["id"]] = self.build(spec)
        built = self.sides[job["id"]]
        if not built.done():
            return
        server, label_token_ids = built.result()
        devices = [task["device"] for task in self.registry.tasks(job["id"], job["round"])]
        keys = {d: parse_public_key(self.registry.enrolled_key(d) or "", f"{d}'s enrolled key") for d in devices}
        tokens = spec.bundle.adapter().tokens  # type: ignore[attr-defined]
        hidden = server.backbone.config.hidden_size
        limits = CutLimits(spec.bundle.training.batch_size, tokens + spec.bundle.training.max_length, hidden,
                           len(label_token_ids))  # fmt: skip
        split = SplitServer(server, label_token_ids, wire_job, self.key, keys, limits, self.topics)
        client_id = f"coordinator-split-{secrets.token_hex(3)}"
        self.hosts[job["id"]] = _Host(job["round"], SplitService(split, self.address, client_id).start())
        log.info("%s: serving the split layers for %s", wire_job, ", ".join(devices))

    def close(self) -> None:
        for host in self.hosts.values():
            host.service.close()
        self.hosts.clear()
