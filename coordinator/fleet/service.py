"""`coordinator serve`: the fleet service. Exports bundles, sends signed jobs, collects results, runs FedAvg rounds."""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from coordinator.errors import ConfigError, DataError
from coordinator.fleet.jobs import JobSpec
from coordinator.fleet.registry import JOB_DONE, TASK_DONE, Registry
from coordinator.fleet.work import Workshop, check_result_adapter, finish_round, prepare_job, result_limit
from device_profiles import ProfileError
from edge_runtime.errors import OffsiteError, refusal
from edge_runtime.manifest import read_metrics
from edge_runtime.mqtt import BrokerAddress, Connection
from edge_runtime.records import RecordError, from_dict
from edge_runtime.trainer import ADAPTER, METRICS
from edge_runtime.transfer import Download, Outbox, offer_for, unpack_archive
from edge_runtime.wire import (
    Chunk,
    Done,
    Event,
    Job,
    Offer,
    Profile,
    Progress,
    Request,
    Status,
    Topics,
    WireError,
    decode,
)

log = logging.getLogger(__name__)
RESEND_SECONDS = 15.0  # a job not yet answered is sent again (freshly signed) this often
TICK_SECONDS = 0.5
KEPT_REJECTIONS = 100  # the latest refusals kept for `rejections`; `refused` counts them all


def wire_job_id(job: str, round_: int) -> str:
    return f"{job}-r{round_}"


def parse_wire_job_id(wire: str) -> tuple[str, int]:
    job, _, round_ = wire.rpartition("-r")
    if not job or not round_.isdigit():
        raise WireError(f"{wire!r} is not a fleet job id (JOB-rROUND)")
    return job, int(round_)


