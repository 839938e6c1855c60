"""Bias terms of the adapter layers (BiTFiT, DP-BiTFiT): every bias trains, everything else stays frozen.

LLaMA-family projections have no bias; each gets a zero one, in the emulator and in the full model it plugs into,
so an untrained bias adapter changes nothing. Norm layers train their bias where they have one (LayerNorm in
GPT-2 and OPT); RMSNorm has none and gets none, since adding one would change what the layer computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from coordinator.adapters.layers import adapter_layers, plug_in, weighted_mean
from coordinator.errors import ConfigError
from edge_runtime.adapter_modules import attach_biases, is_linear, remove_biases

# Config switches that make a loaded model build its projections with biases, per model type.
BIAS_SWITCHES = {"llama": ("attention_bias", "mlp_bias")}
ADDED = "_offsite_added_biases"


@dataclass(frozen=True)
class BiasAdapter:
    """`bias`: every bias term of the adapter layers trains (zero-initialized where the layer had none)."""

    name = "bias"

    @classmethod
    def from_options(cls, options: dict[str, str]) -> BiasAdapter:
        if options:
            raise ConfigError(f"adapter kind 'bias' takes no options (got {', '.join(options)})")
        return cls()

    def options(self) -> dict[str, object]:
        return {}

    def attach(self, model: PreTrainedModel, bottom: int, top: int) -> dict[str, nn.Parameter]:
        layers = list(adapter_layers(model, bottom, top))
        linear = [
            f"{local}.{name}"
            for local, _, layer in layers
            for name, module in layer.named_modules()
            if is_linear(module)
        ]
        setattr(model, ADDED, [*getattr(model, ADDED, []), *attach_biases(model, linear)])
        return {
            f"{full}.{name}": parameter
            for _, full, layer in layers
            for name, parameter in layer.named_parameters()
            if name.split(".")[-1] == "bias"
        }

    def detach(self, model: PreTrainedModel) -> None:
        remove_biases(model, getattr(model, ADDED, []))
        setattr(model, ADDED, [])

    def merge(self, model: PreTrainedModel, weights: dict[str, torch.Tensor], bottom: int, top: int) -> None:
        """Put trained biases in `model` so that it saves and loads with them: every projection of its family
        gets a bias (zero outside the adapter layers) and the config says so."""
        switches = BIAS_SWITCHES.get(model.config.model_type, ())
        self.attach(model, bottom, top)
        missing = [name for name, module in model.named_modules() if is_linear(module) and module.bias is None]
        missing = [name for name in missing if not name.endswith("lm_head")]
        if missing and not switches:
            raise ConfigError(
                f"a {model.config.model_type} config cannot say that {missing[0]} has a bias, so a saved model would "
                "lose the trained biases; use `coordinator evaluate --adapter` (it plugs them in memory) instead"
            )
        attach_biases(model, missing)
        for switch in switches:
            setattr(model.config, switch, True)
        plug_in(model, weights)

    def average(self, results: list[dict[str, torch.Tensor]], shares: list[float]) -> dict[str, torch.Tensor]:
        """Bias terms average like any weights."""
        return weighted_mean(results, shares)
