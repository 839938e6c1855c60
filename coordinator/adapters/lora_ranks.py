"""LoRA results of different ranks (heterogeneous fleets): averaged as dense updates, factored again by SVD.

Device k trained a rank-r_k branch whose update to a target's weight is ΔW_k = (α_k/r_k)·B_k·A_k. A and B of
different ranks cannot be averaged entry by entry (HetLoRA pads them with zeros, which mixes unrelated rows), so
here each device's update from the start it was sent is made dense, the dense updates are combined (by the
fleet's rule: FedAvg, a robust rule, clipped first), added to the previous aggregate, and the sum is factored
again by SVD at a rank that holds it exactly (FlexLoRA, Bai et al., 2024, truncates it). A device of rank r
starts the next round from the aggregate's best rank-r approximation: its first r singular directions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from coordinator.errors import DataError
from edge_runtime.adapter_modules import LORA_A, LORA_B

Dense = dict[str, torch.Tensor]  # target path -> its weight update [out, in], float64
Combine = Callable[[list[Dense], list[float]], Dense]


@dataclass(frozen=True)
class RankedLoRA:
    """One LoRA adapter's tensors (full-model names) with the rank and alpha they were trained at."""

    weights: dict[str, torch.Tensor]
    r: int
    alpha: float

    def dense(self) -> Dense:
        """Each target's update (α/r)·B·A, as the plugged-in model adds it to the target's weight."""
        targets = sorted(name.removesuffix(f".{LORA_A}") for name in self.weights if name.endswith(f".{LORA_A}"))
        if len(targets) * 2 != len(self.weights):
            raise DataError(f"a LoRA adapter holds tensors that are not lora_A/lora_B pairs: {sorted(self.weights)}")
        scale = self.alpha / self.r
        return {
            t: scale * self.weights[f"{t}.{LORA_B}"].double() @ self.weights[f"{t}.{LORA_A}"].double() for t in targets
        }


def factored(updates: Dense, r: int, alpha: float) -> RankedLoRA:
    """The rank-`r` LoRA closest to `updates` (each target's r largest singular directions, split evenly between
    B and A); exact where a target's update has rank ≤ r. Ranks beyond a target's width are zeros."""
    scale = alpha / r
    weights: dict[str, torch.Tensor] = {}
    for target, update in sorted(updates.items()):
        u, s, vh = torch.linalg.svd(update, full_matrices=False)
        kept = min(r, s.numel())
        root = s[:kept].sqrt() / scale**0.5
        b = torch.zeros(update.shape[0], r, dtype=torch.float64)
        a = torch.zeros(r, update.shape[1], dtype=torch.float64)
        b[:, :kept] = u[:, :kept] * root
        a[:kept] = root[:, None] * vh[:kept]
        weights[f"{target}.{LORA_B}"], weights[f"{target}.{LORA_A}"] = b.float(), a.float()
    return RankedLoRA(weights, r, alpha)


def _check_targets(adapters: list[RankedLoRA]) -> None:
    names = [sorted(adapter.weights) for adapter in adapters]
    if any(name != names[0] for name in names[1:]):
        raise DataError("device LoRA adapters target different projections: they were trained from different bundles")


def combine_ranks(
    results: list[RankedLoRA],
    starts: list[RankedLoRA | None],
    shares: list[float],
    combine: Combine,
    previous: RankedLoRA | None = None,
) -> RankedLoRA:
    """The aggregate of device results of any ranks: `previous` (none: zero, the first round) plus `combine` of each
    device's dense update from its own start (`starts[k]`; None: a zero start). Factored with α = its rank (scale 1)
    at a rank that holds the sum exactly: the previous aggregate's plus each update's (r_k from a zero start, up to
    2·r_k from another), at most the narrowest target's width."""
    _check_targets(results)
    updates = []
    for result, start in zip(results, starts, strict=True):
        update, origin = result.dense(), start.dense() if start is not None else {}
        updates.append({target: value - origin[target] if origin else value for target, value in update.items()})
    combined = combine(updates, shares)
    if previous is not None:
        base = previous.dense()
        combined = {target: value.double() + base[target] for target, value in combined.items()}
    rank = (previous.r if previous is not None else 0) + sum(
        result.r * (1 if start is None else 2) for result, start in zip(results, starts, strict=True)
    )
    rank = min(rank, *(min(value.shape) for value in combined.values()))
    return factored({target: value.double() for target, value in combined.items()}, rank, float(rank))
