"""The edge daemon: announces the device, takes signed jobs over MQTT, trains them, returns the adapter in chunks."""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_profiles import DeviceProfile
from edge_runtime.backends import installed_backends
from edge_runtime.bundle import load_public_key
from edge_runtime.data import load_examples
from edge_runtime.errors import OffsiteError, refusal
from edge_runtime.files import atomic_directory, write_json_atomic
from edge_runtime.identity import device_key, login_password
from edge_runtime.isolated import TrainingInterrupted, train_isolated
from edge_runtime.mqtt import BrokerAddress, BrokerUnreachable, Connection
from edge_runtime.privacy import PrivacyLedger
from edge_runtime.records import RecordError, from_dict
from edge_runtime.split_client import SplitLink
from edge_runtime.trainer import TrainOptions, plan_training, train_bundle
from edge_runtime.transfer import Download, Outbox, offer_for, pack_directory, unpack_archive
from edge_runtime.wire import (
    CHUNK_BYTES,
    MAX_TEXT,
    Chunk,
    Done,
    Event,
    Job,
    Offer,
    Profile,
    Record,
    Request,
    Status,
    Topics,
    WireError,
    check_device_id,
    decode,
)

log = logging.getLogger(__name__)
# Jobs older than this (by the coordinator's clock) are refused as replays; so are nonces seen before.
MAX_JOB_AGE_SECONDS = 600.0
CLOCK_SKEW_SECONDS = 60.0
# A finished result is offered again this often until the coordinator says it arrived whole.
OFFER_EVERY_SECONDS = 5.0
PROGRESS_EVENTS = 20  # progress events per job, at most
TERMINAL = ("delivered", "rejected", "failed")
KEPT_REJECTIONS = 100  # the latest refusals kept for `rejections`; `refused` counts them all
RESENT_STATES = 20  # jobs whose state is sent again on every connect, newest first


@dataclass(frozen=True)
class DaemonConfig:
    """One device: who it is, what it may train on, whose jobs it trusts, where it keeps its state (and its own
    key, `state/device.key`, made on first start: the operator enrolls `state/device.pub`)."""

    device_id: str
    profile: DeviceProfile
    datasets: dict[str, Path]
    trusted_key: Path
    state: Path
    topics: Topics = field(default_factory=Topics)
    threads: int | None = None
    backend: str | None = None
    budget_bytes: int | None = None
    chunk_bytes: int = CHUNK_BYTES
    isolate: bool = True  # train each job in a child process (memory returned, daemon keeps serving)
    privacy_budget: float | None = None  # lifetime ε: only DP jobs run, until their ε adds up to it

    def __post_init__(self) -> None:
        check_device_id(self.device_id)
        load_public_key(self.trusted_key)
        for name, path in self.datasets.items():
            if not Path(path).is_file():
                raise OffsiteError(f"dataset {name}={path} is not a file; pass --dataset NAME=PATH to an existing file")


