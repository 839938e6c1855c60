"""Adapter kinds: what trains on the device, behind one small Protocol, in a registry (one module per kind).

A kind says which parameters of a model (full model or emulator) train, plugs trained weights into a model, and
averages device results (FedAvg). `--adapter-kind KIND[:key=value,...]` names one; `layers` is the default.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from transformers import PreTrainedModel

from coordinator.adapters.layers import LayerAdapter
from coordinator.errors import ConfigError


class AdapterKind(Protocol):
    """One adapter kind; its weights are always keyed by full-model names, so they move between models."""

    name: str

    def trainable(self, model: PreTrainedModel, bottom: int, top: int) -> dict[str, nn.Parameter]:
        """The parameters of `model` that train, by full-model name (emulator layers renamed to source layers)."""
        ...

    def plug_in(self, model: PreTrainedModel, weights: dict[str, torch.Tensor]) -> None:
        """Put trained `weights` into `model` (a full model or an emulator), in place."""
        ...

    def average(self, results: list[dict[str, torch.Tensor]], shares: list[float]) -> dict[str, torch.Tensor]:
        """FedAvg: the results weighted by `shares` (each device's share of the examples; they sum to 1)."""
        ...


KINDS: dict[str, type] = {"layers": LayerAdapter}


def adapter_kind(text: str) -> AdapterKind:
    """The adapter kind `KIND[:key=value,...]` names, e.g. `layers`; ConfigError names the bad part and the choices."""
    name, _, options = text.strip().partition(":")
    if name not in KINDS:
        raise ConfigError(f"adapter kind {name!r} is not one of: {', '.join(KINDS)} (e.g. --adapter-kind layers)")
    values: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"adapter kind option {item!r} in {text!r} is not KEY=VALUE")
        values[key.strip()] = value.strip()
    return KINDS[name].from_options(values)
