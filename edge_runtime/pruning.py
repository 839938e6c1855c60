"""Dataset pruning (SFPrompt): before training, drop the fraction of examples the model already handles best.

A device scores each example with the model it is about to train, then keeps the hardest. Two scores: the loss
(cross-entropy of the right label) and EL2N (Paul et al., 2021: the L2 distance between the predicted label
distribution and the one-hot label; 0 for a confident right answer, up to sqrt(2) for a confident wrong one).
Pure Python: the device's backend computes the probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

SCORES = ("el2n", "loss")


def el2n(probabilities: Sequence[float], label: int) -> float:
    """EL2N of one example: ||p - onehot(label)||_2 over the labels' probabilities."""
    return math.sqrt(sum((p - (i == label)) ** 2 for i, p in enumerate(probabilities)))


def label_loss(probabilities: Sequence[float], label: int) -> float:
    """Cross-entropy of the right label (probabilities floored at 1e-12 so a sure mistake stays finite)."""
    return -math.log(max(probabilities[label], 1e-12))


@dataclass(frozen=True)
class Pruned:
    """Which examples train (indices into the device's data, in their order) and what was dropped."""

    kept: list[int]
    dropped: int
    fraction: float
    score: str

    def record(self) -> dict[str, object]:
        kept = len(self.kept)
        return {"score": self.score, "fraction": self.fraction, "dropped": self.dropped, "kept": kept}


def prune(scores: Sequence[float], fraction: float, score: str = "el2n") -> Pruned:
    """Drop the `floor(fraction * n)` examples with the lowest scores (the easiest; ties: the earlier first)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"pruning fraction {fraction} must be in [0, 1), e.g. 0.3 to drop the easiest 30 %")
    if score not in SCORES:
        raise ValueError(f"pruning score {score!r} is not one of {', '.join(SCORES)}")
    if any(not math.isfinite(value) for value in scores):
        raise ValueError("pruning scores must be finite numbers")
    dropped = math.floor(fraction * len(scores))
    gone = set(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:dropped])
    return Pruned([i for i in range(len(scores)) if i not in gone], dropped, fraction, score)
