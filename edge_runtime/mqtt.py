"""One MQTT connection (paho-mqtt 2.x): MQTT 5 where the broker has it, else 3.1.1; resubscribes on reconnect."""

from __future__ import annotations

import argparse
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_runtime.errors import ConfigError

log = logging.getLogger(__name__)
DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
V5_ANSWER_SECONDS = 3.0  # a broker that has MQTT 5 answers a local CONNECT well within this


class BrokerUnreachable(ConfigError):
    """Nothing answers at the broker's address (yet): worth trying again, unlike a refused login."""


@dataclass(frozen=True)
class TlsFiles:
    """TLS to the broker: the CA that signed its certificate (None: the system's CAs) and, for mutual TLS, this
    client's certificate and key (PEM files)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError(
                "a client certificate needs its key and a key its certificate: pass --cert and --cert-key"
            )
        for what, path in (("--ca", self.ca), ("--cert", self.cert), ("--cert-key", self.key)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{what} {path} is not a file")

    def context(self) -> ssl.SSLContext:
        """Verifies the broker's certificate and host name, TLS 1.2 or later."""
        context = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert is not None:
            context.load_cert_chain(str(self.cert), str(self.key))
        return context


def add_tls_options(parser: argparse.ArgumentParser) -> None:
    """--ca, --cert and --cert-key, for an mqtts:// broker (the same on every command that connects to one)."""
    parser.add_argument("--ca", type=Path, help="for mqtts://: the CA certificate that signed the broker's (PEM)")
    parser.add_argument("--cert", type=Path, help="for mutual TLS: this client's certificate (PEM)")
    parser.add_argument("--cert-key", type=Path, help="for mutual TLS: this client's private key (PEM)")


def tls_from_args(args: argparse.Namespace) -> TlsFiles | None:
    if args.ca is None and args.cert is None and args.cert_key is None:
        return None
    return TlsFiles(args.ca, args.cert, args.cert_key)


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker listens, who we are to it, and (for mqtts://) how its certificate is checked."""

    host: str
    port: int = DEFAULT_PORT
    username: str | None = None
    password: str | None = None
    tls: TlsFiles | None = None

    @classmethod
    def parse(
        cls, url: str, username: str | None = None, password: str | None = None, tls: TlsFiles | None = None
    ) -> BrokerAddress:
        """`mqtt[s]://[user[:password]@]host[:port]`; explicit `username`/`password` win over the URL's.

        mqtts:// speaks TLS (with `tls`'s CA and client certificate, else the system's CAs); port 8883 by default.
        """
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise ConfigError(f"broker {url!r} is not mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS)")
        if parsed.scheme == "mqtt" and tls is not None:
            raise ConfigError(f"--ca or --cert given for {url!r}, which is not TLS; use mqtts://")
        try:
            port = parsed.port or (DEFAULT_TLS_PORT if parsed.scheme == "mqtts" else DEFAULT_PORT)
        except ValueError:
            raise ConfigError(f"broker {url!r} has a bad port; use e.g. mqtt://127.0.0.1:1883") from None
        user = username or (unquote(parsed.username) if parsed.username else None)
        secret = password or (unquote(parsed.password) if parsed.password else None)
        return cls(parsed.hostname, port, user, secret, (tls or TlsFiles()) if parsed.scheme == "mqtts" else None)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


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
        if self.address.tls is not None:
            client.tls_set_context(self.address.tls.context())
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
            except ssl.SSLError as error:  # a certificate that does not verify will not verify next time either
                raise ConfigError(
                    f"TLS with the MQTT broker at {self.address} failed ({error.reason or error}); check --ca (the CA "
                    "that signed the broker's certificate) and the host name in the URL"
                ) from None
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
