"""PyTorch reference training: only the chosen parameters move, runs are seeded, the loss falls."""

import time

import pytest
import torch

from coordinator.adapters.layers import adapter_parameters
from coordinator.emulator import Split, build_emulator
from coordinator.errors import ConfigError
from coordinator.tasks import ClassificationTask
from coordinator.train import TrainConfig, train
from tests.conftest import make_model, sentiment_examples

WORDS = {"negative": " negative", "positive": " positive"}


def test_adapter_training_changes_only_adapter_parameters(tokenizer, family):
    emulator = build_emulator(make_model(family, vocab_size=len(tokenizer)), Split(1, 1, keep=2))
    before = {name: p.detach().clone() for name, p in emulator.named_parameters()}
    adapter = adapter_parameters(emulator, 1, 1)
    adapter_ids = {id(p) for p in adapter.values()}
    task = ClassificationTask(tokenizer, WORDS)
    train(emulator, adapter.values(), task, sentiment_examples(16), TrainConfig(steps=3, batch_size=4, lr=1e-2))
    for name, parameter in emulator.named_parameters():
        changed = not torch.equal(parameter, before[name])
        assert changed == (id(parameter) in adapter_ids), name
    assert not any(p.requires_grad for p in emulator.parameters())


def test_training_is_seeded(tokenizer):
    task = ClassificationTask(tokenizer, WORDS)
    curves = []
    for _ in range(2):
        model = make_model("llama", vocab_size=len(tokenizer))
        report = train(model, model.parameters(), task, sentiment_examples(24), TrainConfig(steps=5, batch_size=4))
        curves.append(report.losses)
    assert curves[0] == curves[1]
    assert report.steps == 5 and report.samples == 20


def test_adapter_learns_a_learnable_task(tokenizer):
    task = ClassificationTask(tokenizer, WORDS)
    emulator = build_emulator(make_model("llama", vocab_size=len(tokenizer)), Split(2, 2, keep=2))
    test = sentiment_examples(40, seed=1)
    before = task.score(emulator, test, batch_size=8)
    adapter = adapter_parameters(emulator, 2, 2).values()
    report = train(emulator, adapter, task, sentiment_examples(64), TrainConfig(steps=60, batch_size=8, lr=1e-2))
    assert sum(report.losses[-10:]) < sum(report.losses[:10]) / 3
    assert task.score(emulator, test, batch_size=8) >= max(0.9, before)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("steps", 0, "steps=0"),
        ("lr", 0.0, "lr=0.0"),
        ("batch_size", -1, "batch_size=-1"),
        ("warmup_ratio", 1.0, "warmup"),
    ],
)
def test_bad_training_config_is_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value})


def test_empty_parameter_list_is_refused(tokenizer):
    model = make_model("llama", vocab_size=len(tokenizer))
    with pytest.raises(ConfigError, match="nothing to train"):
        train(model, [], ClassificationTask(tokenizer, WORDS), sentiment_examples(4), TrainConfig(steps=1))


def test_on_step_runs_after_every_step_and_its_time_is_not_counted(tokenizer):
    task = ClassificationTask(tokenizer, WORDS)
    model = make_model("llama", vocab_size=len(tokenizer))
    seen = []

    def slow_scoring(step: int) -> None:
        seen.append(step)
        time.sleep(0.5)

    config = TrainConfig(steps=3, batch_size=4)
    report = train(model, model.parameters(), task, sentiment_examples(16), config, on_step=slow_scoring)
    assert seen == [1, 2, 3]
    assert report.seconds < 1.5  # the three pauses alone would be 1.5 s
