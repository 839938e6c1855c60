"""FedAvg over device adapters, weighted by each device's number of training examples."""

from __future__ import annotations

from pathlib import Path

import torch

from coordinator.adapters import adapter_kind
from coordinator.adapters.files import save_adapter
from coordinator.errors import DataError
from coordinator.results import DeviceResult
from edge_runtime import __version__
from edge_runtime.files import atomic_directory, write_json_atomic
from edge_runtime.manifest import RESULT_FORMAT, RESULT_SCHEMA, AggregateRecord, ResultMetrics
from edge_runtime.trainer import ADAPTER, METRICS


def federated_average(results: list[DeviceResult]) -> dict[str, torch.Tensor]:
    """Σ_k n_k·w_k / Σ_k n_k over the results, n_k = the examples device k trained on (McMahan et al., 2017).

    How the weights average is the adapter kind's (coordinator/adapters/); every result must be of one kind.
    """
    if not results:
        raise DataError("no device returned a result this round: nothing to aggregate")
    kinds = sorted({result.metrics.adapter_kind for result in results})
    if len(kinds) > 1:
        raise DataError(f"device adapters are of different kinds {kinds}: they were trained from different bundles")
    total = sum(result.metrics.examples for result in results)
    shares = [result.metrics.examples / total for result in results]
    return adapter_kind(kinds[0]).average([result.weights for result in results], shares)


def write_aggregate(results: list[DeviceResult], out: Path, round_: int) -> ResultMetrics:
    """Write the average as a result folder (adapter.safetensors + metrics.json) that `plug`/`evaluate` read."""
    weights = federated_average(results)
    runs = [result.metrics for result in results]
    metrics = ResultMetrics(
        format=RESULT_FORMAT,
        schema=RESULT_SCHEMA,
        tool_version=__version__,
        aggregate=AggregateRecord("fedavg", round_, len(results)),
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
        adapter_options=runs[0].adapter_options,
    )
    with atomic_directory(out) as staging:
        save_adapter(weights, staging / ADAPTER, {"model": runs[0].model.name, "aggregate_round": round_})
        write_json_atomic(staging / METRICS, metrics.to_dict())
    return metrics
