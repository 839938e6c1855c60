"""Real brokers for the fleet tests: Mosquitto with passwords and a per-device ACL, and the embedded amqtt broker."""

from __future__ import annotations

import getpass
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coordinator.bundles.request import BundleRequest
from coordinator.datasets import write_jsonl
from coordinator.fleet.broker import EmbeddedBroker, free_port
from coordinator.fleet.broker_access import BrokerAccess
from coordinator.fleet.jobs import JobSpec
from coordinator.fleet.registry import Registry
from coordinator.fleet.service import FleetService
from coordinator.train import TrainConfig
from device_profiles import load_profile
from edge_runtime.daemon import DaemonConfig, EdgeDaemon
from edge_runtime.identity import device_key, login_password, public_pem
from edge_runtime.mqtt import BrokerAddress, TlsFiles
from edge_runtime.wire import Topics
from tests.certificates import Pki
from tests.conftest import make_model, make_tokenizer, sentiment_examples
from tests.postgres import Postgres

USERS = ("coordinator", "a", "b", "c")
# A device may write only its own device topics and read only its jobs and transfers; the coordinator reads all.
ACL = """user coordinator
topic readwrite offsite/#

pattern read offsite/devices/%u/jobs
pattern read offsite/devices/%u/transfer
pattern read offsite/devices/%u/answers
pattern write offsite/devices/%u/status
pattern write offsite/devices/%u/profile
pattern write offsite/devices/%u/events
pattern write offsite/devices/%u/acks
pattern write offsite/devices/%u/split
pattern write offsite/devices/%u/results/#
"""


def wait_for(condition: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


class Mosquitto:
    """Mosquitto on a free loopback port with its own config, password file and ACL; can be killed and restarted.

    With `pki` it listens only for TLS with `pki.server` (and with `client_certificates`, demands a client
    certificate `pki.ca` signed); `address` then carries `pki.ca` and the client's certificate.
    """

    name = "mosquitto"

    def __init__(self, directory: Path, pki: Pki | None = None, client_certificates: bool = False) -> None:
        binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if binary is None:
            message = "mosquitto is not installed (apt-get install -y mosquitto; `make test` does it where it can)"
            if os.environ.get("OFFSITE_EDGE_REQUIRE_MOSQUITTO"):
                pytest.fail(message)
            pytest.skip(message)
        self.binary, self.directory, self.port = binary, directory, free_port()
        directory.mkdir(parents=True, exist_ok=True)
        passwords = directory / "passwords"
        passwords.write_text("")
        for user in USERS:
            subprocess.run(
                [
                    shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd",
                    "-b",
                    str(passwords),
                    user,
                    f"{user}-secret",
                ],
                check=True,
                capture_output=True,
            )
        (directory / "acl").write_text(ACL)
        tls = ""
        self.tls = None
        if pki is not None:
            tls = (f"cafile {pki.ca}\ncertfile {pki.server}\nkeyfile {pki.server_key}\ntls_version tlsv1.2\n"
                   f"require_certificate {'true' if client_certificates else 'false'}\n")  # fmt: skip
            self.tls = TlsFiles(pki.ca, pki.client, pki.client_key)
        (directory / "mosquitto.conf").write_text(
            f"listener {self.port} 127.0.0.1\n{tls}allow_anonymous false\npassword_file {passwords}\n"
            f"acl_file {directory / 'acl'}\npersistence false\nuser {getpass.getuser()}\n"
            f"log_dest file {directory / 'mosquitto.log'}\n"
        )
        self.process: subprocess.Popen | None = None

    def start(self) -> Mosquitto:
        self.process = subprocess.Popen([self.binary, "-c", str(self.directory / "mosquitto.conf")])
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    log = (
                        (self.directory / "mosquitto.log").read_text()
                        if (self.directory / "mosquitto.log").exists()
                        else ""
                    )
                    raise RuntimeError(f"mosquitto did not start on port {self.port}: {log}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def address(self, user: str) -> BrokerAddress:
        return BrokerAddress("127.0.0.1", self.port, user, f"{user}-secret", self.tls)

    def enroll(self, device: str, pem: str) -> None:
        """Mosquitto's logins are its password file's."""


class Amqtt:
    """The embedded broker `coordinator serve` starts by default: enrolled devices only, each on its own topics."""

    name = "amqtt"

    def __init__(self, directory: Path) -> None:
        self.enrolled: dict[str, str] = {}
        self.broker = EmbeddedBroker(BrokerAccess(self.enrolled.get), port=free_port())

    def start(self) -> Amqtt:
        self.broker.start()
        return self

    def kill(self) -> None:
        self.broker.stop()

    def address(self, user: str) -> BrokerAddress:
        """The coordinator's login; a device logs in by its key (the daemon makes its password)."""
        return (
            self.broker.coordinator_address() if user == "coordinator" else BrokerAddress("127.0.0.1", self.broker.port)
        )

    def enroll(self, device: str, pem: str) -> None:
        self.enrolled[device] = pem


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto").start()
    yield broker
    broker.kill()


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Mosquitto | Amqtt]:
    """Each protocol test runs against both brokers."""
    made = (Mosquitto if request.param == "mosquitto" else Amqtt)(tmp_path / "broker").start()
    yield made
    made.kill()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    server = Postgres().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest) -> str | None:
    """Each registry test runs on both databases: None (the SQLite file) or a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        return None
    server = request.getfixturevalue("postgres_server")
    return server.database(f"test_{secrets.token_hex(4)}")


@pytest.fixture(scope="session")
def fleet_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny LLaMA folder, signing keys, three devices' private shards (40, 24 and 32 reviews) and a test set."""
    from coordinator.cli import main as coordinator

    root = tmp_path_factory.mktemp("fleet-files")
    tokenizer = make_tokenizer()
    make_model("llama", vocab_size=len(tokenizer)).save_pretrained(root / "tiny-llama")
    tokenizer.save_pretrained(root / "tiny-llama")
    write_jsonl(root / "a.jsonl", sentiment_examples(40, seed=1))
    write_jsonl(root / "b.jsonl", sentiment_examples(24, seed=2))
    write_jsonl(root / "c.jsonl", sentiment_examples(32, seed=4))
    write_jsonl(root / "test.jsonl", sentiment_examples(32, seed=3))
    assert coordinator(["keys", "init", "--out", str(root / "keys")]) == 0
    return {
        "model": root / "tiny-llama",
        "key": root / "keys" / "coordinator.key",
        "trust": root / "keys" / "coordinator.pub",
        "a": root / "a.jsonl",
        "b": root / "b.jsonl",
        "c": root / "c.jsonl",
        "test": root / "test.jsonl",
    }


