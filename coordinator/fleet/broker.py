"""The zero-setup default: an embedded MQTT 3.1.1 broker (amqtt) on loopback, in a thread of this process, that
only enrolled devices and the coordinator may log in to, each device on its own topics (`broker_access`)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from pathlib import Path

from coordinator.errors import ConfigError
from coordinator.fleet.broker_access import COORDINATOR_USER, BrokerAccess
from edge_runtime.mqtt import BrokerAddress, TlsFiles

log = logging.getLogger(__name__)
for _noisy in ("amqtt", "transitions"):  # amqtt logs every connection at INFO and every bad packet with a trace
    logging.getLogger(_noisy).setLevel(logging.ERROR)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class EmbeddedBroker:
    """amqtt on `host:port` (loopback by default), with `access` deciding logins and topics; a context manager.

    with EmbeddedBroker(BrokerAccess(registry.enrolled_key), port=1883) as broker:
        service_address = broker.coordinator_address()   # mqtt://coordinator:SECRET@127.0.0.1:1883

    With `tls` (the server's certificate and key) the listener speaks only TLS (mqtts://).
    """

    def __init__(
        self, access: BrokerAccess, host: str = "127.0.0.1", port: int = 1883, tls: tuple[Path, Path] | None = None
    ) -> None:
        self.access, self.host, self.port, self.tls = access, host, port, tls
        self.loop = asyncio.new_event_loop()
        # amqtt lets some session errors escape to the loop (e.g. under many concurrent connects); the client
        # reconnects, so one line is enough, not a traceback per client.
        self.loop.set_exception_handler(
            lambda _, context: log.warning("embedded broker: %s", context.get("exception") or context.get("message"))
        )
        self.thread = threading.Thread(target=self.loop.run_forever, name="amqtt", daemon=True)
        self.broker = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def coordinator_address(self, ca: Path | None = None) -> BrokerAddress:
        """How the coordinator in this process logs in (`ca`: what signed the TLS listener's certificate)."""
        tls = TlsFiles(ca) if self.tls else None
        return BrokerAddress(self.host, self.port, COORDINATOR_USER, self.access.coordinator_password, tls)

    def start(self) -> EmbeddedBroker:
        from amqtt.broker import Broker

        listener: dict[str, object] = {"type": "tcp", "bind": f"{self.host}:{self.port}"}
        if self.tls:
            listener |= {"ssl": True, "certfile": str(self.tls[0]), "keyfile": str(self.tls[1])}
        policy = {"policy": self.access.register()}
        config = {
            "listeners": {"default": listener},
            "plugins": {
                "coordinator.fleet.broker_access.FleetLogin": policy,
                "coordinator.fleet.broker_access.FleetTopics": policy,
            },
        }
        self.thread.start()

        async def start() -> Broker:
            broker = Broker(config)
            await broker.start()
            return broker

        try:
            self.broker = asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=30)
        except Exception as error:  # amqtt raises its own BrokerError or an OSError: both mean "cannot listen"
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise ConfigError(
                f"cannot start the embedded MQTT broker on {self.host}:{self.port} ({error}); pick another --listen "
                "port or pass --broker mqtt://HOST:PORT of a running broker"
            ) from None
        return self

    def stop(self) -> None:
        if self.broker is not None:
            asyncio.run_coroutine_threadsafe(self.broker.shutdown(), self.loop).result(timeout=30)
            self.broker = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
