"""`coordinator serve`: the fleet service. Exports bundles, sends signed jobs, collects results, runs FedAvg rounds."""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import logging
import math
import os
import queue
import secrets
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from coordinator.errors import ConfigError, DataError
from coordinator.fleet.database import RegistryUnavailable
from coordinator.fleet.jobs import JobSpec
from coordinator.fleet.registry import HEARTBEAT_SECONDS, JOB_DONE, TASK_DONE, WORKER_TIMEOUT_SECONDS, Registry
from coordinator.fleet.split_hosts import SplitHosts
from coordinator.fleet.work import (
    Workshop,
    check_result_adapter,
    finish_round,
    prepare_job,
    result_limit,
    split_server,
    start_adapter,
)
from device_profiles import ProfileError
from edge_runtime.errors import OffsiteError, refusal
from edge_runtime.identity import parse_public_key
from edge_runtime.manifest import read_metrics
from edge_runtime.mqtt import BrokerAddress, Connection
from edge_runtime.records import RecordError, from_dict
from edge_runtime.trainer import ADAPTER, METRICS, bundle_id
from edge_runtime.transfer import Download, Outbox, offer_for, sha256_file, store_shared_chunk, unpack_archive
from edge_runtime.wire import (
    Chunk,
    Done,
    Event,
    Job,
    Offer,
    Profile,
    Progress,
    Record,
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
SHARED_GROUP = "coordinators"  # the MQTT 5 shared subscription group the workers of one prefix form
HEARD_SECONDS = 5.0  # a device's last_seen is moved on by its signed records at most this often (one write)


def lock_state(state: Path, shared: bool = False) -> object:
    """Hold `state/serve.lock` for as long as the returned handle lives: one service per state folder (two would
    send every job twice and race on the files), or any number of `shared` workers (`serve --worker`)."""
    state.mkdir(parents=True, exist_ok=True)
    handle = (state / "serve.lock").open("a+")
    try:
        fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "?"
        handle.close()
        raise ConfigError(f"another `coordinator serve` (pid {owner}) is serving {state}; stop it or pass another "
                          "--state (services share one only when each runs with --worker)") from None  # fmt: skip
    if not shared:  # a worker does not: the pid shown is the single service's, or a worker's that came first
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
    return handle


def wire_job_id(job: str, round_: int) -> str:
    return f"{job}-r{round_}"


def parse_wire_job_id(wire: str) -> tuple[str, int]:
    job, _, round_ = wire.rpartition("-r")
    if not job or not round_.isdigit():
        raise WireError(f"{wire!r} is not a fleet job id (JOB-rROUND)")
    return job, int(round_)


class FleetService:
    """Runs until `stop` is set; everything it must remember is in the registry and under `work`.

    With `shared`, it is one of several workers: the broker hands each device message to one of them (an MQTT 5
    shared subscription), they share the registry and `work`, and each step of a job (preparing, a round's
    aggregation) is claimed in the registry by one worker and taken over when that worker falls silent for
    `worker_timeout` seconds.
    """

    def __init__(
        self,
        registry: Registry,
        address: BrokerAddress,
        key_path: Path,
        work: Path,
        topics: Topics,
        shared: bool = False,
        worker_timeout: float = WORKER_TIMEOUT_SECONDS,
    ) -> None:
        from exporters.bundle import load_private_key

        self.registry = registry
        self.key = load_private_key(key_path)
        self.workshop = Workshop(registry, self.key, work)
        self.work = work
        self.topics = topics
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.outbox = Outbox()
        self.offers: dict[Path, Offer] = {}
        self.offered_to: dict[str, set[str]] = {}  # transfer → the devices that were sent a job naming it
        self.device_keys: dict[str, Any] = {}  # enrolled PEM → its parsed key
        self.downloads: dict[str, Download] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleet-work")
        self.pending: dict[str, Future] = {}
        self.unflushed: dict[str, list[int]] = {}  # bytes sent and received per device, not yet in the registry
        self.shared, self.worker_timeout = shared, worker_timeout
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self.last_heartbeat = -math.inf
        self.configurations: dict[str, dict[str, Any]] = {}  # per-device jobs' choices: fixed once prepared
        self.rejections: collections.deque[str] = collections.deque(maxlen=KEPT_REJECTIONS)
        self.refused = 0
        self.rejections_lock = threading.Lock()  # the dashboard reads them from its own threads
        self.heard: dict[str, float] = {}  # when each device's last_seen was last written
        # Every worker hears status and profile (retained, which a shared subscription is not sent); one hears each
        # of the rest.
        split = f"$share/{topics.prefix.replace('/', '-')}-{SHARED_GROUP}/" if shared else ""
        subscriptions = [topics.all_devices("status"), topics.all_devices("profile")] + [
            split + topics.all_devices(channel) for channel in ("events", "acks", "results/+")
        ]
        self.connected_again = threading.Event()  # set on every connect: the open tasks' devices report again
        self.connection = Connection(address, f"coordinator-{secrets.token_hex(3)}", subscriptions, self._queue,
                                     on_connect=self.connected_again.set)  # fmt: skip
        self.split_hosts = SplitHosts(registry, address, self.key, topics,
                                      lambda spec: self.pool.submit(split_server, self.workshop, spec))  # fmt: skip

    def _queue(self, topic: str, payload: bytes) -> None:
        self.inbox.put((topic, payload))

    def _count(self, device: str, sent: int = 0, received: int = 0) -> None:
        counters = self.unflushed.setdefault(device, [0, 0])
        counters[0] += sent
        counters[1] += received

    def _flush_traffic(self) -> None:
        if self.unflushed:
            traffic, self.unflushed = self.unflushed, {}
            self.registry.add_traffic({device: (sent, received) for device, (sent, received) in traffic.items()})

    def _publish(self, device: str, channel: str, payload: bytes) -> None:
        self._count(device, sent=len(payload))
        self.connection.publish(self.topics.device(device, channel), payload)

    def _send(self, device: str, channel: str, record: Record) -> None:
        self._publish(device, channel, record.signed(self.key).encode())

    def _check_sender(self, device: str, record: Record) -> None:
        """WireError unless `record` is signed by the key the operator enrolled for `device`."""
        pem = self.registry.enrolled_key(device)
        if pem is None:
            raise WireError(f"device {device!r} is not enrolled; enroll it with `coordinator fleet enroll {device} "
                            "--key DEVICE_STATE/device.pub`")  # fmt: skip
        if pem not in self.device_keys:
            self.device_keys[pem] = parse_public_key(pem, f"{device}'s enrolled key")
        record.verify(self.device_keys[pem], f"device {device!r}'s enrolled key")

    def _reject(self, reason: str) -> None:
        log.warning("rejected: %s", reason)
        with self.rejections_lock:
            self.rejections.append(reason)
            self.refused += 1

    def refusals(self) -> tuple[int, list[str]]:
        """How many messages were refused, and the latest reasons (newest last); safe from any thread."""
        with self.rejections_lock:
            return self.refused, list(self.rejections)

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
            if channel == "results" and chunk.transfer in self.downloads:
                self.downloads[chunk.transfer].receive(chunk)
            # a late duplicate of a result already whole, or a chunk another worker asked for: kept for it on disk
            elif channel != "results" or not store_shared_chunk(self.work / "incoming" / device, chunk):
                raise WireError(f"{device} sent a chunk of {chunk.transfer[:12]}…, which is not an expected result")
            return
        record = decode(payload)
        self._check_sender(device, record)
        if getattr(record, "device", device) != device:
            raise WireError(f"a {record.kind} record for {record.device!r} arrived on {device!r}'s topic")  # type: ignore[attr-defined]
        if time.monotonic() - self.heard.get(device, -math.inf) > HEARD_SECONDS:
            self.heard[device] = time.monotonic()
            self.registry.device_heard(device)  # a device training for minutes sends progress, not its status
        if isinstance(record, Status) and channel == "status":
            self.registry.device_status(device, record.state)
        elif isinstance(record, Profile) and channel == "profile":
            self.registry.device_profile(device, record.profile, record.datasets, record.backends)
        elif isinstance(record, Event) and channel == "events":
            self._on_event(device, record)
        elif isinstance(record, Request) and channel == "acks":
            if device not in self.offered_to.get(record.transfer, ()):
                self._offer_open_tasks(device)  # another worker may have sent the job that names it
            if device not in self.offered_to.get(record.transfer, ()):
                raise WireError(f"{device} asks for {record.transfer[:12]}…, which no job sent to it names")
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
        if offer.job != wire_job:  # the job is under the device's signature, the topic is not
            raise WireError(f"{device} offers a result of {str(offer.job)[:80]!r} on {wire_job!r}'s topic")
        # already counted, skipped (past the deadline), or its job failed or was cancelled: the device may stop offering
        if task["state"] in TASK_DONE or self.registry.job(job)["state"] in JOB_DONE:
            self._send(device, "transfer", Done(offer.transfer, True))
            return
        if offer.transfer in self.downloads:
            return
        if not self.registry.claim_receiver(job, round_, device, self.worker_id, time.time() - self.worker_timeout):
            log.debug("%s's result of %s is being fetched by another worker", device, wire_job)
            return
        limit = result_limit(Path(task["bundle"]))
        if offer.size > limit:
            raise WireError(f"{device} offers a {offer.size:,}-byte result of {wire_job}; results are under {limit:,}")
        inbox = self.work / "incoming" / device

        def ask(indices: list[int]) -> None:
            self._send(device, "transfer", Request(offer.transfer, indices))

        def finished(path: Path) -> None:
            if (self.registry.task(job, round_, device) or {}).get("state") in TASK_DONE:  # skipped while it came
                self._send(device, "transfer", Done(offer.transfer, True))
                return
            try:
                self._store_result(device, job, round_, path)
            except OffsiteError as error:  # arrived whole but unusable: skip this device's result, say so once
                self._reject(str(error))
                self.registry.set_task(job, round_, device, "skipped", reason=str(error))
            self._send(device, "transfer", Done(offer.transfer, True))

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
        bundle = Path((self.registry.task(job, round_, device) or {})["bundle"])
        start = self._start(job, round_, device)
        origin = bundle_id(bundle.parent / "bundle") + (f"+{sha256_file(start)}" if start else "")
        if metrics.bundle != origin:
            raise DataError(f"{device}'s result for {job} round {round_} was not trained from the bundle and start "
                            f"adapter sent to it ({str(metrics.bundle)[:24]}…, sent {origin[:24]}…)")  # fmt: skip
        check_result_adapter(folder / ADAPTER, bundle, f"{device}'s result for {job} round {round_}")
        self._flush_traffic()  # the result's chunks count to the task they finish
        if self.registry.task_result(job, round_, device, folder, metrics):
            log.info("%s result of %s round %d stored (%d examples)", device, job, round_, metrics.examples)
        else:
            log.info("%s result of %s round %d was already counted", device, job, round_)

    # -- jobs -----------------------------------------------------------------------------------------------

    def _offer(self, path: Path, name: str) -> Offer:
        if path not in self.offers:
            self.offers[path] = self.outbox.add(path, offer_for(path, name))
        return self.offers[path]

    def _configuration(self, job: str, device: str) -> dict[str, Any] | None:
        """What a per-device job chose for `device` (None: the job's one configuration). Read from the registry once
        per job: every device's choices are one JSON value, and every message about a task would decode it again."""
        if job not in self.configurations:
            self.configurations[job] = self.registry.job(job)["detail"].get("configurations") or {}
        return self.configurations[job].get(device)

    def _start(self, job: str, round_: int, device: str) -> Path | None:
        """The adapter `device` starts round `round_` from (None in round 1)."""
        return start_adapter(self.work, job, round_, self._configuration(job, device))

    def _offers_for(self, job: str, round_: int, device: str, bundle_path: str) -> tuple[Offer, Offer | None]:
        """The bundle and start adapter `device` pulls this round, offered: a device pulls only what its jobs name."""
        bundle = self._offer(Path(bundle_path), "bundle")
        start_path = self._start(job, round_, device)
        start = self._offer(start_path, "adapter") if start_path else None
        for offer in (bundle, start):
            if offer is not None:
                self.offered_to.setdefault(offer.transfer, set()).add(device)
        return bundle, start

    def _send_job(self, job: str, round_: int, device: str) -> None:
        spec = JobSpec.from_dict(self.registry.job(job)["spec"])
        task = self.registry.task(job, round_, device)
        bundle, start = self._offers_for(job, round_, device, task["bundle"])
        configuration = self._configuration(job, device)
        record = Job(
            wire_job_id(job, round_),
            device,
            round_,
            spec.dataset,
            configuration["steps"] if configuration else spec.steps,
            dataclasses.asdict(bundle),
            dataclasses.asdict(start) if start else None,
            time.time(),
            secrets.token_hex(16),
        )
        self._send(device, "jobs", record)

    def _start_round(self, job: str, round_: int, bundles: dict[str, str], expected: str, **change: Any) -> bool:
        """Start round `round_` if this worker still holds `job` in state `expected` (`change`: what
        `Registry.start_round` records with it), and send each device its job; whether it did."""
        if not self.registry.start_round(job, round_, bundles, self.worker_id, expected, **change):
            return False
        for device in bundles:
            self._send_job(job, round_, device)
        log.info("%s round %d sent to %s", job, round_, ", ".join(bundles))
        return True

    def _offer_open_tasks(self, device: str) -> None:
        """Offer the files of `device`'s unfinished tasks (a worker that did not send them answers its requests)."""
        for task in self.registry.open_tasks(device):
            self._offers_for(task["job"], task["round"], device, task["bundle"])

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
        if len(chosen) < spec.quorum:
            raise ConfigError(f"--quorum {spec.quorum} is more than the {len(chosen)} devices this job can go to")
        return {d: devices[d] for d in chosen}

    def _on_work_done(self, job: str, future: Future) -> None:
        try:
            outcome = dict(future.result())
        except (OffsiteError, ProfileError) as error:
            log.error("%s failed: %s", job, error)
            self.registry.fail_job(job, str(error), self.worker_id)
            return
        except Exception as error:  # a bug in one job's export or evaluation must not stop the service
            log.exception("%s failed unexpectedly", job)
            self.registry.fail_job(job, f"internal error: {error!r}", self.worker_id)
            return
        kind = outcome.pop("kind")
        if kind == "prepared":
            bundles = outcome.pop("bundles")
            for device, why in (outcome.get("left_out") or {}).items():
                log.warning("%s: %s is left out: %s", job, device, why)
            # the detail: the model's sha256; a per-device job's choices
            if not self._start_round(job, 1, bundles, "preparing", detail=outcome):
                log.warning("%s was taken over by another worker; this one's preparation is dropped", job)
            return
        round_, aggregate, evaluation = outcome["round"], outcome["aggregate"], outcome["evaluation"]
        if round_ < outcome["rounds"]:
            bundles = {t["device"]: t["bundle"] for t in self.registry.tasks(job, round_) if t["state"] == "received"}
            counted = self._start_round(job, round_ + 1, bundles, "aggregating", finished=(aggregate, evaluation))
        else:
            counted = self.registry.finish_job(job, round_, self.worker_id, aggregate, evaluation)
        if not counted:
            log.warning("%s was taken over by another worker; its aggregation of round %d here is dropped", job, round_)
            return
        log.info("%s round %d aggregated over %d devices: %s", job, round_, outcome["devices"], evaluation)

    def _heartbeat(self) -> None:
        """Say this worker is alive; take back the jobs of workers that fell silent."""
        if time.monotonic() - self.last_heartbeat < HEARTBEAT_SECONDS:
            return
        self.last_heartbeat = time.monotonic()
        self.registry.heartbeat(self.worker_id, socket.gethostname(), os.getpid())
        for job in self.registry.reclaim(time.time() - self.worker_timeout):
            log.warning("%s: its worker fell silent; the step it was on starts again", job)

    def _ask_for_states(self) -> None:
        """Send every open task's job again: its device answers a job it knows with its state. What a device
        reported while this service was away from the broker (a failure, say) was lost with it; the device sends
        its states again when it reconnects, but the service may reconnect after it."""
        for job in self.registry.jobs("running"):
            for task in self.registry.tasks(job["id"], job["round"]):
                if task["state"] not in TASK_DONE:
                    self._send_job(job["id"], job["round"], task["device"])

    def _tick(self) -> None:
        self._heartbeat()
        if self.connected_again.is_set():
            self.connected_again.clear()
            self._ask_for_states()
        for job in self.registry.jobs("pending"):
            try:
                spec = JobSpec.from_dict(job["spec"])
                targets = self._targets(spec)
                if spec.split is not None and self.shared:
                    raise ConfigError("a split job needs a single `coordinator serve` (not --worker): its split "
                                      "server keeps each device's last cut in its memory")  # fmt: skip
            except (ConfigError, RecordError) as error:
                self.registry.fail_job(job["id"], str(error))
                continue
            if self.registry.claim_job(job["id"], "pending", "preparing", self.worker_id, devices=sorted(targets)):
                self.pending[job["id"]] = self.pool.submit(prepare_job, self.workshop, job["id"], spec, targets)
        for job_id, future in list(self.pending.items()):
            if future.done():
                self._on_work_done(job_id, future)  # again next tick if the registry was unavailable
                self.pending.pop(job_id)
        running = self.registry.jobs("running")
        for job in running:
            try:
                self._tick_round(job)
            except (OffsiteError, RecordError) as error:  # one job's bad spec fails that job, not the service
                self.registry.fail_job(job["id"], str(error))
        for job_id, reason in self.split_hosts.tick(running, wire_job_id).items():
            self.registry.fail_job(job_id, reason)
        self._flush_traffic()
        for transfer, download in list(self.downloads.items()):
            try:
                download.tick()
            except Exception as error:  # counted and logged by _refuse
                self._refuse(error, f"transfer {transfer[:12]}…")
            if download.done:
                self.downloads.pop(transfer)

    def _tick_round(self, job: dict[str, Any]) -> None:
        """Send unanswered jobs again; past the deadline, skip the devices still out; aggregate a finished round
        (or fail the job when fewer than its quorum answered)."""
        round_, spec = job["round"], JobSpec.from_dict(job["spec"])
        tasks = self.registry.tasks(job["id"], round_)
        late = (
            spec.deadline_s is not None and tasks and time.time() - min(t["started"] for t in tasks) > spec.deadline_s
        )
        for task in tasks:
            key = (job["id"], round_, task["device"])
            if late and task["state"] not in TASK_DONE:
                reason = f"no result within the round's {spec.deadline_s:g} s deadline"
                if self.registry.set_task(*key, "skipped", reason=reason):
                    log.warning("%s round %d: %s skipped: %s", job["id"], round_, task["device"], reason)
                task["state"] = (self.registry.task(*key) or {}).get("state")
            elif (
                task["state"] == "sent"
                and (task["sent_at"] or 0) < time.time() - RESEND_SECONDS
                and self.registry.claim_resend(*key, RESEND_SECONDS)  # one worker sends it
            ):
                self._send_job(job["id"], round_, task["device"])
        if not tasks or not all(task["state"] in TASK_DONE for task in tasks):
            return
        received = sum(task["state"] == "received" for task in tasks)
        if received < spec.quorum:
            reason = (
                f"{received} of {len(tasks)} devices answered round {round_}; the job needs {spec.quorum} (--quorum)"
            )
            self.registry.fail_job(job["id"], reason)
            return
        if self.registry.claim_job(job["id"], "running", "aggregating", self.worker_id):
            self.pending[job["id"]] = self.pool.submit(finish_round, self.workshop, job["id"], round_, spec)

    def _resume(self) -> None:
        """After a restart: jobs cut off while preparing or aggregating start that step again (at once when this is
        the only service; as the other workers' silence shows, when shared), and the files of running rounds are
        offered again (a device in the middle of a download goes on asking for chunks)."""
        if not self.shared:
            self.registry.reclaim(math.inf)
        for job in self.registry.jobs():
            if job["state"] in ("running", "aggregating"):
                for task in self.registry.tasks(job["id"], job["round"]):
                    if task["state"] not in TASK_DONE:
                        self._offers_for(job["id"], job["round"], task["device"], task["bundle"])

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
        try:
            self._tick()
        except RegistryUnavailable as error:  # a database restart: what this tick missed, the next one does
            log.warning("%s; trying again", error)
            time.sleep(TICK_SECONDS)

    def run(self, stop: threading.Event) -> None:
        self._resume()
        self.connection.start()
        log.info("coordinator connected to %s (%s)", self.connection.address, self.connection.protocol_name)
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.split_hosts.close()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.connection.close()

    def jobs_done(self) -> bool:
        return all(job["state"] in JOB_DONE for job in self.registry.jobs())
