"""Hostile messages: each is refused and counted, nothing is written outside the service's or device's folder, and
the process keeps serving. Driven through the inboxes, so every case is exactly one message."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.fleet.broker import free_port
from coordinator.fleet.registry import Registry
from coordinator.fleet.service import FleetService
from device_profiles import load_profile
from edge_runtime.daemon import DaemonConfig, EdgeDaemon
from edge_runtime.identity import public_pem
from edge_runtime.mqtt import BrokerAddress
from edge_runtime.records import RecordError, from_dict
from edge_runtime.transfer import pack_directory
from edge_runtime.wire import FRAME_MAGIC, RECORDS, WIRE_SCHEMA, Chunk, Event, Job, Topics
from exporters.bundle import load_private_key
from tests.conftest import device_result
from tests.fleet.conftest import tiny_spec

SHA = "ab" * 32
DEEP = b'{"kind":"event","schema":1,"detail":' + b"[" * 50_000 + b"]" * 50_000 + b"}"


DEVICE_KEY = Ed25519PrivateKey.generate()  # device a's, enrolled by the service fixture
OTHER_KEY = Ed25519PrivateKey.generate()  # device b's, enrolled too


def _record(kind: str, signer: Ed25519PrivateKey = DEVICE_KEY, **fields: object) -> bytes:
    """A record as `signer` would send it: signed when it reads as a record (a refusal past the signature check),
    else the raw fields (refused before any signature is read)."""
    data = {"kind": kind, "schema": WIRE_SCHEMA, **fields}
    try:
        return from_dict(RECORDS[kind], data).signed(signer).encode()
    except (KeyError, RecordError):
        return json.dumps(data).encode()


def _frame(header: dict, data: bytes = b"x") -> bytes:
    import hashlib
    import struct

    body = json.dumps(header | {"schema": WIRE_SCHEMA, "sha256": hashlib.sha256(data).hexdigest()}).encode()
    return FRAME_MAGIC + struct.pack(">I", len(body)) + body + data


def _files_under(root: Path) -> set[Path]:
    return {path for path in root.rglob("*")}


@pytest.fixture
def service(fleet_files, tmp_path):
    """A service holding one running task (device `a`, round 1), not connected: messages go in by its inbox."""
    made = FleetService(
        Registry(tmp_path / "coordinator"),
        BrokerAddress("127.0.0.1", free_port()),
        fleet_files["key"],
        tmp_path / "coordinator" / "files",
        Topics(),
    )
    made.registry.enroll("a", public_pem(DEVICE_KEY))
    made.registry.enroll("b", public_pem(OTHER_KEY))
    job = made.registry.add_job(tiny_spec(fleet_files, rounds=1))
    folder = tmp_path / "coordinator" / "files" / "bundles" / "one"  # as prepare_job lays a bundle out
    (folder / "bundle").mkdir(parents=True)
    (folder / "bundle" / "adapter.safetensors").write_bytes(b"\0" * 1000)
    (folder / "bundle" / "manifest.json").write_text('{"stand-in": "a signed manifest"}')
    pack_directory(folder / "bundle", folder / "bundle.tar")
    made.registry.set_job(job, "running", 1, model_sha256="0" * 64)
    made.registry.add_task(job, 1, "a", str(folder / "bundle.tar"))
    made.wire_job = f"{job}-r1"  # type: ignore[attr-defined]
    yield made
    made.pool.shutdown()


def _service_cases(wire_job: str) -> dict[str, tuple[str, bytes, str]]:
    """name -> (topic, payload, what the refusal says)."""
    events, results = "offsite/devices/a/events", f"offsite/devices/a/results/{wire_job}"
    progress = Event("a", wire_job, "progress", time.time(), {"step": 1}).signed(DEVICE_KEY).encode()
    offer = {"transfer": SHA, "name": "result", "size": 10, "chunk_bytes": 4, "job": wire_job}
    return {
        "a progress event without its steps and loss": (events, progress, "lacks its 'steps' field"),
        "a progress event whose loss is a string": (
            events,
            Event("a", wire_job, "progress", time.time(), {"step": 1, "steps": 2, "loss": "x"})
            .signed(DEVICE_KEY)
            .encode(),
            "loss = 'x' is not float",
        ),
        "an offer with a zero chunk size": (results, _record("offer", **offer | {"chunk_bytes": 0}), "chunk_bytes = 0"),
        "an offer whose transfer id is a path": (
            results,
            _record("offer", **offer | {"transfer": "../b/" + "0" * 59}),
            "is not a sha256",
        ),
        "an offer of an absolute path": (results, _record("offer", **offer | {"transfer": "/etc/passwd"}), "sha256"),
        "an offer far larger than this job's results": (
            results,
            _record("offer", **offer | {"size": 10**9}),
            "results are under",
        ),
        "a JSON array 50,000 deep": (events, DEEP, "nests deeper than 32 levels"),
        "a device id that is a path": ("offsite/devices/../results/x", _record("status"), "device id '..'"),
        "a request repeating one index": (
            "offsite/devices/a/acks",
            _record("request", transfer=SHA, indices=[0] * 9),
            "each once",
        ),
        "a request for 10,000 chunks": (
            "offsite/devices/a/acks",
            _record("request", transfer=SHA, indices=list(range(10_000))),
            "at most 64",
        ),
        "a chunk whose transfer id is a path": (results, _frame({"transfer": "../../x", "index": 0}), "not a sha256"),
        "a chunk with a negative index": (results, _frame({"transfer": SHA, "index": -1}), "not a chunk index"),
        "bytes that are not JSON": (events, b"\xff\xfe garbage", "not JSON"),
        "a JSON array at the top": (events, b"[1, 2]", "not an object"),
        "an unknown record kind": (events, _record("shutdown"), "unknown record kind"),
        "an event of an unknown kind": (
            events,
            _record("event", device="a", job=wire_job, event="explode", time=1.0),
            "event = 'explode'",
        ),
        "an event for a job never sent to this device": (
            events,
            Event("a", "job-0-r1", "trained", time.time(), {}).signed(DEVICE_KEY).encode(),
            "never sent to it",
        ),
        "an unsigned record": (events, Event("a", wire_job, "queued", 1.0).encode(), "is unsigned"),
        "a record signed by another device's key": (
            events,
            Event("a", wire_job, "trained", 1.0).signed(OTHER_KEY).encode(),
            "bad signature: not from device 'a'",
        ),
        "a record from a device never enrolled": (
            "offsite/devices/z/status",
            _record("status", Ed25519PrivateKey.generate(), device="z", state="online", time=1.0),
            "'z' is not enrolled",
        ),
        "a result offered for another device's task": (
            f"offsite/devices/b/results/{wire_job}",
            _record("offer", OTHER_KEY, **offer),
            "never sent to it",
        ),
        "a result offer replayed on another job's topic": (
            results,
            _record("offer", **offer | {"job": "job-0-r1"}),
            "offers a result of 'job-0-r1'",
        ),
        "a request for a transfer no job sent to this device names": (
            "offsite/devices/a/acks",
            _record("request", transfer=SHA, indices=[0]),
            "which no job sent to it names",
        ),
        "a status of another device on this one's topic": (
            "offsite/devices/a/status",
            _record("status", device="b", state="online", time=1.0),
            "arrived on 'a'",
        ),
    }


@pytest.mark.parametrize("case", list(_service_cases("job-r1")))
def test_the_service_refuses_each_hostile_message_counts_it_and_keeps_serving(service, tmp_path, case):
    topic, payload, says = _service_cases(service.wire_job)[case]
    before = _files_under(tmp_path)
    service.inbox.put((topic, payload))
    service.step(wait=0.05)  # raised before: the service (and its embedded broker) died on most of these
    assert service.refused == 1 and says in service.rejections[-1], list(service.rejections)
    assert {path for path in _files_under(tmp_path) - before if "coordinator" not in path.parts} == set()
    assert not (tmp_path / "coordinator" / "files" / "b").exists()
    # and it still serves: a good status from device a is recorded
    service.inbox.put(("offsite/devices/a/status", _record("status", device="a", state="busy", time=1.0)))
    service.step(wait=0.05)
    assert service.refused == 1 and service.registry.device("a")["state"] == "busy"


def test_a_devices_signed_progress_counts_as_heard_and_a_forged_one_does_not(service):
    service.registry.device_status("a", "busy")
    service.registry.device_status("b", "busy")
    long_ago = time.time() - 600
    service.registry.db.run("UPDATE devices SET last_seen = ?", long_ago)  # its status came 10 minutes ago
    progress = {"step": 3, "steps": 10, "loss": 0.5}
    service.inbox.put(("offsite/devices/a/events", _record("event", device="a", job=service.wire_job,
                                                           event="progress", time=1.0, detail=progress)))  # fmt: skip
    service.inbox.put(("offsite/devices/b/events", _record("event", device="b", job=service.wire_job,
                                                           event="progress", time=1.0, detail=progress)))  # fmt: skip
    service.step(wait=0.05)
    assert service.registry.device("a")["last_seen"] > time.time() - 60  # the dashboard shows it heard just now
    assert service.refused == 1  # the one "from b" is signed with a's key: a forgery, refused
    assert service.registry.device("b")["last_seen"] == long_ago  # and no sign of life from b


def test_a_pending_job_with_a_spec_that_no_longer_reads_fails_alone(service):
    job = service.registry.add_job({"dataset": "reviews", "bundle": {"model": 3}})
    service.step(wait=0.01)
    assert service.registry.job(job)["state"] == "failed"
    assert "job spec" in service.registry.job(job)["detail"]["reason"]


@pytest.mark.parametrize("origin", ["another bundle", "the bundle sent"])
def test_a_result_is_refused_unless_trained_from_the_bundle_sent_to_its_device(service, tmp_path, origin):
    from coordinator.errors import DataError
    from edge_runtime.trainer import bundle_id

    bundle = Path(service.registry.task(service.wire_job.rsplit("-r", 1)[0], 1, "a")["bundle"]).parent / "bundle"
    metrics = device_result({}, 10).metrics.to_dict()
    metrics["bundle"] = "f" * 64 if origin == "another bundle" else bundle_id(bundle)
    (tmp_path / "result").mkdir()
    (tmp_path / "result" / "metrics.json").write_text(json.dumps(metrics))
    archive = pack_directory(tmp_path / "result", tmp_path / "result.tar")
    job = service.wire_job.rsplit("-r", 1)[0]
    with pytest.raises(DataError) as refused:
        service._store_result("a", job, 1, archive)
    if origin == "another bundle":
        assert "was not trained from the bundle and start adapter sent to it" in str(refused.value)
    else:  # past the origin check, on to the adapter's own
        assert "has no adapter.safetensors" in str(refused.value)


@pytest.fixture
def daemon(fleet_files, tmp_path):
    config = DaemonConfig(
        "a", load_profile("laptop-16gb"), {"reviews": fleet_files["a"]}, fleet_files["trust"], tmp_path / "device"
    )
    made = EdgeDaemon(config, BrokerAddress("127.0.0.1", free_port()))
    for folder in (made.jobs_dir, made.bundles_dir, made.downloads_dir):
        folder.mkdir(parents=True, exist_ok=True)
    return made


def _job(key: Ed25519PrivateKey, **change: object) -> bytes:
    fields: dict = {
        "job": "job-1-r1",
        "device": "a",
        "round": 1,
        "dataset": "reviews",
        "steps": 2,
        "bundle": {"transfer": SHA, "name": "bundle", "size": 10, "chunk_bytes": 4},
        "start_adapter": None,
        "issued_at": time.time(),
        "nonce": "n" + str(time.monotonic_ns()),
    }
    body = {"kind": Job.kind, "schema": WIRE_SCHEMA} | fields | change  # signed as Job.signed signs
    signature = key.sign(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return json.dumps(body | {"signature": base64.b64encode(signature).decode()}).encode()


def _daemon_cases(key: Ed25519PrivateKey) -> dict[str, tuple[str, bytes, str]]:
    jobs, transfer = "offsite/devices/a/jobs", "offsite/devices/a/transfer"
    return {
        "a signed job whose id is a path": (jobs, _job(key, job="../../escape"), "job = '../../escape'"),
        "a signed job naming a dataset by path": (jobs, _job(key, dataset="../a.jsonl"), "dataset = '../a.jsonl'"),
        "a request repeating one index": (transfer, _record("request", transfer=SHA, indices=[1, 1]), "each once"),
        "a done whose transfer id is a path": (transfer, _record("done", transfer="../x", ok=True), "sha256"),
        "a chunk of a transfer never asked for": (transfer, Chunk(SHA, 0, b"x").encode(), "did not ask for"),
        "an acknowledgement signed by a device, not the coordinator": (
            transfer,
            _record("done", DEVICE_KEY, transfer=SHA, ok=True),
            "bad signature: not from the trusted coordinator",
        ),
        "a JSON array 50,000 deep": (jobs, DEEP, "nests deeper than 32 levels"),
        "bytes that are not JSON": (jobs, b"\x00\x01", "not JSON"),
    }


@pytest.mark.parametrize("case", list(_daemon_cases(Ed25519PrivateKey.generate())))  # names only: any key
def test_the_daemon_refuses_each_hostile_message_counts_it_and_keeps_serving(daemon, fleet_files, tmp_path, case):
    topic, payload, says = _daemon_cases(load_private_key(fleet_files["key"]))[case]
    daemon.inbox.put((topic, payload))
    daemon.step(wait=0.05)
    assert daemon.refused == 1 and says in daemon.rejections[-1], list(daemon.rejections)
    assert {path.name for path in tmp_path.iterdir()} == {"device"}  # nothing written beside its folder
    assert not (tmp_path / "escape").exists()


def test_a_job_whose_bundle_offer_is_malformed_fails_and_the_daemon_goes_on(daemon, fleet_files):
    key = load_private_key(fleet_files["key"])
    daemon.inbox.put(("offsite/devices/a/jobs", _job(key, bundle={"transfer": SHA, "name": "bundle"})))
    daemon.step(wait=0.05)  # raised TypeError before (Offer(**spec))
    assert daemon._job_state("job-1-r1")["state"] == "failed"
    assert "lacks its 'size' field" in daemon._job_state("job-1-r1")["reason"]
