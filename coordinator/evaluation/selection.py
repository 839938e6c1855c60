"""Choosing on held-out data: a validation split carved from the training file, and the best checkpoint by it."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from coordinator.errors import ConfigError
from edge_runtime.data import Example


def carve_validation(
    train: Sequence[Example], test: Sequence[Example], size: int, seed: int = 7
) -> tuple[list[Example], list[Example]]:
    """(training rest, validation): `size` examples drawn (seeded) from `train`, none whose text is in `test`.

    Whatever is chosen on the validation split (learning rate, checkpoint) never sees the test file, even where
    the training and test files share a sentence.
    """
    if size < 1:
        raise ConfigError(f"validation size {size} must be at least 1 example, e.g. --validation 600")
    test_texts = {example.text for example in test}
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    eligible = [index for index in order if train[index].text not in test_texts]
    if size >= len(eligible):
        raise ConfigError(
            f"--validation {size} leaves nothing to train on: the training file has {len(eligible)} examples "
            "not in the test file; choose a smaller validation split"
        )
    chosen = set(eligible[:size])
    return [e for i, e in enumerate(train) if i not in chosen], [train[i] for i in sorted(chosen)]


@dataclass
class BestCheckpoint:
    """Scores `parameters` every `every` steps (and before the first) and keeps a copy of the best-scoring state.

    `score` returns a value where higher is better (accuracy, or minus perplexity). Ties keep the earlier state,
    so an adapter that never beats its untrained start leaves the start in place.
    """

    parameters: list[nn.Parameter]
    score: Callable[[], float]
    every: int
    higher_is_better: bool = True
    curve: list[tuple[int, float]] = field(default_factory=list)
    best_step: int = 0
    best_value: float | None = None
    _best: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"checkpoint interval {self.every} must be at least 1 step")
        self.check(0)

    def on_step(self, step: int) -> None:
        if step % self.every == 0:
            self.check(step)

    def finish(self, steps: int) -> None:
        """Score the final state too, if the last step was not a multiple of `every`."""
        if self.curve[-1][0] != steps:
            self.check(steps)

    def check(self, step: int) -> None:
        value = self.score()
        self.curve.append((step, value))
        better = self.best_value is None or (
            value > self.best_value if self.higher_is_better else value < self.best_value
        )
        if better:
            self.best_step, self.best_value = step, value
            self._best = [parameter.detach().clone() for parameter in self.parameters]

    @torch.no_grad()
    def restore(self) -> None:
        """Put the best state back into the parameters."""
        for parameter, best in zip(self.parameters, self._best, strict=True):
            parameter.copy_(best)

    def summary(self) -> dict[str, object]:
        return {"best_step": self.best_step, "best_value": self.best_value, "validation_curve": self.curve}
