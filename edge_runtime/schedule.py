"""The learning-rate schedule every trainer shares: linear warm-up, then linear decay to zero."""

from __future__ import annotations


def learning_rate_factor(step: int, steps: int, warmup_ratio: float) -> float:
    """Multiplier of the base learning rate at 0-based `step` of `steps`.

    >>> [round(learning_rate_factor(s, 10, 0.2), 3) for s in range(10)]
    [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    """
    warmup = int(steps * warmup_ratio)
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))
