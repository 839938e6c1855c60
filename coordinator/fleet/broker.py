"""The zero-setup default: an embedded MQTT 3.1.1 broker (amqtt) on loopback, in a thread of this process."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

from coordinator.errors import ConfigError

log = logging.getLogger(__name__)
for _noisy in ("amqtt", "transitions"):  # amqtt logs every connection at INFO and every bad packet with a trace
    logging.getLogger(_noisy).setLevel(logging.ERROR)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class EmbeddedBroker:
    """amqtt on `host:port` with anonymous clients allowed (loopback only by default); use as a context manager.

    with EmbeddedBroker(port=1883) as broker:
        print(broker.url)   # mqtt://127.0.0.1:1883
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host, self.port = host, port
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
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> EmbeddedBroker:
        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
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
