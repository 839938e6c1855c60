"""Whole-layer adapters: the bottom and top layers train; saved under full-model names, plugged in by copy."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel

from coordinator.architectures import spec_for
from coordinator.emulator import layer_map, split_layer_name
from coordinator.errors import ConfigError, DataError
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


def adapter_layers(model: PreTrainedModel, bottom: int, top: int) -> Iterator[tuple[str, str, nn.Module]]:
    """Each adapter layer of `model`: its module path there, its path in the full model (source layer), the layer."""
    prefix = spec_for(model.config.model_type).layers
    sources = layer_map(model)
    layers = model.get_submodule(prefix)
    for index in adapter_layer_indices(len(layers), bottom, top):
        yield f"{prefix}.{index}", f"{prefix}.{sources[index]}", layers[index]


def adapter_parameters(model: PreTrainedModel, bottom: int, top: int) -> dict[str, nn.Parameter]:
    """The adapter's parameters keyed by their full-model names (emulator layers renamed to source layers)."""
    return {
        f"{full}.{name}": parameter
        for _, full, layer in adapter_layers(model, bottom, top)
        for name, parameter in layer.named_parameters()
    }


def adapter_state(model: PreTrainedModel, bottom: int, top: int) -> dict[str, torch.Tensor]:
    """A detached copy of the adapter's weights under full-model names."""
    return {name: p.detach().clone().contiguous() for name, p in adapter_parameters(model, bottom, top).items()}


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


class LayerAdapter:
    """Whole layers: every parameter of the bottom and top adapter layers trains (Offsite-Tuning's adapter)."""

    name = "layers"

    def options(self) -> dict[str, object]:
        return {}

    @classmethod
    def from_options(cls, options: dict[str, str]) -> LayerAdapter:
        if options:
            raise ConfigError(f"adapter kind 'layers' takes no options (got {', '.join(options)})")
        return cls()

    def attach(self, model: PreTrainedModel, bottom: int, top: int) -> dict[str, nn.Parameter]:
        return adapter_parameters(model, bottom, top)

    def detach(self, model: PreTrainedModel) -> None:
        """Nothing to take away: whole layers are the model's own."""

    def merge(self, model: PreTrainedModel, weights: dict[str, torch.Tensor], bottom: int, top: int) -> None:
        plug_in(model, weights)

    def average(self, results: list[dict[str, torch.Tensor]], shares: list[float]) -> dict[str, torch.Tensor]:
        return weighted_mean(results, shares)


def weighted_mean(results: list[dict[str, torch.Tensor]], shares: list[float]) -> dict[str, torch.Tensor]:
    """Each tensor's mean over `results` weighted by `shares`, in float64 then back to float32 (plain FedAvg)."""
    names = set(results[0])
    if any(set(result) != names for result in results[1:]):
        raise DataError("device adapters name different tensors: they were trained from different bundles")
    return {
        name: sum(result[name].double() * share for result, share in zip(results, shares, strict=True)).float()
        for name in sorted(names)
    }
