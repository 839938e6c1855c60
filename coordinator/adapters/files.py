"""Adapter weights files: safetensors under full-model names, with JSON metadata (any adapter kind)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from coordinator.errors import DataError
from edge_runtime.bundle import ADAPTER_FORMAT, write_adapter_file


def save_adapter(weights: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, object]) -> None:
    """Write adapter weights as safetensors (atomically), with `metadata` stored as JSON strings."""
    write_adapter_file(Path(path), {name: t.detach().cpu().numpy() for name, t in weights.items()}, metadata)


def load_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Read adapter weights and metadata written by `save_adapter`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"adapter file {str(path)!r} does not exist; pass the .safetensors file a training run wrote")
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
        if header.get("format") != ADAPTER_FORMAT:
            raise DataError(f"{path} is not an offsite-edge adapter (format {header.get('format')!r})")
        weights = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    reserved = {"format", "schema", "tool_version"}
    metadata = {key: json.loads(value) for key, value in header.items() if key not in reserved}
    return weights, metadata
