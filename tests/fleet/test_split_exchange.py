"""Split learning over a real broker: a run whose broker dies mid-epoch ends exactly as in process, and plugs in."""

from __future__ import annotations

import threading

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.adapters.prompt import PromptAdapter
from coordinator.split.remote import RemoteExchange
from coordinator.split.serve import CutLimits, SplitServer, SplitService
from coordinator.split.sides import prompt_weights, split_model
from coordinator.split.train import SplitSetup, train_split
from coordinator.tasks import ClassificationTask
from coordinator.train import TrainConfig
from edge_runtime.identity import login_password, public_pem
from edge_runtime.mqtt import BrokerAddress
from edge_runtime.split_client import SplitClient
from tests.conftest import make_model, make_tokenizer, sentiment_examples
from tests.fleet.conftest import Amqtt, Mosquitto

PROMPT = PromptAdapter(tokens=3)
TRAINING = TrainConfig(steps=8, lr=3e-2, batch_size=8, warmup_ratio=0.0)  # 32 reviews: an epoch is 4 steps
COORDINATOR, DEVICE = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()


def train_over(broker: Mosquitto | Amqtt, device_address: BrokerAddress, on_step=None):
    """The prompt trained through a split server on `broker`; the split device side, the client, the model."""
    task = ClassificationTask(make_tokenizer(), {"negative": " negative", "positive": " positive"})
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
    task = ClassificationTask(make_tokenizer(), {"negative": " negative", "positive": " positive"})
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
