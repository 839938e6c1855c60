"""One MQTT connection (paho-mqtt 2.x): MQTT 5 where the broker has it, else 3.1.1; resubscribes on reconnect."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_runtime.errors import ConfigError

log = logging.getLogger(__name__)
DEFAULT_PORT = 1883
V5_ANSWER_SECONDS = 3.0  # a broker that has MQTT 5 answers a local CONNECT well within this


class BrokerUnreachable(ConfigError):
    """Nothing answers at the broker's address (yet): worth trying again, unlike a refused login."""


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker listens and who we are to it."""

    host: str
    port: int = DEFAULT_PORT
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str, username: str | None = None, password: str | None = None) -> BrokerAddress:
        """`mqtt://[user[:password]@]host[:port]`; explicit `username`/`password` win over the URL's."""
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme != "mqtt" or not parsed.hostname:
            raise ConfigError(f"broker {url!r} is not mqtt://HOST[:PORT] (TLS brokers are not supported yet)")
        try:
            port = parsed.port or DEFAULT_PORT
        except ValueError:
            raise ConfigError(f"broker {url!r} has a bad port; use e.g. mqtt://127.0.0.1:1883") from None
        user = username or (unquote(parsed.username) if parsed.username else None)
        secret = password or (unquote(parsed.password) if parsed.password else None)
        return cls(parsed.hostname, port, user, secret)

    def __str__(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


@dataclass
class Traffic:
    """Messages and payload bytes this connection sent and received."""

    sent_messages: int = 0
    sent_bytes: int = 0
    received_messages: int = 0
    received_bytes: int = 0


class Connection:
    """A client that stays connected: reconnects with backoff, resubscribes, and hands each message to `on_message`.

    `on_message(topic, payload)` runs on paho's network thread: keep it short (queue the work).
    """

    def __init__(
        self,
        address: BrokerAddress,
        client_id: str,
        subscriptions: list[str],
        on_message: Callable[[str, bytes], None],
        will: tuple[str, bytes] | None = None,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self.address = address
        self.client_id = client_id
        self.subscriptions = subscriptions
        self.handler = on_message
        self.will = will
        self.connected_hook = on_connect
        self.traffic = Traffic()
        self.protocol = paho.MQTTv5
        self.connected = threading.Event()
        self._refused: str | None = None
        self.client = self._client(paho.MQTTv5)

    def _client(self, protocol: int) -> paho.Client:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol)
        if self.address.username is not None:
            client.username_pw_set(self.address.username, self.address.password)
        if self.will is not None:
            client.will_set(self.will[0], self.will[1], qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=16)
        client.max_queued_messages_set(0)
        client.on_connect = self._connected
        client.on_disconnect = self._disconnected
        client.on_message = self._message
        return client

    def start(self, timeout: float = 15.0) -> Connection:
        """Connect (MQTT 5, or 3.1.1 if the broker refuses 5) and start the network thread.

        amqtt refuses MQTT 5 with a CONNACK, or (when a Last Will is set) by never answering: both fall back.
        """
        for protocol, wait in ((paho.MQTTv5, min(timeout, V5_ANSWER_SECONDS)), (paho.MQTTv311, timeout)):
            self.protocol = protocol
            self.client = self._client(protocol)
            self._refused = None
            try:
                self.client.connect(self.address.host, self.address.port, keepalive=30)
            except OSError as error:
                raise BrokerUnreachable(f"cannot reach the MQTT broker at {self.address}: {error}") from None
            self.client.loop_start()
            if self.connected.wait(wait):
                return self
            self.client.loop_stop()
            self.client.disconnect()
            if self._refused is not None and "protocol" not in self._refused.lower():
                raise ConfigError(f"the MQTT broker at {self.address} refused {self.client_id!r}: {self._refused}")
        raise ConfigError(f"the MQTT broker at {self.address} did not answer within {timeout:.0f} s")

    @property
    def protocol_name(self) -> str:
        return "MQTT 5" if self.protocol == paho.MQTTv5 else "MQTT 3.1.1"

    def _connected(self, client: paho.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        if getattr(reason, "is_failure", False):
            self._refused = str(reason)
            client.disconnect()  # no retry loop against a broker that refuses us
            return
        for topic in self.subscriptions:  # a clean session forgets subscriptions: make them again every time
            client.subscribe(topic, qos=1)
        self.connected.set()
        if self.connected_hook is not None:
            self.connected_hook()

    def _disconnected(self, client: paho.Client, userdata: object, flags: object, reason: object, _: object) -> None:
        if self.connected.is_set():
            log.warning("%s lost the broker at %s (%s); reconnecting", self.client_id, self.address, reason)
        self.connected.clear()

    def _message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        self.traffic.received_messages += 1
        self.traffic.received_bytes += len(message.payload)
        self.handler(message.topic, message.payload)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish at QoS 1; paho queues it while the broker is away and sends it on reconnect."""
        self.traffic.sent_messages += 1
        self.traffic.sent_bytes += len(payload)
        self.client.publish(topic, payload, qos=1, retain=retain)

    def close(self) -> None:
        self.connected.clear()  # a disconnect we asked for is not worth a warning
        self.client.disconnect()
        self.client.loop_stop()
