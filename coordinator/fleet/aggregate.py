"""A round's aggregate of device adapters: FedAvg (weighted by examples) or a robust rule, written as a result."""

from __future__ import annotations

from pathlib import Path

import torch

from coordinator.adapters import adapter_kind
from coordinator.adapters.files import save_adapter
from coordinator.adapters.layers import weighted_mean
from coordinator.adapters.lora_ranks import RankedLoRA, combine_ranks
from coordinator.errors import DataError
from coordinator.fleet.robust import AggregationRule, clip_updates, finite
from coordinator.results import DeviceResult
from edge_runtime import __version__
from edge_runtime.files import atomic_directory, write_json_atomic
from edge_runtime.manifest import RESULT_FORMAT, RESULT_SCHEMA, AggregateRecord, PrivacyRecord, ResultMetrics
from edge_runtime.trainer import ADAPTER, METRICS

FEDAVG = AggregationRule()


def federated_average(
    results: list[DeviceResult],
    rule: AggregationRule = FEDAVG,
    start: dict[str, torch.Tensor] | None = None,
    clip_norm: float | None = None,
) -> dict[str, torch.Tensor]:
    """The results combined by `rule`; FedAvg is Σ_k n_k·w_k / Σ_k n_k, n_k = the examples device k trained on
    (McMahan et al., 2017), averaged as the adapter kind says (coordinator/adapters/). With `clip_norm`, each
    device's update from `start` (the round's starting adapter) is first clipped to that L2 norm.

    Every result must be of one kind and hold finite values.
    """
    if not results:
        raise DataError("no device returned a result this round: nothing to aggregate")
    kinds = sorted({result.metrics.adapter_kind for result in results})
    if len(kinds) > 1:
        raise DataError(f"device adapters are of different kinds {kinds}: they were trained from different bundles")
    weights = [result.weights for result in results]
    if not all(finite(result) for result in weights):
        raise DataError("a device adapter holds NaN or infinite values; refuse it before aggregating")
    if clip_norm is not None:
        if start is None:
            raise DataError("clipping updates needs the round's starting adapter")
        weights = clip_updates(weights, start, clip_norm)
    total = sum(result.metrics.examples for result in results)
    if total < 1:
        raise DataError("the device results count no training examples between them: nothing to weigh them by")
    shares = [result.metrics.examples / total for result in results]
    return rule.combine(weights, shares, adapter_kind(kinds[0]).average)


def aggregate_privacy(runs: list[ResultMetrics]) -> PrivacyRecord:
    """The privacy of an aggregate of device runs on disjoint data: that of its least private run (the largest ε),
    if every run was differentially private; else none. (Across rounds, a device's ε adds up: its ledger keeps it.)"""
    records = [run.privacy for run in runs]
    if not records or any(record.epsilon is None for record in records):
        return PrivacyRecord()
    return max(records, key=lambda record: record.epsilon or 0.0)


def mixed_lora_ranks(results: list[DeviceResult]) -> bool:
    """Whether `results` are LoRA adapters of more than one rank (a per-device job gave devices different ranks)."""
    if {result.metrics.adapter_kind for result in results} != {"lora"}:
        return False
    return len({int(result.metrics.adapter_options["r"]) for result in results}) > 1


def _ranked(weights: dict[str, torch.Tensor], options: dict) -> RankedLoRA:
    return RankedLoRA(weights, int(options["r"]), float(options["alpha"]))


def average_ranks(
    results: list[DeviceResult],
    starts: list[RankedLoRA | None],
    previous: RankedLoRA | None,
    rule: AggregationRule = FEDAVG,
    clip_norm: float | None = None,
) -> RankedLoRA:
    """LoRA results of different ranks combined by `rule` as dense updates from each device's own start
    (coordinator/adapters/lora_ranks.py), each clipped to `clip_norm` first when given."""
    if not all(finite(result.weights) for result in results):
        raise DataError("a device adapter holds NaN or infinite values; refuse it before aggregating")
    total = sum(result.metrics.examples for result in results)
    shares = [result.metrics.examples / total for result in results]

    def combine(updates: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
        if clip_norm is not None:
            zero = {target: torch.zeros_like(value) for target, value in updates[0].items()}
            updates = clip_updates(updates, zero, clip_norm)
        return rule.combine(updates, weights, weighted_mean)

    devices = [_ranked(result.weights, result.metrics.adapter_options) for result in results]
    return combine_ranks(devices, starts, shares, combine, previous)


def write_aggregate(
    results: list[DeviceResult],
    out: Path,
    round_: int,
    rule: AggregationRule = FEDAVG,
    start: dict[str, torch.Tensor] | None = None,
    clip_norm: float | None = None,
    ranked_starts: tuple[list[RankedLoRA | None], RankedLoRA | None] | None = None,
) -> ResultMetrics:
    """Write the aggregate as a result folder (adapter.safetensors + metrics.json) that `plug`/`evaluate` read.

    With `ranked_starts` (each device's start and the previous aggregate; Nones in the first round), or for LoRA
    results of different ranks, the results are averaged as dense updates into a LoRA at the sum of their ranks."""
    runs = [result.metrics for result in results]
    options = runs[0].adapter_options
    metadata: dict[str, object] = {"model": runs[0].model.name, "aggregate_round": round_}
    if ranked_starts is not None or mixed_lora_ranks(results):
        starts, previous = ranked_starts or ([None] * len(results), None)
        combined = average_ranks(results, starts, previous, rule, clip_norm)
        weights, options = combined.weights, options | {"r": combined.r, "alpha": combined.alpha}
        metadata |= {"lora_r": combined.r, "lora_alpha": combined.alpha}
    else:
        weights = federated_average(results, rule, start, clip_norm)
    metrics = ResultMetrics(
        format=RESULT_FORMAT,
        schema=RESULT_SCHEMA,
        tool_version=__version__,
        aggregate=AggregateRecord(rule.label(), round_, len(results), clip_norm),
        model=runs[0].model,
        emulator=runs[0].emulator,
        backend=",".join(sorted({run.backend for run in runs})),
        steps=sum(run.steps for run in runs),
        samples=sum(run.samples for run in runs),
        examples=sum(run.examples for run in runs),
        first_loss=sum(run.first_loss for run in runs) / len(runs),
        final_loss=sum(run.final_loss for run in runs) / len(runs),
        loss_curve=runs[0].loss_curve,
        wall_seconds=max(run.wall_seconds for run in runs),
        peak_memory_bytes=max(run.peak_memory_bytes for run in runs),
        layer_windows=runs[0].layer_windows,
        adapter_kind=runs[0].adapter_kind,
        adapter_options=options,
        privacy=aggregate_privacy(runs),
    )
    with atomic_directory(out) as staging:
        save_adapter(weights, staging / ADAPTER, metadata)
        write_json_atomic(staging / METRICS, metrics.to_dict())
    return metrics
