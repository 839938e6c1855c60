"""The fleet protocol end to end on a tiny model, against Mosquitto (passwords + ACL) and the embedded broker."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from safetensors.torch import load_file

from edge_runtime.mqtt import BrokerAddress, Connection
from edge_runtime.transfer import sha256_file
from edge_runtime.wire import MAX_MESSAGE_BYTES, Chunk, Job, Offer, Status, Topics
from exporters.bundle import load_private_key
from tests.fleet.conftest import tiny_spec, wait_for

TOPICS = Topics()


def _finished(fleet, job: str, timeout: float = 120) -> dict:
    wait_for(lambda: fleet.service.registry.job(job)["state"] in ("done", "failed"), timeout, f"{job} to finish")
    return fleet.service.registry.job(job)


def test_two_devices_two_rounds_of_fedavg(broker, make_fleet) -> None:
    fleet = make_fleet(broker)
    registry = fleet.service.registry
    fleet.start_service()
    fleet.start_daemon("a")
    fleet.start_daemon("b")
    assert {d["id"]: d["datasets"] for d in registry.devices()} == {"a": {"reviews": 40}, "b": {"reviews": 24}}

    job = registry.add_job(tiny_spec(fleet.files))
    record = _finished(fleet, job)
    assert record["state"] == "done", record["detail"]

    tasks = registry.tasks(job)
    assert [(t["round"], t["device"], t["state"], t["examples"]) for t in tasks] == [
        (1, "a", "received", 40),
        (1, "b", "received", 24),
        (2, "a", "received", 40),
        (2, "b", "received", 24),
    ]
    rounds = registry.rounds(job)
    for round_ in (1, 2):
        results = {
            t["device"]: load_file(Path(t["result"]) / "adapter.safetensors") for t in tasks if t["round"] == round_
        }
        aggregate = load_file(Path(rounds[round_ - 1]["aggregate"]) / "adapter.safetensors")
        assert set(aggregate) == set(results["a"])
        for name, tensor in aggregate.items():  # FedAvg weighted by examples: 40 and 24
            torch.testing.assert_close(tensor, (40 * results["a"][name] + 24 * results["b"][name]) / 64)
        assert rounds[round_ - 1]["evaluation"]["examples"] == 32
    first_aggregate = Path(rounds[0]["aggregate"]) / "adapter.safetensors"
    for task in tasks:  # round 2 started from round 1's aggregate, on both devices
        expected = sha256_file(first_aggregate) if task["round"] == 2 else None
        assert task["metrics"]["start_adapter"] == expected
        assert task["bytes_received"] > 0 and task["bytes_sent"] > 0
    assert fleet.service.refused == 0, list(fleet.service.rejections)


@pytest.mark.parametrize(
    ("spec", "kind", "suffixes"),
    [("lora:r=2", "lora", {"lora_A", "lora_B"}), ("prompt:tokens=2", "prompt", {"soft_prompt"})],
)
def test_a_small_kinds_job_moves_only_its_tensors_and_averages_them(broker, make_fleet, spec, kind, suffixes) -> None:
    fleet = make_fleet(broker)
    fleet.start_service()
    fleet.start_daemon("a")
    fleet.start_daemon("b")
    job = fleet.service.registry.add_job(tiny_spec(fleet.files, rounds=1, adapter_kind=spec))
    record = _finished(fleet, job)
    assert record["state"] == "done", record["detail"]
    tasks = fleet.service.registry.tasks(job)
    results = {t["device"]: load_file(Path(t["result"]) / "adapter.safetensors") for t in tasks}
    assert {name.rsplit(".", 1)[-1] for name in results["a"]} == suffixes
    aggregate = load_file(Path(fleet.service.registry.rounds(job)[0]["aggregate"]) / "adapter.safetensors")
    for name, tensor in aggregate.items():  # each tensor (LoRA's A and B each) averaged, weighted by examples: 40, 24
        torch.testing.assert_close(tensor, (40 * results["a"][name] + 24 * results["b"][name]) / 64)
    assert all(t["metrics"]["adapter_kind"] == kind for t in tasks)
    assert fleet.service.registry.rounds(job)[0]["evaluation"]["examples"] == 32  # scored with the kind plugged in


def test_a_device_that_cannot_fit_the_job_says_so_and_is_skipped(broker, make_fleet) -> None:
    fleet = make_fleet(broker)
    fleet.start_service()
    fleet.start_daemon("a")
    fleet.start_daemon("b", budget_bytes=2**20)
    job = fleet.service.registry.add_job(tiny_spec(fleet.files, rounds=1))
    assert _finished(fleet, job)["state"] == "done"
    states = {t["device"]: (t["state"], t["detail"].get("reason", "")) for t in fleet.service.registry.tasks(job)}
    assert states["a"][0] == "received"
    assert states["b"][0] == "skipped" and "budget is 1 MiB" in states["b"][1]


def _raw_client(broker, user: str, address: BrokerAddress | None = None) -> paho.Client:
    """A plain paho client as `user` (client id edge-USER:…, as the embedded broker lets a device in)."""
    client_id = f"edge-{user}:{secrets.token_hex(3)}"
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
    address = address or broker.address(user)
    if address.username:
        client.username_pw_set(address.username, address.password)
    client.connect(address.host, address.port)
    client.loop_start()
    return client


def test_bad_inputs_are_rejected_and_logged_while_both_sides_keep_serving(broker, make_fleet, fleet_files) -> None:
    fleet = make_fleet(broker)
    fleet.start_service()
    daemon = fleet.start_daemon("a")
    key = load_private_key(fleet_files["key"])
    bundle = {"transfer": "0" * 64, "name": "bundle", "size": 1, "chunk_bytes": 1}

    def job(**change: object) -> Job:
        fields = {
            "job": "job-x-r1",
            "device": "a",
            "round": 1,
            "dataset": "nope",
            "steps": 1,
            "bundle": bundle,
            "start_adapter": None,
            "issued_at": time.time(),
            "nonce": secrets.token_hex(8),
        }
        return Job(**(fields | change))

    replayed = job().signed(key).encode()
    bad_inputs = [
        (b"{malformed", "not JSON"),
        (json.dumps({"kind": "status", "schema": 7}).encode(), "wire schema 7"),
        (job().encode(), "unsigned"),
        (job().signed(Ed25519PrivateKey.generate()).encode(), "bad signature"),
        (job(issued_at=time.time() - 3600).signed(key).encode(), "outside the 600 s window"),
        (replayed, "no dataset named 'nope'"),  # valid: refused for its dataset, and its nonce is now spent
        (replayed, "a replay"),
        (b"x" * (MAX_MESSAGE_BYTES + 10), "over the"),
    ]
    coordinator = _raw_client(broker, "coordinator")
    for payload, reason in bad_inputs:
        coordinator.publish(TOPICS.device("a", "jobs"), payload, qos=1).wait_for_publish(5)
        wait_for(lambda reason=reason: any(reason in r for r in daemon.rejections), 10, f"rejection: {reason}")
    frame = bytearray(Chunk("1" * 64, 0, b"data").encode())
    frame[-1] ^= 1
    coordinator.publish(TOPICS.device("a", "transfer"), bytes(frame), qos=1).wait_for_publish(5)
    wait_for(lambda: any("fails its sha256" in r for r in daemon.rejections), 10, "the corrupted chunk's rejection")
    coordinator.disconnect()

    device = _raw_client(broker, "a", fleet.device_address("a"))
    offer = Offer("2" * 64, "result", 10, 10, "job-unknown-r1").signed(daemon.identity)
    device.publish(TOPICS.device("a", "results", "job-unknown-r1"), offer.encode(), qos=1).wait_for_publish(5)
    wait_for(lambda: any("never sent to it" in r for r in fleet.service.rejections), 10, "the coordinator's rejection")
    device.disconnect()

    # Both still serve: a real job runs to the end on the same daemon and service.
    job_id = fleet.service.registry.add_job(tiny_spec(fleet.files, rounds=1, devices=["a"]))
    assert _finished(fleet, job_id)["state"] == "done"


def test_a_device_cannot_write_another_devices_topics(broker, make_fleet) -> None:
    fleet = make_fleet(broker)
    fleet.enroll("a"), fleet.enroll("b")
    seen: list[tuple[str, bytes]] = []
    watcher = Connection(
        broker.address("coordinator"),
        "coordinator-watcher",
        [TOPICS.all_devices("status")],
        lambda topic, payload: seen.append((topic, payload)),
    ).start()
    intruder = _raw_client(broker, "b", fleet.device_address("b"))
    first = Status("b", "online", time.time()).encode()

    def heard_first() -> bool:  # until the watcher's subscription is in force (b may say it again)
        intruder.publish(TOPICS.device("b", "status"), first, qos=1).wait_for_publish(5)
        return (TOPICS.device("b", "status"), first) in seen

    wait_for(heard_first, 30, "b's first status")
    forged = Status("a", "offline", time.time()).encode()
    intruder.publish(TOPICS.device("a", "status"), forged, qos=1).wait_for_publish(5)
    own = Status("b", "busy", time.time()).encode()  # after the forged one, from the same client: in order
    intruder.publish(TOPICS.device("b", "status"), own, qos=1).wait_for_publish(5)
    wait_for(lambda: (TOPICS.device("b", "status"), own) in seen, 30, "b's own status")
    assert (TOPICS.device("a", "status"), forged) not in seen  # the broker dropped it: b may not write a's topics
    intruder.disconnect()
    watcher.close()


def test_wrong_credentials_are_refused_with_a_clear_error(mosquitto) -> None:
    from edge_runtime.errors import ConfigError
    from edge_runtime.mqtt import BrokerAddress

    wrong = BrokerAddress("127.0.0.1", mosquitto.port, "a", "not-the-password")
    with pytest.raises(ConfigError, match="refused 'edge-a'"):
        Connection(wrong, "edge-a", [], lambda topic, payload: None).start(timeout=5)


def test_a_daemon_started_before_its_broker_waits_for_it(fleet_files, tmp_path) -> None:
    import threading

    from coordinator.fleet.broker import EmbeddedBroker, free_port
    from coordinator.fleet.broker_access import BrokerAccess
    from device_profiles import load_profile
    from edge_runtime.daemon import DaemonConfig, EdgeDaemon
    from edge_runtime.identity import public_pem
    from edge_runtime.mqtt import BrokerAddress

    port = free_port()
    config = DaemonConfig(
        "a", load_profile("laptop-16gb"), {"reviews": fleet_files["a"]}, fleet_files["trust"], tmp_path
    )
    daemon = EdgeDaemon(config, BrokerAddress("127.0.0.1", port))
    stop = threading.Event()
    thread = threading.Thread(target=daemon.run, args=(stop,), daemon=True)
    thread.start()
    time.sleep(1.5)  # refused at least once
    assert not daemon.connection.connected.is_set()
    enrolled = {"a": public_pem(daemon.identity)}
    with EmbeddedBroker(BrokerAccess(enrolled.get), port=port):
        wait_for(daemon.connection.connected.is_set, 30, "the daemon to connect once the broker is up")
        stop.set()
        thread.join(timeout=10)
