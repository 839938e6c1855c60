"""Split learning over a real broker: a run whose broker dies mid-epoch ends exactly as in process, and plugs in;
so does the ONNX Runtime device side."""

from __future__ import annotations

import threading

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.split.remote import RemoteExchange
from coordinator.split.serve import CutLimits, SplitServer, SplitService
from coordinator.split.sides import prompt_weights, split_model
from coordinator.split.train import ServerExchange, SplitSetup, train_split
from coordinator.train import TrainConfig
from edge_runtime.backends.split_ort import OrtCutSide
from edge_runtime.identity import login_password, public_pem
from edge_runtime.mqtt import BrokerAddress
from edge_runtime.split_client import NoAnswer, SplitClient
from edge_runtime.split_device import CutExchange, train_cut_side
from tests.conftest import make_model, sentiment_examples
from tests.fleet.conftest import Amqtt, Mosquitto
from tests.split_helpers import PROMPT, InProcess, export_device_side, sentiment_task, training_record

TRAINING = TrainConfig(steps=8, lr=3e-2, batch_size=8, warmup_ratio=0.0)  # 32 reviews: an epoch is 4 steps
COORDINATOR, DEVICE = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()


def train_over(broker: Mosquitto | Amqtt, device_address: BrokerAddress, on_step=None):
    """The prompt trained through a split server on `broker`; the split device side, the client, the model."""
    task = sentiment_task()
    model = make_model("llama", num_layers=4)
    device, server = split_model(model, 2, PROMPT)
    limits = CutLimits(TRAINING.batch_size, PROMPT.tokens + TRAINING.max_length, model.config.hidden_size, 2)
    serving = SplitServer(server, task.label_token_ids, "job-1", COORDINATOR, {"a": DEVICE.public_key()}, limits)
    service = SplitService(serving, broker.address("coordinator")).start()
    client = SplitClient(device_address, "a", "job-1", DEVICE, COORDINATOR.public_key(), limits.max_bytes(),
                         retry_seconds=1.0, give_up_seconds=60).start()  # fmt: skip
    try:
        report = train_split(device, RemoteExchange(client), task, sentiment_examples(32), TRAINING, SplitSetup(),
                             on_step=on_step)  # fmt: skip
    finally:
        client.close()
        service.close()
    return report, device, client, serving, model, task


def in_process_prompt() -> torch.Tensor:
    task = sentiment_task()
    device, server = split_model(make_model("llama", num_layers=4), 2, PROMPT)
    train_split(device, server, task, sentiment_examples(32), TRAINING, SplitSetup())
    return device.soft_prompt.detach()


def test_a_broker_restart_mid_epoch_costs_a_question_asked_again_not_a_step(mosquitto):
    def restart_after_step_3(step: int) -> None:
        if step == 3:  # mid-epoch; down for longer than the device waits before asking again
            mosquitto.kill()
            threading.Timer(2.0, mosquitto.start).start()

    report, device, client, serving, model, task = train_over(mosquitto, mosquitto.address("a"), restart_after_step_3)
    assert (report.exchanges, report.samples) == (8, 64)
    assert client.asked_again >= 1 and client.refused == 0 and serving.refused == 0
    torch.testing.assert_close(device.soft_prompt.detach(), in_process_prompt())

    PROMPT.merge(model, prompt_weights(model, device), 1, 1)  # the result plugs into the full model
    batch = next(task.batches(sentiment_examples(16, seed=3), 16, seed=None))
    _, server = split_model(make_model("llama", num_layers=4), 2, PROMPT)
    with torch.no_grad():
        expected = server.last_token_logits(device(batch.input_ids, batch.attention_mask))[:, task.label_token_ids]
    torch.testing.assert_close(task.label_logits(model, batch), expected, rtol=1e-5, atol=1e-5)


def test_the_embedded_broker_lets_an_enrolled_device_exchange_on_its_split_topics(tmp_path):
    broker = Amqtt(tmp_path / "broker").start()
    try:
        broker.enroll("a", public_pem(DEVICE))
        address = BrokerAddress("127.0.0.1", broker.broker.port, "a", login_password(DEVICE, "a"))
        report, device, client, serving, _, _ = train_over(broker, address)
    finally:
        broker.kill()
    assert report.exchanges == 8 and serving.refused == 0 and client.refused == 0
    torch.testing.assert_close(device.soft_prompt.detach(), in_process_prompt())


def test_the_onnx_runtime_device_side_survives_a_broker_restart_and_its_prompt_plugs_in(mosquitto, tmp_path):
    task = sentiment_task()
    model = make_model("llama", num_layers=4)
    graphs, encoder = export_device_side(tmp_path, task, model, TRAINING)
    device, server = split_model(model, 2, PROMPT)
    limits = CutLimits(TRAINING.batch_size, PROMPT.tokens + TRAINING.max_length, model.config.hidden_size, 2)
    serving = SplitServer(server, task.label_token_ids, "job-1", COORDINATOR, {"a": DEVICE.public_key()}, limits)
    service = SplitService(serving, mosquitto.address("coordinator")).start()
    client = SplitClient(mosquitto.address("a"), "a", "job-1", DEVICE, COORDINATOR.public_key(), limits.max_bytes(),
                         retry_seconds=1.0, give_up_seconds=60).start()  # fmt: skip

    def restart_after_step_3(step: int, loss: float) -> None:
        if step == 3:
            mosquitto.kill()
            threading.Timer(2.0, mosquitto.start).start()

    side, record = OrtCutSide(graphs), training_record(TRAINING)
    try:
        report = train_cut_side(side, CutExchange(client), encoder, encoder.rows(sentiment_examples(32)), record,
                                SplitSetup(), restart_after_step_3)  # fmt: skip
    finally:
        client.close()
        service.close()
    assert report.exchanges == 8 and client.asked_again >= 1 and client.refused == 0 and serving.refused == 0
    alone = OrtCutSide(graphs)
    train_cut_side(alone, InProcess(ServerExchange(server, task.label_token_ids)), encoder,
                   encoder.rows(sentiment_examples(32)), record, SplitSetup())  # fmt: skip
    torch.testing.assert_close(torch.from_numpy(side.prompt()), torch.from_numpy(alone.prompt()))

    with torch.no_grad():
        device.soft_prompt.copy_(torch.from_numpy(side.prompt()))
    PROMPT.merge(model, prompt_weights(model, device), 1, 1)  # the result plugs into the full model
    batch = next(task.batches(sentiment_examples(16, seed=3), 16, seed=None))
    with torch.no_grad():
        expected = server.last_token_logits(device(batch.input_ids, batch.attention_mask))[:, task.label_token_ids]
    torch.testing.assert_close(task.label_logits(model, batch), expected, rtol=1e-5, atol=1e-5)


def test_a_device_starting_while_the_broker_is_away_waits_for_it(mosquitto):
    mosquitto.kill()
    threading.Timer(2.0, mosquitto.start).start()
    client = SplitClient(mosquitto.address("a"), "a", "job-1", DEVICE, COORDINATOR.public_key(), 1024,
                         give_up_seconds=30).start()  # fmt: skip
    try:
        assert client.connection.connected.is_set()
    finally:
        client.close()
    mosquitto.kill()
    with pytest.raises(NoAnswer, match="gave up after 2 s"):
        SplitClient(mosquitto.address("a"), "a", "job-1", DEVICE, COORDINATOR.public_key(), 1024,
                    give_up_seconds=2).start()  # fmt: skip
