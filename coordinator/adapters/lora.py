"""LoRA on the adapter layers (FedPEAT): low-rank branches on chosen projections train; the layers stay frozen."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from coordinator.adapters.layers import adapter_layers, plug_in, weighted_mean
from coordinator.architectures import spec_for
from coordinator.errors import ConfigError
from edge_runtime.adapter_modules import LORA_A, LORA_B, LoRALinear, attach_lora, detach_lora, is_linear, merge_lora


@dataclass(frozen=True)
class LoRAAdapter:
    """`lora:r=8,alpha=16,targets=q_proj,v_proj`: a rank-`r` branch, scaled by alpha/r, on each target projection
    (matched by the module's own name) of every adapter layer; targets default to the family's query and value."""

    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ()  # empty: the family's lora_targets

    name = "lora"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora r={self.r} must be at least 1, e.g. lora:r=8")
        if not self.alpha > 0:
            raise ConfigError(f"lora alpha={self.alpha} must be positive, e.g. lora:alpha=16")

    @classmethod
    def from_options(cls, options: dict[str, str]) -> LoRAAdapter:
        unknown = sorted(set(options) - {"r", "alpha", "targets"})
        if unknown:
            raise ConfigError(f"adapter kind 'lora' takes r, alpha and targets, not {', '.join(unknown)}")
        try:
            r, alpha = int(options.get("r", 8)), float(options.get("alpha", 16))
        except ValueError:
            raise ConfigError(f"lora r and alpha must be numbers (got {options})") from None
        targets = tuple(t for t in options.get("targets", "").replace("+", ",").split(",") if t)
        return cls(r, alpha, targets)

    def options(self) -> dict[str, object]:
        return {"r": self.r, "alpha": self.alpha, "targets": list(self.targets)}

    def _paths(self, model: PreTrainedModel, bottom: int, top: int) -> dict[str, str]:
        """Each target's module path in `model` -> its path in the full model."""
        targets = self.targets or spec_for(model.config.model_type).lora_targets
        paths = {
            f"{local}.{name}": f"{full}.{name}"
            for local, full, layer in adapter_layers(model, bottom, top)
            for name, module in layer.named_modules()
            if name.split(".")[-1] in targets and (is_linear(module) or isinstance(module, LoRALinear))
        }
        if not paths:
            raise ConfigError(
                f"lora targets {list(targets)} match no linear map in the adapter layers of this "
                f"{model.config.model_type} model; name projections it has (e.g. targets=q_proj,v_proj)"
            )
        return paths

    def attach(self, model: PreTrainedModel, bottom: int, top: int) -> dict[str, nn.Parameter]:
        paths = self._paths(model, bottom, top)
        attach_lora(model, list(paths), self.r, self.alpha)
        return {
            f"{full}.{part}": getattr(model.get_submodule(local), part)
            for local, full in paths.items()
            for part in (LORA_A, LORA_B)
        }

    def detach(self, model: PreTrainedModel) -> None:
        detach_lora(model)

    def merge(self, model: PreTrainedModel, weights: dict[str, torch.Tensor], bottom: int, top: int) -> None:
        """Fold trained branches into `model`'s weights: what `coordinator plug` saves is a plain model."""
        self.attach(model, bottom, top)
        plug_in(model, weights)
        merge_lora(model)

    def average(self, results: list[dict[str, torch.Tensor]], shares: list[float]) -> dict[str, torch.Tensor]:
        """A and B averaged each on its own, as FedPEAT and FedIT do.

        The mean of products is not the product of means, so this is not the average update; every device starts
        a round from the same A and B, and for few local steps the gap is second order in the change. Averaging
        B·A and factoring it again would be exact but costs an SVD per target and a rank change.
        """
        return weighted_mean(results, shares)
