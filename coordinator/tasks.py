"""Tasks: label-word classification and language modelling; each encodes examples, gives a loss and a metric."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from coordinator.architectures import spec_for
from coordinator.errors import ConfigError, DataError
from coordinator.evaluation.exits import voted
from edge_runtime.data import Example

DEFAULT_TEMPLATE = "Review: {text}\nSentiment:"
DEFAULT_LABEL_WORDS = {"negative": " negative", "positive": " positive"}


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids [B, T], attention mask [B, T], and per-row targets [B] (or labels [B, T])."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class Task(Protocol):
    """What training and evaluation need from a task."""

    metric: str

    def batches(self, examples: Sequence[Example], batch_size: int, seed: int | None) -> Iterator[Batch]:
        """Encoded batches; shuffled by `seed`, or in a fixed length-sorted order when `seed` is None."""
        ...

    def loss(self, model: PreTrainedModel, batch: Batch) -> torch.Tensor:
        """Mean loss of `model` on `batch` (a scalar with gradient)."""
        ...

    def score(
        self, model: PreTrainedModel, examples: Sequence[Example], batch_size: int, exits: Sequence[int] = ()
    ) -> float:
        """The task's metric of `model` on `examples`, voting across early `exits` (layer indices) when given."""
        ...


def pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to ids [B, T] and attention mask [B, T]."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def _chunks(order: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield order[start : start + size]


class ClassificationTask:
    """Classify by the next-token logits of one label word per class after a prompt.

    Example::

        task = ClassificationTask(tokenizer, {"negative": " negative", "positive": " positive"})
        task.score(model, test_examples, batch_size=16)  # accuracy in [0, 1]
    """

    metric = "accuracy"

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        label_words: dict[str, str],
        template: str = DEFAULT_TEMPLATE,
        max_length: int = 128,
    ) -> None:
        if "{text}" not in template:
            raise ConfigError(f"prompt template {template!r} has no {{text}} placeholder; e.g. {DEFAULT_TEMPLATE!r}")
        if len(label_words) < 2:
            raise ConfigError(f"classification needs at least two labels, got {sorted(label_words)}")
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.labels = sorted(label_words)
        self.label_words = dict(label_words)
        first_tokens = {}
        for label in self.labels:
            ids = tokenizer(label_words[label], add_special_tokens=False).input_ids
            if not ids:
                raise ConfigError(f"label word {label_words[label]!r} for {label!r} encodes to no token")
            first_tokens[label] = ids[0]
        if len(set(first_tokens.values())) < len(first_tokens):
            raise ConfigError(
                f"label words {label_words} share a first token; choose words that start differently, "
                "e.g. ' positive' and ' negative'"
            )
        self.label_token_ids = torch.tensor([first_tokens[label] for label in self.labels])

    def encode(self, example: Example) -> tuple[list[int], int]:
        """Prompt token ids (cut from the left to `max_length`) and the index of the example's label."""
        if example.label not in self.label_words:
            raise DataError(f"label {example.label!r} has no label word; known labels: {self.labels}")
        ids = self.tokenizer(self.template.format(text=example.text)).input_ids[-self.max_length :]
        return ids, self.labels.index(example.label)

    def batches(self, examples: Sequence[Example], batch_size: int, seed: int | None) -> Iterator[Batch]:
        encoded = [self.encode(example) for example in examples]
        order = list(range(len(encoded)))
        if seed is None:
            order.sort(key=lambda i: len(encoded[i][0]))
        else:
            random.Random(seed).shuffle(order)
        for chunk in _chunks(order, batch_size):
            ids, mask = pad([encoded[i][0] for i in chunk], self.tokenizer.pad_token_id)
            yield Batch(ids, mask, torch.tensor([encoded[i][1] for i in chunk]))

    def last_token_logits(self, model: PreTrainedModel, batch: Batch) -> torch.Tensor:
        """Vocabulary logits [B, V] at each row's last real token (the head runs on B positions, not B*T)."""
        spec = spec_for(model.config.model_type)
        hidden = model.get_submodule(spec.backbone)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state
        last = batch.attention_mask.sum(dim=1) - 1
        return model.get_submodule(spec.head)(hidden[torch.arange(len(batch)), last])

    def label_logits(self, model: PreTrainedModel, batch: Batch) -> torch.Tensor:
        """Logits [B, C] of each label word's first token at each row's last real token."""
        return self.last_token_logits(model, batch)[:, self.label_token_ids]

    def loss(self, model: PreTrainedModel, batch: Batch) -> torch.Tensor:
        """Cross-entropy of the label word's first token over the whole vocabulary."""
        return F.cross_entropy(self.last_token_logits(model, batch), self.label_token_ids[batch.targets])

    def row_losses(self, model: PreTrainedModel, batch: Batch) -> torch.Tensor:
        """Each row's own cross-entropy [B] (DP-SGD clips each example's gradient)."""
        logits = self.last_token_logits(model, batch)
        return F.cross_entropy(logits, self.label_token_ids[batch.targets], reduction="none")

    @torch.inference_mode()
    def score(
        self, model: PreTrainedModel, examples: Sequence[Example], batch_size: int, exits: Sequence[int] = ()
    ) -> float:
        """Accuracy: the label whose word's first token has the highest logit (at the surest of `exits`, if given)."""
        correct = 0
        for batch in self.batches(examples, batch_size, seed=None):
            scores = voted(model, exits, partial(self.label_logits, batch=batch))
            correct += int((scores.argmax(dim=1) == batch.targets).sum())
        return correct / len(examples)


