"""Split training: an exchange is exactly the full model's step, local steps spare the server, pruning records,
the server sees only the noised release."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from coordinator.adapters.prompt import PromptAdapter
from coordinator.errors import ConfigError
from coordinator.split.local import LocalHead
from coordinator.split.sides import Cut, prompt_weights, split_model
from coordinator.split.train import ServerExchange, SplitSetup, train_split
from coordinator.tasks import ClassificationTask
from coordinator.train import TrainConfig
from edge_runtime.manifest import DPTarget
from tests.conftest import make_model, make_tokenizer, sentiment_examples

PROMPT = PromptAdapter(tokens=3)
TRAINING = TrainConfig(steps=1, lr=1e-2, batch_size=8, warmup_ratio=0.0)


@pytest.fixture
def task() -> ClassificationTask:
    return ClassificationTask(make_tokenizer(), {"negative": " negative", "positive": " positive"})


def test_one_exchange_makes_the_step_the_full_model_would_make(task):
    examples = sentiment_examples(8)
    device, server = split_model(make_model("llama", num_layers=4), 2, PROMPT)
    report = train_split(device, server, task, examples, TRAINING, SplitSetup())
    assert (report.exchanges, report.local_steps, report.samples) == (1, 0, 8)

    full = make_model("llama", num_layers=4)
    (prompt,) = PROMPT.attach(full, 1, 1).values()
    optimizer = torch.optim.AdamW([prompt], lr=TRAINING.lr, weight_decay=TRAINING.weight_decay)
    batch = next(task.batches(examples, 8, seed=TRAINING.seed))
    F.cross_entropy(task.label_logits(full, batch), batch.targets).backward()  # over the label words
    torch.nn.utils.clip_grad_norm_([prompt], TRAINING.max_grad_norm)
    optimizer.step()
    torch.testing.assert_close(device.soft_prompt, prompt, rtol=1e-5, atol=1e-6)


def test_training_through_the_split_plugs_into_the_full_model(task):
    examples = sentiment_examples(64)
    model = make_model("llama", num_layers=4)
    device, server = split_model(model, 2, PROMPT)
    report = train_split(device, server, task, examples, TrainConfig(steps=40, lr=3e-2, batch_size=8), SplitSetup())
    assert sum(report.losses[-5:]) / 5 < sum(report.losses[:5]) / 5
    PROMPT.merge(model, prompt_weights(model, device), 1, 1)
    batch = next(task.batches(examples, 16, seed=None))
    with torch.no_grad():
        cut = device(batch.input_ids, batch.attention_mask)
        expected = server.last_token_logits(cut)[:, task.label_token_ids]
    torch.testing.assert_close(task.label_logits(model, batch), expected, rtol=1e-5, atol=1e-5)
    untrained = make_model("llama", num_layers=4)
    PROMPT.attach(untrained, 1, 1)
    assert task.score(model, examples, 16) > task.score(untrained, examples, 16)


def test_local_steps_spare_the_server_exchanges_and_their_bytes(task):
    examples = sentiment_examples(32)
    training = TrainConfig(steps=12, lr=1e-2, batch_size=8)
    runs, after = {}, []
    for local_steps in (0, 3):
        model = make_model("llama", num_layers=4)
        device, server = split_model(model, 2, PROMPT)
        head = LocalHead(model, task.label_token_ids)
        setup = SplitSetup(local_steps)
        runs[local_steps] = train_split(device, server, task, examples, training, setup, head, on_step=after.append)
    assert after == [*range(1, 13), *range(1, 13)]
    assert (runs[0].exchanges, runs[0].local_steps) == (12, 0)
    assert runs[0].bytes_scoring == 0
    assert (runs[3].exchanges, runs[3].local_steps) == (3, 9)  # steps 0, 4, 8 go to the server
    assert runs[3].bytes_up * 4 == runs[0].bytes_up and runs[3].bytes_down * 4 == runs[0].bytes_down
    hidden = 32 * 4  # the tiny model's width, float32
    assert runs[0].bytes_down > 12 * 8 * (PROMPT.tokens + 1) * hidden  # a cut's gradient per row and position
    with pytest.raises(ConfigError, match="needs a local head"):
        train_split(device, server, task, examples, training, SplitSetup(local_steps=1))


def test_pruning_drops_the_requested_share_before_training_and_records_it(task):
    examples = sentiment_examples(40)
    device, server = split_model(make_model("llama", num_layers=4), 2, PROMPT)
    setup = SplitSetup(prune_fraction=0.25, prune_score="loss")
    report = train_split(device, server, task, examples, TrainConfig(steps=4, batch_size=8), setup)
    assert report.pruned == {"score": "loss", "fraction": 0.25, "dropped": 10, "kept": 30}
    assert report.samples == 30  # one epoch of the 30 kept: 8 + 8 + 8 + 6
    hidden = 32 * 4  # the tiny model's width, float32
    assert 40 * (PROMPT.tokens + 1) * hidden < report.bytes_scoring < report.bytes_up + report.bytes_down
    with pytest.raises(ConfigError, match=r"prune_fraction=1\.0 must be in"):
        SplitSetup(prune_fraction=1.0)


class _Recording(ServerExchange):
    """The in-process server, keeping every cut it is sent."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.received: list[Cut] = []

    def logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.received.append(Cut(hidden.detach().clone(), attention_mask))
        return super().logits(hidden, attention_mask)


def test_with_noise_on_the_cut_the_server_sees_only_releases_and_the_noise_is_not_the_jobs_seed(task):
    examples, model = sentiment_examples(16), make_model("llama", num_layers=4)
    training = TrainConfig(steps=4, lr=1e-2, batch_size=8, warmup_ratio=0.0)
    setup = SplitSetup(prune_fraction=0.25, cut_dp=DPTarget(epsilon=8.0, clip=2.0))
    prompts = []
    for _ in range(2):
        device, server = split_model(model, 2, PROMPT)
        exchange = _Recording(server, task.label_token_ids)
        report = train_split(device, exchange, task, examples, training, setup)
        prompts.append(device.soft_prompt.detach().clone())
    assert report.cut_privacy["crossings"] == 1 + 2  # the scoring pass, then 4 steps over 12 kept: 2 epochs
    assert report.cut_privacy["epsilon"] <= 8.0 and report.cut_privacy["clip"] == 2.0
    sigma = report.cut_privacy["noise_multiplier"]
    assert len(exchange.received) == 2 + 4  # two scoring batches, four exchanges
    for cut in exchange.received:
        real = cut.attention_mask[:, PROMPT.tokens :].bool()
        assert float(cut.hidden[:, PROMPT.tokens :][real].std()) == pytest.approx(sigma * 2.0, rel=0.15)
        assert torch.all(cut.hidden[:, PROMPT.tokens :][~real] == 0)
    assert not torch.equal(prompts[0], prompts[1])  # the same job seed, other noise
