"""The split server over frames: the same answers as in process, a question asked again answered again, and
every bad frame refused and counted while the server goes on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.adapters.prompt import PromptAdapter
from coordinator.split.serve import CutLimits, SplitServer
from coordinator.split.sides import split_model
from coordinator.split.train import ServerExchange
from coordinator.tasks import ClassificationTask
from edge_runtime.split_wire import SERVER_KINDS, Assembler, SplitFrame, SplitMessage
from edge_runtime.wire import Topics
from tests.conftest import make_model, make_tokenizer, sentiment_examples

COORDINATOR, DEVICE = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
TOPIC = Topics().device("a", "split")


@pytest.fixture
def setup():
    task = ClassificationTask(make_tokenizer(), {"negative": " negative", "positive": " positive"})
    model = make_model("llama", num_layers=4)
    device, server = split_model(model, 2, PromptAdapter(tokens=3))
    limits = CutLimits(batch_size=8, positions=3 + 64, hidden=model.config.hidden_size, labels=2)
    serving = SplitServer(server, task.label_token_ids, "job-1", COORDINATOR, {"a": DEVICE.public_key()}, limits)
    batch = next(task.batches(sentiment_examples(8), 8, seed=0))
    cut = device(batch.input_ids, batch.attention_mask)
    return serving, server, task, cut


def ask(serving: SplitServer, exchange: int, kind: str, arrays: dict, key=DEVICE, topic=TOPIC, job="job-1"
        ) -> SplitMessage | None:  # fmt: skip
    answers = []
    for frame in SplitMessage(job, "a", exchange, kind, arrays).frames(key):
        answers += serving.handle(topic, frame)
    assembler, message = Assembler(10**8), None
    for answer_topic, payload in answers:
        assert answer_topic == Topics().device("a", "answers")
        frame = SplitFrame.decode(payload, SERVER_KINDS)
        frame.verify(COORDINATOR.public_key(), "the coordinator")
        message = assembler.add(frame) or message
    return message


def cut_arrays(cut) -> dict[str, np.ndarray]:
    return {"hidden": cut.hidden.detach().numpy(), "mask": cut.attention_mask.to(torch.uint8).numpy()}


def test_an_exchange_over_frames_answers_what_the_server_answers_in_process(setup):
    serving, server, task, cut = setup
    local = ServerExchange(server, task.label_token_ids)
    logits = local.logits(cut.hidden, cut.attention_mask)
    upstream = torch.randn_like(logits)
    expected = local.gradient(upstream)

    answer = ask(serving, 1, "cut", cut_arrays(cut))
    assert answer.kind == "logits"
    torch.testing.assert_close(torch.from_numpy(answer.arrays["logits"]), logits)
    answer = ask(serving, 1, "gradient", {"logits_gradient": upstream.numpy()})
    assert answer.kind == "cut_gradient"
    torch.testing.assert_close(torch.from_numpy(answer.arrays["gradient"]), expected)
    again = ask(serving, 1, "gradient", {"logits_gradient": upstream.numpy()})
    np.testing.assert_array_equal(again.arrays["gradient"], answer.arrays["gradient"])  # asked again: same answer
    assert (serving.answered, serving.refused) == (3, 0)


def test_a_gradient_for_a_cut_the_server_does_not_hold_asks_for_the_cut(setup):
    serving, _, _, cut = setup
    gradient = {"logits_gradient": np.zeros((8, 2), np.float32)}
    assert ask(serving, 4, "gradient", gradient).kind == "unknown_cut"  # say, the server restarted
    ask(serving, 4, "cut", cut_arrays(cut))
    assert ask(serving, 5, "gradient", gradient).kind == "unknown_cut"  # not the exchange it holds
    assert ask(serving, 4, "gradient", gradient).kind == "cut_gradient"


def test_bad_frames_are_refused_and_counted_and_the_server_goes_on(setup):
    serving, _, _, cut = setup
    good = cut_arrays(cut)
    nan = dict(good, hidden=np.full_like(good["hidden"], np.nan))
    wide = dict(good, hidden=np.zeros((8, good["hidden"].shape[1], 7), np.float32))
    long = {"hidden": np.zeros((8, 80, good["hidden"].shape[2]), np.float32), "mask": np.ones((8, 80), np.uint8)}
    cases = [
        ask(serving, 1, "cut", good, key=Ed25519PrivateKey.generate()),  # not the enrolled key
        ask(serving, 1, "cut", good, topic=Topics().device("b", "split")),  # another device's topic
        ask(serving, 1, "cut", nan),
        ask(serving, 1, "cut", wide),  # not the model's width
        ask(serving, 1, "cut", long),  # more positions than the job allows
        ask(serving, 1, "cut", dict(good, mask=np.zeros_like(good["mask"]))),  # rows with no position
        ask(serving, 1, "cut", {"hidden": good["hidden"]}),  # no mask
    ]
    assert cases == [None] * len(cases) and serving.refused >= len(cases)
    assert serving.handle(TOPIC, b"not a frame") == [] and serving.handle("elsewhere", b"") == []
    refused = serving.refused
    assert ask(serving, 1, "cut", good, job="job-2") is None  # another split job's: its own server answers it
    assert ask(serving, 1, "cut", good, topic=Topics().device("a", "status")) is None  # amqtt's stray deliveries
    assert serving.refused == refused
    ask(serving, 2, "cut", good)
    assert ask(serving, 2, "gradient", {"logits_gradient": np.ones((7, 2), np.float32)}) is None  # wrong rows
    assert ask(serving, 2, "gradient", {"logits_gradient": np.ones((8, 2), np.float32)}).kind == "cut_gradient"
