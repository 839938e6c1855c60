"""Layer adapters: which parameters train, saving them under full-model names, and plugging them in."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel

from coordinator.architectures import spec_for
from coordinator.emulator import layer_map, split_layer_name
from coordinator.errors import ConfigError, DataError
from edge_runtime.bundle import ADAPTER_FORMAT, write_adapter_file
from edge_runtime.windows import split_windows


def adapter_layer_indices(num_layers: int, bottom: int, top: int) -> list[int]:
    """Indices (in a model of `num_layers` layers) of the bottom and top adapter layers."""
    if bottom + top > num_layers:
        raise ConfigError(f"adapter layers {bottom},{top} exceed the model's {num_layers} layers")
    return [*range(bottom), *range(num_layers - top, num_layers)]


def adapter_windows(num_layers: int, bottom: int, top: int, size: int | None) -> list[list[int]]:
    """The adapter's layers cut into training windows of at most `size` (edge_runtime/windows.py); one if None."""
    indices = adapter_layer_indices(num_layers, bottom, top)
    if size is None:
        return [indices]
    return split_windows(indices[:bottom], indices[bottom:], size)


def adapter_exits(num_layers: int, bottom: int, top: int, size: int | None) -> list[int]:
    """The layers whose outputs are voted across: each window's last layer; none without windows."""
    return [] if size is None else [window[-1] for window in adapter_windows(num_layers, bottom, top, size)]


def adapter_parameters(model: PreTrainedModel, bottom: int, top: int) -> dict[str, nn.Parameter]:
    """The adapter's parameters keyed by their full-model names (emulator layers renamed to source layers)."""
    prefix = spec_for(model.config.model_type).layers
    sources = layer_map(model)
    layers = model.get_submodule(prefix)
    parameters = {}
    for index in adapter_layer_indices(len(layers), bottom, top):
        for name, parameter in layers[index].named_parameters():
            parameters[f"{prefix}.{sources[index]}.{name}"] = parameter
    return parameters


def adapter_state(model: PreTrainedModel, bottom: int, top: int) -> dict[str, torch.Tensor]:
    """A detached copy of the adapter's weights under full-model names."""
    return {name: p.detach().clone().contiguous() for name, p in adapter_parameters(model, bottom, top).items()}


@contextmanager
def plugged_in(
    model: PreTrainedModel, weights: dict[str, torch.Tensor], bottom: int, top: int
) -> Iterator[PreTrainedModel]:
    """While open, `model` holds adapter `weights` (full-model names); its own adapter layers come back on exit."""
    original = adapter_state(model, bottom, top)
    plug_in(model, weights)
    try:
        yield model
    finally:
        plug_in(model, original)


def plug_in(model: PreTrainedModel, weights: dict[str, torch.Tensor]) -> None:
    """Copy adapter `weights` (full-model names) into `model`, a full model or an emulator, in place."""
    layers = spec_for(model.config.model_type).layers
    position = {source: target for target, source in enumerate(layer_map(model))}
    targets = dict(model.named_parameters())
    resolved = {}
    for name, tensor in weights.items():
        local, located = name, split_layer_name(name, layers)
        if located is not None:
            index, rest = located
            if index not in position:
                raise ConfigError(f"adapter weight {name!r} belongs to layer {index}, which this model does not hold")
            local = f"{layers}.{position[index]}.{rest}"
        if local not in targets:
            raise ConfigError(f"adapter weight {name!r} has no matching parameter in the model; is it the same model?")
        if targets[local].shape != tensor.shape:
            raise ConfigError(
                f"adapter weight {name!r} has shape {tuple(tensor.shape)}, the model's {tuple(targets[local].shape)}"
            )
        resolved[local] = tensor
    with torch.no_grad():
        for local, tensor in resolved.items():
            targets[local].copy_(tensor)


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