class FleetService:
    """Runs until `stop` is set; everything it must remember is in the registry and under `work`."""

    def __init__(self, registry: Registry, address: BrokerAddress, key_path: Path, work: Path, topics: Topics) -> None:
        from exporters.bundle import load_private_key

        self.registry = registry
        self.key = load_private_key(key_path)
        self.workshop = Workshop(registry, self.key, work)
        self.work = work
        self.topics = topics
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.outbox = Outbox()
        self.offers: dict[Path, Offer] = {}
        self.downloads: dict[str, Download] = {}
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleet-work")
        self.pending: dict[str, Future] = {}
        self.last_sent: dict[tuple[str, int, str], float] = {}
        self.traffic: dict[str, list[int]] = {}
        self.baseline: dict[tuple[str, int, str], list[int]] = {}
        self.rejections: collections.deque[str] = collections.deque(maxlen=KEPT_REJECTIONS)
        self.refused = 0
        channels = ("status", "profile", "events", "acks")
        subscriptions = [topics.all_devices(channel) for channel in channels] + [topics.all_devices("results/+")]
        self.connection = Connection(address, f"coordinator-{secrets.token_hex(3)}", subscriptions, self._queue)

    def _queue(self, topic: str, payload: bytes) -> None:
        self.inbox.put((topic, payload))

    def _count(self, device: str, sent: int = 0, received: int = 0) -> None:
        counters = self.traffic.setdefault(device, [0, 0])
        counters[0] += sent
        counters[1] += received

    def _publish(self, device: str, channel: str, payload: bytes) -> None:
        self._count(device, sent=len(payload))
        self.connection.publish(self.topics.device(device, channel), payload)

    def _reject(self, reason: str) -> None:
        log.warning("rejected: %s", reason)
        self.rejections.append(reason)
        self.refused += 1

    def _refuse(self, error: Exception, what: str) -> None:
        """Count any failure of handling `what` as a refusal; the service goes on serving (a handler is total)."""
        self._reject(refusal(error, what, log))

    # -- messages -------------------------------------------------------------------------------------------

    def _handle(self, topic: str, payload: bytes) -> None:
        device, channel, wire_job = self.topics.parse(topic)
        if channel in ("jobs", "transfer"):
            log.debug("ignoring %s: the coordinator's own channel", topic)  # amqtt echoes some back
            return
        self._count(device, received=len(payload))
        if Chunk.is_frame(payload):
            chunk = Chunk.decode(payload)
            if channel == "results" and (self.work / "incoming" / device / chunk.transfer).is_file():
                return  # a late duplicate of a result already complete (asked twice after a stall)
            if channel != "results" or chunk.transfer not in self.downloads:
                raise WireError(f"{device} sent a chunk of {chunk.transfer[:12]}…, which is not an expected result")
            self.downloads[chunk.transfer].receive(chunk)
            return
        record = decode(payload)
        if getattr(record, "device", device) != device:
            raise WireError(f"a {record.kind} record for {record.device!r} arrived on {device!r}'s topic")  # type: ignore[attr-defined]
        if isinstance(record, Status) and channel == "status":
            self.registry.device_status(device, record.state)
        elif isinstance(record, Profile) and channel == "profile":
            self.registry.device_profile(device, record.profile, record.datasets, record.backends)
        elif isinstance(record, Event) and channel == "events":
            self._on_event(device, record)
        elif isinstance(record, Request) and channel == "acks":
            for chunk in self.outbox.chunks(record.transfer, record.indices):
                self._publish(device, "transfer", chunk.encode())
        elif isinstance(record, Done) and channel == "acks":
            log.info("%s has %s… whole", device, record.transfer[:12])
        elif isinstance(record, Offer) and channel == "results" and wire_job is not None:
            self._on_result_offer(device, wire_job, record)
        else:
            raise WireError(f"a {record.kind} record does not belong on {channel}")

    def _task_of(self, device: str, wire_job: str) -> tuple[str, int, dict[str, Any]]:
        job, round_ = parse_wire_job_id(wire_job)
        task = self.registry.task(job, round_, device)
        if task is None:
            raise WireError(f"{device} reports on job {wire_job!r}, which was never sent to it")
        return job, round_, task

    def _on_event(self, device: str, event: Event) -> None:
        if event.event == "rejected" and not event.job:
            self._reject(f"{device} refused a message: {event.detail.get('reason')}")
            return
        job, round_, task = self._task_of(device, event.job)
        if task["state"] in TASK_DONE:
            return
        if event.event == "progress":
            try:
                progress = from_dict(Progress, event.detail, "progress event detail")
            except RecordError as error:
                raise WireError(f"{device}: {error}") from None
            log.info("%s %s: step %d/%d loss %.4f", device, event.job, progress.step, progress.steps, progress.loss)
            self.registry.set_task(job, round_, device, "training", **dataclasses.asdict(progress))
        elif event.event in ("rejected", "failed"):
            log.warning("%s skips %s: %s", device, event.job, event.detail.get("reason"))
            self.registry.set_task(job, round_, device, "skipped", reason=event.detail.get("reason", event.event))
        elif event.event in ("queued", "accepted", "trained"):
            log.info("%s %s: %s %s", device, event.job, event.event, event.detail or "")
            self.registry.set_task(job, round_, device, event.event, **event.detail)

    def _on_result_offer(self, device: str, wire_job: str, offer: Offer) -> None:
        job, round_, task = self._task_of(device, wire_job)
        if task["state"] == "received":  # already counted: just say so again
            self._publish(device, "transfer", Done(offer.transfer, True).encode())
            return
        if offer.transfer in self.downloads:
            return
        limit = result_limit(Path(task["bundle"]))
        if offer.size > limit:
            raise WireError(f"{device} offers a {offer.size:,}-byte result of {wire_job}; results are under {limit:,}")
        inbox = self.work / "incoming" / device

        def ask(indices: list[int]) -> None:
            self._publish(device, "transfer", Request(offer.transfer, indices).encode())

        def finished(path: Path) -> None:
            try:
                self._store_result(device, job, round_, path)
            except OffsiteError as error:  # arrived whole but unusable: skip this device's result, say so once
                self._reject(str(error))
                self.registry.set_task(job, round_, device, "skipped", reason=str(error))
            self._publish(device, "transfer", Done(offer.transfer, True).encode())

        log.info("%s offers its result of %s (%.1f MB)", device, wire_job, offer.size / 1e6)
        self.downloads[offer.transfer] = Download(offer, inbox, ask, finished)
        self.downloads[offer.transfer].start()

    def _store_result(self, device: str, job: str, round_: int, archive: Path) -> None:
        folder = unpack_archive(archive, self.work / "jobs" / job / f"round-{round_}" / device)
        metrics_file = folder / METRICS
        if not metrics_file.is_file():
            raise DataError(f"{device}'s result for {job} round {round_} has no {METRICS}")
        metrics = read_metrics(metrics_file.read_bytes(), f"{device}'s {METRICS}")
        expected = self.registry.job(job)["detail"].get("model_sha256")
        if metrics.model.sha256 != expected:
            raise DataError(f"{device}'s result for {job} round {round_} is not for this job's model")
        task = self.registry.task(job, round_, device) or {}
        check_result_adapter(folder / ADAPTER, Path(task["bundle"]), f"{device}'s result for {job} round {round_}")
        sent, received = self.traffic.get(device, [0, 0])
        start_sent, start_received = self.baseline.get((job, round_, device), [0, 0])
        self.registry.task_result(job, round_, device, folder, metrics, sent - start_sent, received - start_received)
        log.info("%s result of %s round %d stored (%d examples)", device, job, round_, metrics.examples)

    # -- jobs -----------------------------------------------------------------------------------------------

    def _offer(self, path: Path, name: str) -> Offer:
        if path not in self.offers:
            self.offers[path] = self.outbox.add(path, offer_for(path, name))
        return self.offers[path]

    def _send_job(self, job: str, round_: int, device: str) -> None:
        spec = JobSpec.from_dict(self.registry.job(job)["spec"])
        task = self.registry.task(job, round_, device)
        bundle = self._offer(Path(task["bundle"]), "bundle")
        start = None
        if round_ > 1:
            start = self._offer(
                self.work / "jobs" / job / f"round-{round_ - 1}" / "aggregate" / "adapter.safetensors", "adapter"
            )
        record = Job(
            wire_job_id(job, round_),
            device,
            round_,
            spec.dataset,
            spec.steps,
            dataclasses.asdict(bundle),
            dataclasses.asdict(start) if start else None,
            time.time(),
            secrets.token_hex(16),
        ).signed(self.key)
        self._publish(device, "jobs", record.encode())
        self.last_sent[(job, round_, device)] = time.monotonic()

    def _start_round(self, job: str, round_: int, bundles: dict[str, str]) -> None:
        self.registry.set_job(job, "running", round_)
        self.registry.set_round(job, round_, "running")
        for device, bundle in bundles.items():
            self.registry.add_task(job, round_, device, bundle)
            self.baseline[(job, round_, device)] = list(self.traffic.get(device, [0, 0]))
            self._send_job(job, round_, device)
        log.info("%s round %d sent to %s", job, round_, ", ".join(bundles))

    def _targets(self, spec: JobSpec) -> dict[str, dict[str, Any]]:
        devices = {d["id"]: d for d in self.registry.devices() if d["profile"]}
        chosen = spec.devices or [d for d, row in devices.items() if row["state"] != "offline"]
        unknown = [d for d in chosen if d not in devices]
        if unknown:
            raise ConfigError(f"devices {unknown} never announced a profile; `coordinator fleet devices` lists them")
        lacking = [d for d in chosen if spec.dataset not in (devices[d]["datasets"] or {})]
        if lacking:
            raise ConfigError(f"devices {lacking} have no dataset named {spec.dataset!r}")
        if not chosen:
            raise ConfigError(f"no online device has dataset {spec.dataset!r}; start `edge-runtime run` on one")
        return {d: devices[d] for d in chosen}

    def _on_work_done(self, job: str, future: Future) -> None:
        try:
            outcome = future.result()
        except (OffsiteError, ProfileError) as error:
            log.error("%s failed: %s", job, error)
            self.registry.set_job(job, "failed", reason=str(error))
            return
        except Exception as error:  # a bug in one job's export or evaluation must not stop the service
            log.exception("%s failed unexpectedly", job)
            self.registry.set_job(job, "failed", reason=f"internal error: {error!r}")
            return
        kind = outcome.pop("kind")
        if kind == "prepared":
            self.registry.set_job(job, "running", model_sha256=outcome["model_sha256"])
            self._start_round(job, 1, outcome["bundles"])
            return
        round_, rounds = outcome["round"], outcome["rounds"]
        self.registry.set_round(job, round_, "done", outcome["aggregate"], outcome["evaluation"])
        log.info("%s round %d aggregated over %d devices: %s", job, round_, outcome["devices"], outcome["evaluation"])
        if round_ < rounds:
            bundles = {t["device"]: t["bundle"] for t in self.registry.tasks(job, round_) if t["state"] == "received"}
            self._start_round(job, round_ + 1, bundles)
        else:
            self.registry.set_job(job, "done", round_, aggregate=outcome["aggregate"])

    def _tick(self) -> None:
        for job in self.registry.jobs("pending"):
            try:
                spec = JobSpec.from_dict(job["spec"])
                targets = self._targets(spec)
            except (ConfigError, RecordError) as error:
                self.registry.set_job(job["id"], "failed", reason=str(error))
                continue
            self.registry.set_job(job["id"], "preparing", devices=sorted(targets))
            self.pending[job["id"]] = self.worker.submit(prepare_job, self.workshop, job["id"], spec, targets)
        for job_id, future in list(self.pending.items()):
            if future.done():
                self.pending.pop(job_id)
                self._on_work_done(job_id, future)
        for job in self.registry.jobs("running"):
            round_ = job["round"]
            tasks = self.registry.tasks(job["id"], round_)
            for task in tasks:
                key = (job["id"], round_, task["device"])
                if task["state"] == "sent" and time.monotonic() - self.last_sent.get(key, 0) > RESEND_SECONDS:
                    self._send_job(job["id"], round_, task["device"])
            if tasks and all(task["state"] in TASK_DONE for task in tasks):
                if not any(task["state"] == "received" for task in tasks):
                    self.registry.set_job(job["id"], "failed", reason=f"every device skipped round {round_}")
                    continue
                self.registry.set_job(job["id"], "aggregating")
                spec = JobSpec.from_dict(job["spec"])
                self.pending[job["id"]] = self.worker.submit(finish_round, self.workshop, job["id"], round_, spec)
        for transfer, download in list(self.downloads.items()):
            try:
                download.tick()
            except Exception as error:  # counted and logged by _refuse
                self._refuse(error, f"transfer {transfer[:12]}…")
            if download.done:
                self.downloads.pop(transfer)

    def _resume(self) -> None:
        """After a restart: jobs cut off while preparing or aggregating start that step again."""
        for job in self.registry.jobs():
            if job["state"] in ("preparing", "aggregating"):
                self.registry.set_job(job["id"], "pending" if job["state"] == "preparing" else "running")

    def step(self, wait: float = TICK_SECONDS) -> None:
        deadline = time.monotonic() + wait
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                topic, payload = self.inbox.get(timeout=remaining)
            except queue.Empty:
                break
            try:
                self._handle(topic, payload)
            except Exception as error:  # every handler is total: counted, logged, refused
                self._refuse(error, f"a message on {topic[:200]!r}")
        self._tick()

    def run(self, stop: threading.Event) -> None:
        self._resume()
        self.connection.start()
        log.info("coordinator connected to %s (%s)", self.connection.address, self.connection.protocol_name)
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.worker.shutdown(wait=False, cancel_futures=True)
            self.connection.close()

    def jobs_done(self) -> bool:
        return all(job["state"] in JOB_DONE for job in self.registry.jobs())