def tiny_spec(files: dict[str, Path], **change: object) -> dict[str, object]:
    """A registry job spec for the tiny fleet; `change` sets JobSpec fields, or `steps`/`checkpoint_every`/
    `adapter_kind`/`dp` of its bundle request."""
    steps, every = change.pop("steps", 10), change.pop("checkpoint_every", 5)
    kind, dp = str(change.pop("adapter_kind", "layers")), change.pop("dp", None)
    training = TrainConfig(steps, 1e-3, batch_size=8, max_length=32)  # type: ignore[arg-type]
    request = BundleRequest(
        str(files["model"]), (1, 1), keep=2, adapter_kind=kind, training=training, checkpoint_every=every, dp=dp
    )
    return JobSpec("reviews", request, rounds=2, test=str(files["test"])).to_dict() | change  # type: ignore[arg-type]


class Fleet:
    """A coordinator service and edge daemons, each on its own thread, against one broker; stopped on exit."""

    def __init__(
        self, broker: Mosquitto | Amqtt, files: dict[str, Path], root: Path, registry_url: str | None = None
    ) -> None:
        self.broker, self.files, self.root = broker, files, root
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.daemons: dict[str, EdgeDaemon] = {}
        self.service = FleetService(
            Registry(root / "coordinator", registry_url),
            broker.address("coordinator"),
            files["key"],
            root / "coordinator" / "files",
            Topics(),
        )

    def start_service(self) -> FleetService:
        self._thread(self.service.run, "service")
        wait_for(self.service.connection.connected.is_set, 30, "the coordinator to connect")
        return self.service

    def daemon_config(self, device: str, **change: object) -> DaemonConfig:
        values: dict = {
            "device_id": device,
            "profile": load_profile("laptop-16gb"),
            "datasets": {"reviews": self.files[device]},
            "trusted_key": self.files["trust"],
            "state": self.root / f"device-{device}",
            "threads": 1,
        }
        return DaemonConfig(**(values | change))

    def enroll(self, device: str, state: Path | None = None) -> str:
        """Make `device`'s key in its state folder and enroll it, as `edge-runtime keys` and `fleet enroll` do."""
        pem = public_pem(device_key(state or self.root / f"device-{device}"))
        self.service.registry.enroll(device, pem)
        self.broker.enroll(device, pem)
        return pem

    def device_address(self, device: str) -> BrokerAddress:
        """How `device` logs in: Mosquitto's password, or on the embedded broker the password its key makes."""
        address = self.broker.address(device)
        if address.username is None:
            password = login_password(device_key(self.root / f"device-{device}"), device)
            address = BrokerAddress(address.host, address.port, device, password)
        return address

    def start_daemon(self, device: str, **change: object) -> EdgeDaemon:
        config = self.daemon_config(device, **change)
        self.enroll(device, config.state)
        daemon = EdgeDaemon(config, self.broker.address(device))
        self.daemons[device] = daemon
        self._thread(daemon.run, f"device-{device}")
        wait_for(lambda: (self.service.registry.device(device) or {}).get("profile"), 30, f"{device} to announce")
        return daemon

    def _thread(self, target: Callable[[threading.Event], None], name: str) -> None:
        thread = threading.Thread(target=target, args=(self.stop,), name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)


@pytest.fixture
def make_fleet(fleet_files: dict[str, Path], tmp_path: Path) -> Iterator[Callable[[Mosquitto | Amqtt], Fleet]]:
    fleets: list[Fleet] = []

    def make(broker: Mosquitto | Amqtt, registry_url: str | None = None) -> Fleet:
        fleets.append(Fleet(broker, fleet_files, tmp_path / f"fleet-{len(fleets)}", registry_url))
        return fleets[-1]

    yield make
    for fleet in fleets:
        fleet.close()
