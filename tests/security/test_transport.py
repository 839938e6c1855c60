"""TLS to the broker: a job over mutual TLS with Mosquitto, a certificate from another CA refused, a client without
a certificate refused where one is required, and the embedded broker's own TLS listener."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.fleet.broker import EmbeddedBroker, free_port
from coordinator.fleet.broker_access import BrokerAccess
from edge_runtime.errors import ConfigError, OffsiteError
from edge_runtime.mqtt import BrokerAddress, Connection, TlsFiles
from tests.certificates import make_pki
from tests.fleet.conftest import Mosquitto, tiny_spec, wait_for


def _roundtrip(address: BrokerAddress, client_id: str, topic: str) -> None:
    got: list[bytes] = []
    connection = Connection(address, client_id, [topic], lambda _, payload: got.append(payload)).start(timeout=10)
    try:
        connection.publish(topic, b"over tls")
        wait_for(lambda: got == [b"over tls"], 10, "the message back")
    finally:
        connection.close()


def test_a_fleet_job_runs_over_mutual_tls(tmp_path: Path, make_fleet) -> None:
    pki = make_pki(tmp_path / "pki")
    broker = Mosquitto(tmp_path / "mosquitto", pki, client_certificates=True).start()
    try:
        fleet = make_fleet(broker)
        fleet.start_service()
        fleet.start_daemon("a")
        assert fleet.service.connection.address.tls is not None
        job = fleet.service.registry.add_job(tiny_spec(fleet.files, rounds=1, devices=["a"]))
        wait_for(lambda: fleet.service.registry.job(job)["state"] in ("done", "failed"), 180, "the job over TLS")
        assert fleet.service.registry.job(job)["state"] == "done", fleet.service.registry.job(job)["detail"]
    finally:
        broker.kill()


def test_a_broker_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    pki, stranger = make_pki(tmp_path / "pki"), make_pki(tmp_path / "other", "other-ca")
    broker = Mosquitto(tmp_path / "mosquitto", pki).start()
    try:
        _roundtrip(broker.address("coordinator"), "coordinator-ok", "offsite/devices/a/status")  # the right CA
        wrong = BrokerAddress("127.0.0.1", broker.port, "coordinator", "coordinator-secret", TlsFiles(stranger.ca))
        with pytest.raises(ConfigError, match=r"TLS with the MQTT broker .* failed .*--ca"):
            Connection(wrong, "coordinator-wrong-ca", [], lambda *_: None).start(timeout=5)
    finally:
        broker.kill()


def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    broker = Mosquitto(tmp_path / "mosquitto", pki, client_certificates=True).start()
    try:
        bare = BrokerAddress("127.0.0.1", broker.port, "coordinator", "coordinator-secret", TlsFiles(pki.ca))
        with pytest.raises(OffsiteError):
            Connection(bare, "coordinator-bare", [], lambda *_: None).start(timeout=4)
    finally:
        broker.kill()


def test_the_embedded_broker_listens_for_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    with EmbeddedBroker(BrokerAccess(lambda _: None), port=free_port(), tls=(pki.server, pki.server_key)) as broker:
        assert broker.url.startswith("mqtts://")
        _roundtrip(broker.coordinator_address(pki.ca), "coordinator-tls", "offsite/devices/a/status")
        plain = BrokerAddress("127.0.0.1", broker.port, "coordinator", broker.access.coordinator_password)
        with pytest.raises(OffsiteError):  # plain MQTT to a TLS port gets no answer it can read
            Connection(plain, "coordinator-plain", [], lambda *_: None).start(timeout=3)


def test_broker_urls_say_whether_they_are_tls(tmp_path: Path) -> None:
    assert BrokerAddress.parse("mqtts://broker.example").port == 8883
    assert BrokerAddress.parse("mqtts://broker.example").tls == TlsFiles()
    assert BrokerAddress.parse("mqtt://broker.example").tls is None
    with pytest.raises(ConfigError, match="not TLS; use mqtts://"):
        BrokerAddress.parse("mqtt://broker.example", tls=TlsFiles())
    with pytest.raises(ConfigError, match=r"--ca .* is not a file"):
        TlsFiles(tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match="needs its key"):
        TlsFiles(None, tmp_path / "client.pem")