class LanguageModelTask:
    """Next-token prediction on plain text, packed into blocks of `max_length` tokens; metric perplexity."""

    metric = "perplexity"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int = 128) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def blocks(self, examples: Sequence[Example]) -> list[list[int]]:
        """Documents joined with EOS and cut into blocks of `max_length` (the last may be shorter)."""
        stream: list[int] = []
        for example in examples:
            stream += [*self.tokenizer(example.text).input_ids, self.tokenizer.eos_token_id]
        blocks = [stream[i : i + self.max_length] for i in range(0, len(stream), self.max_length)]
        return [block for block in blocks if len(block) > 1]

    def batches(self, examples: Sequence[Example], batch_size: int, seed: int | None) -> Iterator[Batch]:
        blocks = self.blocks(examples)
        order = list(range(len(blocks)))
        if seed is not None:
            random.Random(seed).shuffle(order)
        for chunk in _chunks(order, batch_size):
            ids, mask = pad([blocks[i] for i in chunk], self.tokenizer.pad_token_id)
            yield Batch(ids, mask, ids.masked_fill(mask == 0, -100))

    def token_losses(self, model: PreTrainedModel, batch: Batch) -> tuple[torch.Tensor, int]:
        """Summed next-token cross-entropy over the batch and the number of predicted tokens."""
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        targets = batch.targets[:, 1:]
        total = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        return total, int((targets != -100).sum())

    def loss(self, model: PreTrainedModel, batch: Batch) -> torch.Tensor:
        total, count = self.token_losses(model, batch)
        return total / count

    def voted_token_losses(
        self, model: PreTrainedModel, batch: Batch, exits: Sequence[int]
    ) -> tuple[torch.Tensor, int]:
        """`token_losses` with each token predicted by the surest of the early `exits`."""

        def logits_of(view: PreTrainedModel) -> torch.Tensor:
            return view(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits[:, :-1]

        targets = batch.targets[:, 1:]
        log_probs = voted(model, exits, logits_of)
        total = F.nll_loss(log_probs.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        return total, int((targets != -100).sum())

    @torch.inference_mode()
    def score(
        self, model: PreTrainedModel, examples: Sequence[Example], batch_size: int, exits: Sequence[int] = ()
    ) -> float:
        """Perplexity: exp of the mean next-token negative log-likelihood over all test tokens (voted over `exits`)."""
        total, count = 0.0, 0
        for batch in self.batches(examples, batch_size, seed=None):
            if exits:
                batch_total, batch_count = self.voted_token_losses(model, batch, exits)
            else:
                batch_total, batch_count = self.token_losses(model, batch)
            total += float(batch_total)
            count += batch_count
        if count == 0:
            raise DataError("the test text holds no token to predict; give it at least two tokens")
        return math.exp(total / count)


def make_task(
    tokenizer: PreTrainedTokenizerBase,
    train: Sequence[Example],
    test: Sequence[Example],
    label_words: dict[str, str] | None = None,
    template: str = DEFAULT_TEMPLATE,
    max_length: int = 128,
) -> ClassificationTask | LanguageModelTask:
    """Classification when the examples carry labels (label word defaults to ' ' + label), else language modelling.

    Checks before any training that `test` is the same kind as `train` and uses only known labels.
    """
    labelled = train[0].label is not None
    if (test[0].label is not None) != labelled:
        kinds = ("labelled", "unlabelled") if labelled else ("unlabelled", "labelled")
        raise DataError(f"the training data is {kinds[0]} but the test data is {kinds[1]}; give both the same kind")
    if not labelled:
        return LanguageModelTask(tokenizer, max_length)
    if label_words is None:
        label_words = {example.label: f" {example.label}" for example in train if example.label is not None}
    unknown = sorted({example.label for example in [*train, *test]} - set(label_words))
    if unknown:
        raise DataError(
            f"labels {unknown} have no label word (known: {sorted(label_words)}); add --label-word LABEL=WORD"
        )
    return ClassificationTask(tokenizer, label_words, template, max_length)
