"""The embedded broker's logins and topic rules: only enrolled devices, each on its own topics, never as another."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest
from amqtt.contexts import Action
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from coordinator.fleet.broker import EmbeddedBroker, free_port
from coordinator.fleet.broker_access import BrokerAccess
from edge_runtime.identity import login_password, public_pem
from edge_runtime.wire import Topics

TOPICS = Topics()
KEYS = {device: Ed25519PrivateKey.generate() for device in ("a", "b")}


class Client:
    """A plain paho client that records its CONNACK, SUBACK and messages."""

    def __init__(self, port: int, client_id: str, user: str | None = None, password: str | None = None) -> None:
        self.connected, self.subscribed = threading.Event(), threading.Event()
        self.reason: object = None
        self.granted: list[object] = []
        self.messages: list[tuple[str, bytes]] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
        if user is not None:
            self.client.username_pw_set(user, password)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda c, u, mid, codes, props: (self.granted.extend(codes), self.subscribed.set())
        self.client.on_message = lambda c, u, message: self.messages.append((message.topic, message.payload))
        self.client.reconnect_delay_set(60, 60)  # a refused client stays refused for the test's length
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.connected.wait(10)

    def _on_connect(self, client: paho.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        self.reason = reason
        self.connected.set()

    @property
    def accepted(self) -> bool:
        return self.reason is not None and not self.reason.is_failure  # type: ignore[attr-defined]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    enrolled = {device: public_pem(key) for device, key in KEYS.items()}
    with EmbeddedBroker(BrokerAccess(enrolled.get), port=free_port()) as made:
        yield made


def _device(broker: EmbeddedBroker, device: str, key: Ed25519PrivateKey | None = None, client_id: str = "") -> Client:
    password = login_password(key or KEYS[device], device)
    return Client(broker.port, client_id or f"edge-{device}", device, password)


def test_an_anonymous_client_is_refused(broker) -> None:
    client = Client(broker.port, "anyone")
    assert not client.accepted and broker.access.refused_logins >= 1
    client.close()


@pytest.mark.parametrize(
    "who",
    ["a device never enrolled", "a's id with another key's password", "b as client id edge-a", "a as the coordinator"],
)
def test_a_login_that_is_not_the_devices_own_is_refused(broker, who) -> None:
    if who == "a device never enrolled":
        client = _device(broker, "c", Ed25519PrivateKey.generate())
    elif who == "a's id with another key's password":
        client = _device(broker, "a", KEYS["b"])
    elif who == "b as client id edge-a":  # would disconnect a: MQTT drops the older session of a client id
        client = _device(broker, "b", client_id="edge-a")
    else:
        client = Client(broker.port, "coordinator-x", "coordinator", login_password(KEYS["a"], "coordinator"))
    assert not client.accepted, client.reason
    client.close()
    own = _device(broker, "a")  # while a itself gets in
    assert own.accepted
    own.close()


@pytest.mark.parametrize("channel", ["jobs", "answers"])  # answers: a split server's, for one device
def test_a_device_reads_only_its_own_jobs_and_answers(broker, channel) -> None:
    coordinator = Client(broker.port, "coordinator-1", "coordinator", broker.access.coordinator_password)
    a, b = _device(broker, "a"), _device(broker, "b")
    assert coordinator.accepted and a.accepted and b.accepted
    for client, device in ((a, "a"), (b, "a")):  # b tries a's: refused at subscribe (0x80)
        client.subscribed.clear()
        client.client.subscribe(TOPICS.device(device, channel), qos=1)
        assert client.subscribed.wait(10)
    assert not a.granted[0].is_failure and b.granted[0].is_failure  # type: ignore[attr-defined]
    b.subscribed.clear()
    b.client.subscribe(TOPICS.all_devices(channel), qos=1)  # nor with a wildcard
    assert b.subscribed.wait(10) and b.granted[-1].is_failure  # type: ignore[attr-defined]
    coordinator.client.publish(TOPICS.device("a", channel), b"job for a", qos=1, retain=True).wait_for_publish(5)
    coordinator.client.publish(TOPICS.device("b", channel), b"job for b", qos=1).wait_for_publish(5)
    threading.Event().wait(1.0)
    assert a.messages == [(TOPICS.device("a", channel), b"job for a")] and b.messages == []
    for client in (coordinator, a, b):
        client.close()


def test_a_device_writes_split_frames_only_on_its_own_topic() -> None:
    access = BrokerAccess({}.get)
    assert access.topic_allowed("a", TOPICS.device("a", "split"), Action.PUBLISH)
    assert not access.topic_allowed("b", TOPICS.device("a", "split"), Action.PUBLISH)
    assert not access.topic_allowed("a", TOPICS.device("a", "answers"), Action.PUBLISH)  # the server's to write
    assert access.refused_topics == 2


def test_fleet_enroll_records_a_devices_key_and_refuses_what_is_not_one(tmp_path, capsys) -> None:
    from coordinator.cli import main as coordinator
    from coordinator.fleet.registry import Registry

    state = tmp_path / "state"
    (tmp_path / "a.pub").write_text(public_pem(KEYS["a"]))
    (tmp_path / "junk.pub").write_text("not a key")
    assert coordinator(["fleet", "enroll", "a", "--key", str(tmp_path / "a.pub"), "--state", str(state)]) == 0
    assert Registry(state).enrolled_key("a") == public_pem(KEYS["a"])
    assert coordinator(["fleet", "enroll", "b", "--key", str(tmp_path / "junk.pub"), "--state", str(state)]) == 2
    assert "is not a PEM public key" in capsys.readouterr().err
    assert coordinator(["fleet", "enroll", "../x", "--key", str(tmp_path / "a.pub"), "--state", str(state)]) == 2
    assert coordinator(["fleet", "enroll", "a", "--remove", "--state", str(state)]) == 0
    assert Registry(state).enrolled_key("a") is None
