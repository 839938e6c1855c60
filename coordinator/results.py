"""Results that devices return: read, check against the model they claim, ready to plug in or evaluate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from coordinator.adapters.files import load_adapter
from coordinator.errors import DataError
from coordinator.models import LoadedModel, source_sha256
from edge_runtime.manifest import ResultMetrics, read_metrics
from edge_runtime.trainer import ADAPTER, METRICS


@dataclass(frozen=True)
class DeviceResult:
    """A device's trained adapter (full-model names) and its metrics.json."""

    weights: dict[str, torch.Tensor]
    metrics: ResultMetrics


def read_result(directory: Path, loaded: LoadedModel) -> DeviceResult:
    """Read a finished result folder (`edge-runtime train --out`) and check it was trained for `loaded`."""
    metrics_path = directory / METRICS
    if not metrics_path.is_file():
        raise DataError(
            f"{directory} has no {METRICS}: it is not a finished result (training still running or cut off; run "
            "`edge-runtime train` again with the same --out to resume)"
        )
    metrics = read_metrics(metrics_path.read_bytes(), str(metrics_path))
    expected = source_sha256(loaded)
    if metrics.model.sha256 != expected:
        raise DataError(
            f"the adapter in {directory} was trained for {metrics.model.name} (sha256 "
            f"{metrics.model.sha256[:12]}…), not {loaded.name} ({expected[:12]}…); pass --model for that model"
        )
    weights, _ = load_adapter(directory / ADAPTER)
    return DeviceResult(weights, metrics)