class EdgeDaemon:
    """Serves one device until `stop` is set; all job state lives under `config.state`, so a restart resumes.

    EdgeDaemon(config, BrokerAddress.parse("mqtt://127.0.0.1:1883")).run(threading.Event())
    """

    def __init__(self, config: DaemonConfig, address: BrokerAddress) -> None:
        self.config = config
        self.topics = config.topics
        self.key = load_public_key(config.trusted_key)
        self.identity = device_key(config.state)
        if address.username is None:  # the embedded broker's login: the device id and a signature only its key makes
            address = dataclasses.replace(address, username=config.device_id,
                                          password=login_password(self.identity, config.device_id))  # fmt: skip
        self.address = address  # a split job's training process connects with it too
        self.jobs_dir = config.state / "jobs"
        self.bundles_dir = config.state / "bundles"
        self.downloads_dir = config.state / "downloads"
        self.nonces_file = config.state / "nonces.json"
        budget = config.privacy_budget
        self.ledger = PrivacyLedger(config.state / "privacy.json", budget) if budget is not None else None
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.outbox = Outbox()
        self.downloads: dict[str, Download] = {}
        self.rejections: collections.deque[str] = collections.deque(maxlen=KEPT_REJECTIONS)
        self.refused = 0
        # Read once, here: a dataset that does not load stops the daemon at start with the reason, rather than
        # killing the network thread that announces it on every connect.
        self.dataset_sizes = {name: len(load_examples(path)) for name, path in config.datasets.items()}
        self.state = "online"
        self.current: str | None = None
        self.last_offer = 0.0
        self.stop = threading.Event()
        me = config.device_id
        self.connection = Connection(
            address,
            f"edge-{me}",
            [self.topics.device(me, "jobs"), self.topics.device(me, "transfer")],
            lambda topic, payload: self.inbox.put((topic, payload)),
            will=(self.topics.device(me, "status"), Status(me, "offline", time.time()).signed(self.identity).encode()),
            on_connect=self._announce,
        )

    # -- wire -----------------------------------------------------------------------------------------------

    def _publish(self, channel: str, payload: bytes, job: str | None = None, retain: bool = False) -> None:
        self.connection.publish(self.topics.device(self.config.device_id, channel, job), payload, retain)

    def _send(self, channel: str, record: Record, job: str | None = None, retain: bool = False) -> None:
        """Publish `record` signed with this device's key (the coordinator reads nothing else from it)."""
        self._publish(channel, record.signed(self.identity).encode(), job, retain)

    def _event(self, job: str, event: str, **detail: Any) -> None:
        self._send("events", Event(self.config.device_id, job, event, time.time(), detail))

    def _set_status(self, state: str) -> None:
        self.state = state
        self._send("status", Status(self.config.device_id, state, time.time(), self.current), retain=True)

    def _announce(self) -> None:
        """On every (re)connect: retained status and profile (dataset names and sizes only, never content), then
        the latest jobs' states again."""
        backends = installed_backends()
        profile = Profile(
            self.config.device_id, self.config.profile.to_dict(), self.dataset_sizes, backends, time.time()
        )
        self._send("profile", profile, retain=True)
        self._set_status(self.state)
        self._resend_states()

    def _resend_states(self) -> None:
        """The state of each of the latest jobs not yet delivered, sent again: an event published while the broker
        was away is lost with it (a job that failed then would hold its round until the deadline, or forever)."""
        try:
            latest = sorted(self.jobs_dir.glob("[!.]*/state.json"), key=lambda path: path.stat().st_mtime)
            for path in latest[-RESENT_STATES:]:
                if self._job_state(path.parent.name)["state"] != "delivered":
                    self._report_state(path.parent.name)
        except (OSError, ValueError) as error:  # a job folder changing under us: the next connect sends it
            log.warning("could not send the jobs' states again: %s", error)

    def _reject(self, reason: str, job: str = "") -> None:
        log.warning("%s rejected %s: %s", self.config.device_id, job or "a message", reason)
        self.rejections.append(reason)
        self.refused += 1
        self._event(job, "rejected", reason=reason[:MAX_TEXT])

    def _refuse(self, error: Exception, what: str) -> None:
        """Count any failure of handling `what` as a refusal; the daemon goes on serving (a handler is total)."""
        self._reject(refusal(error, what, log))

    # -- jobs -------------------------------------------------------------------------------------------------

    def _job_dir(self, job: str) -> Path:
        return self.jobs_dir / job

    def _job_state(self, job: str) -> dict[str, Any]:
        return json.loads((self._job_dir(job) / "state.json").read_text(encoding="utf-8"))

    def _report_state(self, job: str) -> None:
        """Send `job`'s state (and its detail: a reason, a step) as an event, as when it was reached."""
        state = self._job_state(job)
        self._event(job, state["state"], **{k: v for k, v in state.items() if k != "state"})

    def _set_job_state(self, job: str, state: str, **detail: Any) -> None:
        write_json_atomic(self._job_dir(job) / "state.json", {"state": state, **detail})

    def _take_job(self, job: Job) -> None:
        """Check a job (signature, addressee, age, nonce, dataset) and queue it; a re-sent known job is answered."""
        if job.device != self.config.device_id:
            raise WireError(f"job {job.job!r} is for device {job.device!r}, not {self.config.device_id!r}")
        age = time.time() - job.issued_at
        if age > MAX_JOB_AGE_SECONDS or age < -CLOCK_SKEW_SECONDS:
            raise WireError(
                f"job {job.job!r} was issued {age:,.0f} s ago: outside the {MAX_JOB_AGE_SECONDS:.0f} s window"
            )
        nonces: dict[str, float] = (
            json.loads(self.nonces_file.read_text(encoding="utf-8")) if self.nonces_file.exists() else {}
        )
        if job.nonce in nonces:
            raise WireError(f"job {job.job!r} repeats nonce {job.nonce[:12]}…: a replay")
        cutoff = time.time() - MAX_JOB_AGE_SECONDS - CLOCK_SKEW_SECONDS
        nonces = {nonce: t for nonce, t in nonces.items() if t > cutoff} | {job.nonce: job.issued_at}
        write_json_atomic(self.nonces_file, nonces)
        if (self._job_dir(job.job) / "state.json").exists():
            self._report_state(job.job)
            return
        known = job.dataset in self.config.datasets
        reason = f"no dataset named {job.dataset!r} here (configured: {', '.join(sorted(self.config.datasets))})"
        state = {"state": "downloading"} if known else {"state": "rejected", "reason": reason}
        with atomic_directory(self._job_dir(job.job)) as folder:  # the job and its first state appear together
            for name, record in (("job.json", job.to_dict()), ("state.json", state)):
                write_json_atomic(folder / name, record)
        if known:
            self._event(job.job, "queued")
        else:
            self._reject(reason, job.job)

    def _next_job(self) -> str | None:
        """The oldest job not yet finished (jobs survive restarts on disk)."""
        pending = []
        for folder in self.jobs_dir.glob("[!.]*") if self.jobs_dir.exists() else []:  # not a half-made '.' folder
            if (folder / "state.json").exists() and self._job_state(folder.name)["state"] not in TERMINAL:
                record = json.loads((folder / "job.json").read_text(encoding="utf-8"))
                pending.append((record["issued_at"], folder.name))
        return min(pending)[1] if pending else None

    def _fetch(self, spec: dict[str, Any]) -> Path | None:
        """The downloaded file for an Offer's fields, or None while it is still coming (the pull is started)."""
        try:
            offer = from_dict(Offer, spec, "job's offer")
        except RecordError as error:
            raise WireError(str(error)) from None
        target = self.downloads_dir / offer.transfer
        if target.is_file():
            return target
        if offer.transfer not in self.downloads:

            def ask(indices: list[int], transfer: str = offer.transfer) -> None:
                self._send("acks", Request(transfer, indices))

            def finished(path: Path, transfer: str = offer.transfer) -> None:
                self._send("acks", Done(transfer, True))

            self.downloads[offer.transfer] = Download(offer, self.downloads_dir, ask, finished)
            self.downloads[offer.transfer].start()
        return None

    def _advance(self, job_id: str) -> None:
        """Move the current job one phase on: download → plan (accept or reject) → train → offer the result."""
        job = decode((self._job_dir(job_id) / "job.json").read_bytes())
        if not isinstance(job, Job):
            raise WireError(f"{self._job_dir(job_id) / 'job.json'} does not hold a job")
        state = self._job_state(job_id)["state"]
        folder = self._job_dir(job_id)
        if state == "downloading":
            archive = self._fetch(job.bundle)
            start = self._fetch(job.start_adapter) if job.start_adapter else None
            if archive is None or (job.start_adapter and start is None):
                return
            bundle = self.bundles_dir / job.bundle["transfer"]
            if not bundle.exists():
                unpack_archive(archive, bundle)
            self._set_job_state(job_id, "training")
            state = "training"
        if state == "training":
            self._train(job, folder)
            return
        if state == "trained" and time.monotonic() - self.last_offer > OFFER_EVERY_SECONDS:
            self.last_offer = time.monotonic()
            archive = folder / "result.tar"
            offer = next((o for path, o in self.outbox.files.values() if path == archive), None)
            if offer is None:  # hash the result once, not at every re-offer
                metrics = json.loads((folder / "result" / "metrics.json").read_text(encoding="utf-8"))
                offer = self.outbox.add(archive, offer_for(archive, "result", job_id, metrics, self.config.chunk_bytes))
            self._send("results", offer, job_id)

    def _train(self, job: Job, folder: Path) -> None:
        bundle = self.bundles_dir / job.bundle["transfer"]
        start = self.downloads_dir / job.start_adapter["transfer"] if job.start_adapter else None
        data = self.config.datasets[job.dataset]
        link = SplitLink(self.address, self.config.device_id, job.job, self.config.state, self.topics)
        options = TrainOptions(
            job.steps, self.config.backend, self.config.threads, None, self.config.budget_bytes, False, link
        )
        try:
            plan = plan_training(bundle, data, self.config.trusted_key, options)
            if self.ledger is not None:  # charged before training: a crash mid-job cannot hide what it spent
                self.ledger.charge(job.job, plan.privacy)
        except OffsiteError as error:  # fails verification, does not fit, or is over the privacy budget: skip it
            self._set_job_state(job.job, "rejected", reason=str(error))
            self._reject(str(error), job.job)
            return
        self._set_status("busy")
        self._event(job.job, "accepted", micro_batch=plan.micro_batch, predicted_peak_bytes=plan.predicted.total)
        every = max(1, job.steps // PROGRESS_EVENTS)

        def progress(step: dict[str, Any]) -> None:
            if step["step"] % every == 0 or step["step"] == step["steps"]:
                self._event(job.job, "progress", **step)

        arguments = (bundle, data, folder / "result", self.config.trusted_key, options, start)
        try:
            if self.config.isolate:
                train_isolated(*arguments, progress, lambda: self._serve(0.0), self.stop)
            else:
                train_bundle(*arguments, progress)
        except TrainingInterrupted:
            return  # the job stays in "training" and resumes from its checkpoint on the next start
        except OffsiteError as error:
            self._set_job_state(job.job, "failed", reason=str(error))
            self._event(job.job, "failed", reason=str(error))
            self._set_status("online")
            return
        metrics = json.loads((folder / "result" / "metrics.json").read_text(encoding="utf-8"))
        pack_directory(folder / "result", folder / "result.tar")
        summary = {k: metrics[k] for k in ("steps", "examples", "final_loss", "peak_memory_bytes", "wall_seconds")}
        self._set_job_state(job.job, "trained", **summary)
        self._event(job.job, "trained", **summary)
        self.last_offer = 0.0

    # -- loop -------------------------------------------------------------------------------------------------

    def _handle(self, topic: str, payload: bytes) -> None:
        device, channel, _ = self.topics.parse(topic)
        if device != self.config.device_id or channel not in ("jobs", "transfer"):
            log.debug("ignoring %s: not a topic this device subscribed to", topic)  # amqtt echoes some back
            return
        if Chunk.is_frame(payload):
            chunk = Chunk.decode(payload)
            if chunk.transfer not in self.downloads:
                if (self.downloads_dir / chunk.transfer).is_file():
                    return  # a late duplicate of a transfer already complete (asked twice after a stall)
                raise WireError(f"chunk for transfer {chunk.transfer[:12]}…, which this device did not ask for")
            self.downloads[chunk.transfer].receive(chunk)
            return
        record = decode(payload)
        record.verify(self.key, "the trusted coordinator")
        if isinstance(record, Job) and channel == "jobs":
            self._take_job(record)
        elif isinstance(record, Request) and channel == "transfer":
            job = self.current
            for chunk in self.outbox.chunks(record.transfer, record.indices):
                self._publish("results", chunk.encode(), job)
        elif isinstance(record, Done) and channel == "transfer":
            if record.transfer not in self.outbox.files or self.current is None:
                return  # the same acknowledgement again (the result was offered twice): already delivered
            if record.ok:
                self._set_job_state(self.current, "delivered")
                self._event(self.current, "delivered")
                shutil.rmtree(self._job_dir(self.current) / "result", ignore_errors=True)
                self.outbox.files.pop(record.transfer)
                self.current = None
                self._set_status("online")
            elif not record.ok:
                self.last_offer = 0.0  # the coordinator lost it: offer again
        else:
            raise WireError(f"a {record.kind} record does not belong on {channel}")

    def _serve(self, wait: float) -> None:
        """Handle what arrived (bad messages are rejected and logged) and keep downloads moving."""
        try:
            topic, payload = self.inbox.get(timeout=wait) if wait > 0 else self.inbox.get_nowait()
            while True:
                try:
                    self._handle(topic, payload)
                except Exception as error:  # every handler is total: counted, logged, refused
                    self._refuse(error, f"a message on {topic[:200]!r}")
                topic, payload = self.inbox.get_nowait()
        except queue.Empty:
            pass
        for download in list(self.downloads.values()):
            try:
                download.tick()
            except Exception as error:  # counted and logged by _refuse
                self._refuse(error, f"transfer {download.offer.transfer[:12]}…")
            if download.done:
                self.downloads.pop(download.offer.transfer, None)

    def step(self, wait: float = 0.2) -> None:
        """Serve messages, then move the current job on by one phase."""
        self._serve(wait)
        self.current = self.current or self._next_job()
        if self.current is not None:
            try:
                self._advance(self.current)
            except Exception as error:  # this job fails, with the reason; the daemon goes on serving
                reason = refusal(error, f"job {self.current}", log)
                self._set_job_state(self.current, "failed", reason=reason[:MAX_TEXT])
                self._event(self.current, "failed", reason=reason[:MAX_TEXT])
            if self._job_state(self.current)["state"] in TERMINAL:
                self.current = None
                self._set_status("online")

    def run(self, stop: threading.Event) -> None:
        """Connect, announce, resume any unfinished job, and serve until `stop` is set."""
        self.stop = stop
        for folder in (self.jobs_dir, self.bundles_dir, self.downloads_dir):
            folder.mkdir(parents=True, exist_ok=True)
        delay = 1.0
        while True:  # a device may well start before its coordinator's broker: wait for it
            try:
                self.connection.start()
                break
            except BrokerUnreachable as error:
                log.warning("%s; trying again in %.0f s", error, delay)
                if stop.wait(delay):
                    return
                delay = min(delay * 2, 16.0)
        log.info(
            "%s connected to %s (%s)", self.config.device_id, self.connection.address, self.connection.protocol_name
        )
        try:
            while not stop.is_set():
                self.step()
        finally:
            self._set_status("offline")
            self.connection.close()
