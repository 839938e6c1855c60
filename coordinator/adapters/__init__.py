"""Adapter kinds: what trains on the device, behind one small Protocol, in a registry (one module per kind).

A kind says which parameters of a model (full model or emulator) train, plugs trained weights into a model, and
averages device results (FedAvg). `--adapter-kind KIND[:key=value,...]` names one; `layers` is the default.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import nn
from transformers import PreTrainedModel

from coordinator.adapters.bias import BiasAdapter
from coordinator.adapters.layers import LayerAdapter, plug_in
from coordinator.adapters.lora import LoRAAdapter
from coordinator.adapters.prompt import PromptAdapter
from coordinator.errors import ConfigError


class AdapterKind(Protocol):
    """One adapter kind; its weights are always keyed by full-model names, so they move between models."""

    name: str

    def options(self) -> dict[str, object]:
        """The kind's settings, as the manifest records them (the device rebuilds the kind from them)."""
        ...

    def attach(self, model: PreTrainedModel, bottom: int, top: int) -> dict[str, nn.Parameter]:
        """Add what trains to `model`'s adapter layers (once) and return it by full-model name."""
        ...

    def detach(self, model: PreTrainedModel) -> None:
        """Take away what `attach` added; the model computes as before it."""
        ...

    def merge(self, model: PreTrainedModel, weights: dict[str, torch.Tensor], bottom: int, top: int) -> None:
        """Make trained `weights` part of the full `model` for good, so that it saves and loads with them."""
        ...

    def average(self, results: list[dict[str, torch.Tensor]], shares: list[float]) -> dict[str, torch.Tensor]:
        """FedAvg: the results weighted by `shares` (each device's share of the examples; they sum to 1)."""
        ...


KINDS: dict[str, type] = {
    "layers": LayerAdapter,
    "lora": LoRAAdapter,
    "bias": BiasAdapter,
    "prompt": PromptAdapter,
}


def _kind_class(name: str) -> type:
    if name not in KINDS:
        raise ConfigError(f"adapter kind {name!r} is not one of: {', '.join(KINDS)} (e.g. --adapter-kind layers)")
    return KINDS[name]


def adapter_kind(text: str) -> AdapterKind:
    """The adapter kind `KIND[:key=value,...]` names, e.g. `layers`; ConfigError names the bad part and the choices."""
    name, _, options = text.strip().partition(":")
    kind = _kind_class(name)
    values: dict[str, str] = {}
    last = None
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, sep, value = item.partition("=")
        if sep:
            last, values[key.strip()] = key.strip(), value.strip()
        elif last is not None:  # a list value goes on after its comma: targets=q_proj,v_proj
            values[last] += f",{item}"
        else:
            raise ConfigError(f"adapter kind option {item!r} in {text!r} is not KEY=VALUE")
    return kind.from_options(values)


def adapter_kind_of(name: str, options: dict[str, object]) -> AdapterKind:
    """The kind a manifest or a result records (its name and options, as the kind's `options()` wrote them)."""
    values = {key: ",".join(map(str, v)) if isinstance(v, list) else str(v) for key, v in options.items() if v != []}
    return _kind_class(name).from_options(values)


def check_layer_window(layer_window: int | None, kind: AdapterKind) -> None:
    """Layer windows (adaptive layer tuning) train whole layers, a window at a time: at least one, kind `layers`."""
    if layer_window is None:
        return
    if layer_window < 1:
        raise ConfigError(f"--layer-window {layer_window} must be at least 1 layer")
    if kind.name != "layers":
        raise ConfigError(
            f"--layer-window trains whole layers a window at a time; it takes --adapter-kind layers, not {kind.name}"
        )


@contextmanager
def plugged_in(
    kind: AdapterKind, model: PreTrainedModel, weights: dict[str, torch.Tensor], bottom: int, top: int
) -> Iterator[PreTrainedModel]:
    """While open, `model` holds adapter `weights` (full-model names); on exit it is as it was."""
    attached = kind.attach(model, bottom, top)
    original = {name: parameter.detach().clone() for name, parameter in attached.items()}
    plug_in(model, weights)
    try:
        yield model
    finally:
        plug_in(model, original)
        kind.detach(model)
