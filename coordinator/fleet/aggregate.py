"""FedAvg over device adapters, weighted by each device's number of training examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from coordinator.adapter import save_adapter
from coordinator.errors import DataError
from coordinator.results import DeviceResult
from edge_runtime.files import atomic_directory, write_json_atomic
from edge_runtime.trainer import ADAPTER, METRICS, RESULT_FORMAT, RESULT_SCHEMA


def federated_average(results: list[DeviceResult]) -> dict[str, torch.Tensor]:
    """Σ_k n_k·w_k / Σ_k n_k over the results, n_k = the examples device k trained on (McMahan et al., 2017)."""
    if not results:
        raise DataError("no device returned a result this round: nothing to aggregate")
    names = set(results[0].weights)
    for result in results[1:]:
        if set(result.weights) != names:
            raise DataError("device adapters name different tensors: they were trained from different bundles")
    total = sum(result.metrics["examples"] for result in results)
    return {
        name: sum(result.weights[name].double() * (result.metrics["examples"] / total) for result in results).float()
        for name in sorted(names)
    }


def write_aggregate(results: list[DeviceResult], out: Path, round_: int) -> dict[str, Any]:
    """Write the average as a result folder (adapter.safetensors + metrics.json) that `plug`/`evaluate` read."""
    weights = federated_average(results)
    first = results[0].metrics
    metrics = {
        "format": RESULT_FORMAT,
        "schema": RESULT_SCHEMA,
        "aggregate": {"method": "fedavg", "round": round_, "devices": len(results)},
        "model": first["model"],
        "emulator": first["emulator"],
        "backend": ",".join(sorted({r.metrics["backend"] for r in results})),
        "steps": sum(r.metrics["steps"] for r in results),
        "samples": sum(r.metrics["samples"] for r in results),
        "examples": sum(r.metrics["examples"] for r in results),
        "first_loss": sum(r.metrics["first_loss"] for r in results) / len(results),
        "final_loss": sum(r.metrics["final_loss"] for r in results) / len(results),
        "loss_curve": results[0].metrics["loss_curve"],
        "wall_seconds": max(r.metrics["wall_seconds"] for r in results),
        "peak_memory_bytes": max(r.metrics["peak_memory_bytes"] for r in results),
    }
    with atomic_directory(out) as staging:
        save_adapter(weights, staging / ADAPTER, {"model": first["model"]["name"], "aggregate_round": round_})
        write_json_atomic(staging / METRICS, metrics)
    return metrics
