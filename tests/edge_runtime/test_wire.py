"""Wire records: round trips, every malformed message refused with its reason, signed jobs, chunk frames."""

from __future__ import annotations

import dataclasses
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.wire import (
    MAX_MESSAGE_BYTES,
    Chunk,
    Event,
    Job,
    Offer,
    Profile,
    Status,
    Topics,
    WireError,
    check_device_id,
    decode,
)


def _job(**change: object) -> Job:
    fields = {
        "job": "job-1-r1",
        "device": "jetson-7",
        "round": 1,
        "dataset": "reviews",
        "steps": 10,
        "bundle": {"transfer": "ab" * 32, "name": "bundle", "size": 10, "chunk_bytes": 4},
        "start_adapter": None,
        "issued_at": 1_800_000_000.0,
        "nonce": "n1",
    }
    return Job(**(fields | change))


@pytest.mark.parametrize(
    "record",
    [
        Status("a", "online", 1.5, None),
        Profile("a", {"name": "laptop-16gb"}, {"reviews": 12}, ["ort"], 2.0),
        Offer("ab" * 32, "result", 1000, 256, "job-1-r1", {"examples": 3}),
        Event("a", "job-1-r1", "progress", 3.0, {"step": 1, "loss": 0.5}),
        _job(),
    ],
)
def test_records_round_trip(record: object) -> None:
    assert decode(record.encode()) == record  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON list"),
        (json.dumps({"kind": "status", "schema": 99}).encode(), "schema 99"),
        (json.dumps({"kind": "launch", "schema": 1}).encode(), "unknown record kind 'launch'"),
        (json.dumps({"kind": "status", "schema": 1, "device": "a", "time": 1.0}).encode(), "lacks its 'state'"),
        (json.dumps({"kind": "status", "schema": 1, "device": "a", "state": 3, "time": 1}).encode(), "status.state"),
        (json.dumps({"kind": "request", "schema": 1, "transfer": "x", "indices": [1, "2"]}).encode(), "indices"),
        (b" " * (MAX_MESSAGE_BYTES + 1), "over the"),
    ],
)
def test_malformed_messages_are_refused_with_the_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        decode(payload)


def test_records_verify_only_with_the_signing_key_and_untouched() -> None:
    key = Ed25519PrivateKey.generate()
    signed = _job().signed(key)
    decoded = decode(signed.encode())
    assert isinstance(decoded, Job)
    decoded.verify(key.public_key(), "the coordinator")
    with pytest.raises(WireError, match="unsigned; only records signed by the coordinator"):
        _job().verify(key.public_key(), "the coordinator")
    with pytest.raises(WireError, match="bad signature: not from the coordinator"):
        _job(steps=10_000, signature=signed.signature).verify(key.public_key(), "the coordinator")
    with pytest.raises(WireError, match="bad signature"):
        signed.verify(Ed25519PrivateKey.generate().public_key(), "the coordinator")
    status = Status("a", "online", 1.0).signed(key)  # every kind signs the same way
    decode(status.encode()).verify(key.public_key(), "device 'a'")
    with pytest.raises(WireError, match="bad signature"):
        dataclasses.replace(status, state="offline").verify(key.public_key(), "device 'a'")


def test_chunk_frames_check_their_hash() -> None:
    chunk = Chunk("c" * 64, 3, b"payload bytes")
    frame = chunk.encode()
    assert Chunk.is_frame(frame) and Chunk.decode(frame) == chunk
    corrupted = frame[:-1] + bytes([frame[-1] ^ 1])
    with pytest.raises(WireError, match="fails its sha256"):
        Chunk.decode(corrupted)
    with pytest.raises(WireError, match="cut short"):
        Chunk.decode(frame[:5])


def test_topics_and_device_ids() -> None:
    topics = Topics("fleet/eu")
    assert topics.parse(topics.device("jetson-7", "results", "job-1-r2")) == ("jetson-7", "results", "job-1-r2")
    assert topics.parse(topics.device("jetson-7", "status")) == ("jetson-7", "status", None)
    with pytest.raises(WireError, match="not a device topic"):
        topics.parse("fleet/eu/devices/jetson-7/firmware")
    with pytest.raises(WireError, match="prefix"):
        Topics("fleet/#")
    with pytest.raises(WireError, match="device id"):
        check_device_id("a/b")
