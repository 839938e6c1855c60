"""Fuzz: thousands of random and mutated records thrown at the coordinator service and at a daemon over a real
broker (seeded, bounded in count); both keep serving, and a real job completes afterwards. Half the mutated records
are signed by the key their receiver trusts, so they get past the signature check to the handlers."""

from __future__ import annotations

import base64
import json
import random
import secrets
import time
from collections.abc import Iterator

import paho.mqtt.client as paho
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from edge_runtime.wire import WIRE_SCHEMA, Chunk
from exporters.bundle import load_private_key
from tests.fleet.conftest import Amqtt, tiny_spec, wait_for

RECORDS = 3000  # half at the service, half at daemon `a`
SHA = "cd" * 32
# One valid record of each kind, as each side would send it.
BASES = [
    {"kind": "status", "device": "x", "state": "online", "time": 1.0, "job": None},
    {"kind": "profile", "device": "x", "profile": {"name": "p"}, "datasets": {"reviews": 3}, "backends": ["ort"],
     "time": 1.0},
    {"kind": "offer", "transfer": SHA, "name": "result", "size": 10, "chunk_bytes": 4, "job": "job-1-r1"},
    {"kind": "event", "device": "a", "job": "job-1-r1", "event": "progress", "time": 1.0,
     "detail": {"step": 1, "steps": 2, "loss": 0.5}},
    {"kind": "request", "transfer": SHA, "indices": [0, 1]},
    {"kind": "done", "transfer": SHA, "ok": True, "reason": ""},
    {"kind": "job", "job": "job-1-r1", "device": "a", "round": 1, "dataset": "reviews", "steps": 1,
     "bundle": {"transfer": SHA, "name": "bundle", "size": 1, "chunk_bytes": 1}, "start_adapter": None,
     "issued_at": 1.0, "nonce": "n", "signature": "AAAA"},
]  # fmt: skip
ODD_VALUES = [None, True, -1, 0, 2**63, 1e308, "", "../../etc", "/abs", "x" * 5000, [], {}, [[[]]], {"a": {"b": 1}}]


def _value(rng: random.Random) -> object:
    return rng.choice([*ODD_VALUES, rng.randint(-(2**40), 2**40), rng.random(), secrets.token_hex(rng.randint(0, 40))])


def _mutated(rng: random.Random, signer: Ed25519PrivateKey) -> bytes:
    record = dict(rng.choice(BASES)) | {"schema": WIRE_SCHEMA}
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(list(record))
        operation = rng.random()
        if operation < 0.3:
            record.pop(key)
        elif operation < 0.8:
            record[key] = _value(rng)
        else:
            record[secrets.token_hex(3)] = _value(rng)
    if rng.random() < 0.5:  # signed as Record.signed signs (it holds when the mutation kept the record's form)
        body = json.dumps({k: v for k, v in record.items() if k != "signature"}, sort_keys=True, separators=(",", ":"))
        record["signature"] = base64.b64encode(signer.sign(body.encode())).decode()
    payload = json.dumps(record).encode()
    if rng.random() < 0.2:  # cut or corrupted bytes
        payload = payload[: rng.randint(0, len(payload))] + bytes(rng.randrange(256) for _ in range(rng.randint(0, 4)))
    return payload


def _message(rng: random.Random, signer: Ed25519PrivateKey) -> bytes:
    roll = rng.random()
    if roll < 0.1:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
    if roll < 0.2:
        return Chunk(rng.choice([SHA, "ab" * 32]), rng.randint(0, 5), secrets.token_bytes(rng.randint(0, 64))).encode()
    if roll < 0.25:
        depth = rng.randint(30, 3000)
        return b'{"kind":"event","detail":' + b"[" * depth + b"]" * depth + b"}"
    return _mutated(rng, signer)


def _service_topic(rng: random.Random) -> str:
    """Events, acks and results of the real devices; status and profile only of made-up ones (a valid-looking
    profile would otherwise, rightly, change what the real devices can be sent)."""
    channel = rng.choice(["status", "profile", "events", "acks", "results/job-1-r1", "results"])
    device = rng.choice(["x", "y"]) if channel in ("status", "profile") else rng.choice(["a", "b", "z"])
    return f"offsite/devices/{device}/{channel}"


def _messages(seed: int, coordinator: Ed25519PrivateKey, device: Ed25519PrivateKey) -> Iterator[tuple[str, bytes]]:
    """To the service as device `a` would sign, to daemon `a` as the coordinator would."""
    rng = random.Random(seed)
    for index in range(RECORDS):
        topic = _service_topic(rng) if index % 2 else f"offsite/devices/a/{rng.choice(['jobs', 'transfer'])}"
        yield topic, _message(rng, device if index % 2 else coordinator)


def test_thousands_of_hostile_records_leave_the_service_and_a_daemon_serving(make_fleet, tmp_path) -> None:
    broker = Amqtt(tmp_path / "broker").start()  # the attacker logs in as the coordinator: it may write every topic
    try:
        fleet = make_fleet(broker)
        service = fleet.service
        fleet.start_service()
        daemon = fleet.start_daemon("a")
        fleet.start_daemon("b")
        attacker = paho.Client(CallbackAPIVersion.VERSION2, client_id="fuzz", protocol=paho.MQTTv311)
        login = broker.address("coordinator")
        attacker.username_pw_set(login.username, login.password)
        attacker.connect("127.0.0.1", broker.broker.port)
        attacker.loop_start()
        messages = _messages(7, load_private_key(fleet.files["key"]), daemon.identity)
        sent = [attacker.publish(topic, payload, qos=1) for topic, payload in messages]
        for message in sent:
            message.wait_for_publish(timeout=30)
        attacker.loop_stop()
        attacker.disconnect()
        time.sleep(1.0)
        wait_for(lambda: service.inbox.empty() and daemon.inbox.empty(), 120, "both sides to drain their inboxes")
        assert service.refused > RECORDS // 4 and daemon.refused > RECORDS // 4, (service.refused, daemon.refused)

        job = service.registry.add_job(tiny_spec(fleet.files, rounds=1, devices=["a", "b"]))
        wait_for(lambda: service.registry.job(job)["state"] in ("done", "failed"), 180, "a real job after the fuzz")
        assert service.registry.job(job)["state"] == "done", service.registry.job(job)["detail"]
        assert [t["state"] for t in service.registry.tasks(job)] == ["received", "received"]
    finally:
        broker.kill()
