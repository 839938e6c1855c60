"""Harmonizers (ScaleOT): small residual modules an emulator runs in place of each run of removed layers.

Imported by the PyTorch backend and the coordinator; it needs torch. A harmonizer maps the hidden state that
reaches a gap to the one the full model would have after the removed layers: h + up(silu(down(rmsnorm(h)))),
with `up` zero at birth, so an untrained harmonizer is the plain layer drop. It runs as a forward pre-hook of
the module after the gap (the next layer, or the final norm after a trailing gap), so the emulator stays an
ordinary transformers model for both device backends and the ONNX export traces it like any other op. Its
weights live beside the layers (`model.offsite_harmonizers.<position>.*`), never inside an adapter layer, so
plugging an adapter into the full model never carries one along.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Config attribute of a harmonized emulator: {"layers": path, "final_norm": path, "ranks": {position: rank}}.
HARMONIZER_RECORD = "offsite_harmonizers"
CONTAINER = "offsite_harmonizers"


class Harmonizer(nn.Module):
    """h → h + up(silu(down(rmsnorm(h)))) on [..., hidden]; rank-r, identity until trained.

    >>> harmonizer = Harmonizer(hidden=8, rank=2)
    >>> x = torch.randn(3, 8)
    >>> bool(torch.equal(harmonizer(x), x))
    True
    """

    def __init__(self, hidden: int, rank: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm_weight = nn.Parameter(torch.ones(hidden))
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, hidden, bias=False)
        nn.init.zeros_(self.up.weight)
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # RMSNorm written out: opset-15 export has no RMSNormalization node, and this traces to plain ops.
        scale = torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return hidden + self.up(nn.functional.silu(self.down(hidden * scale * self.norm_weight)))


def gap_module(model: nn.Module, layers_path: str, final_norm_path: str, position: int) -> nn.Module:
    """The module whose input a harmonizer at `position` rewrites: layer `position`, or the final norm after
    the last layer."""
    layers = model.get_submodule(layers_path)
    if not 0 <= position <= len(layers):
        raise ValueError(f"harmonizer position {position} is outside 0..{len(layers)} for {len(layers)} layers")
    return layers[position] if position < len(layers) else model.get_submodule(final_norm_path)


def _rewrite_input(harmonizer: Harmonizer):
    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if args:
            return (harmonizer(args[0]), *args[1:]), kwargs
        return args, kwargs | {"hidden_states": harmonizer(kwargs["hidden_states"])}

    return hook


def attach_harmonizers(
    model: nn.Module, layers_path: str, final_norm_path: str, ranks: dict[str, int]
) -> nn.ModuleDict:
    """Give `model` one identity harmonizer per `ranks` entry ({position: rank}) and hook each before its gap
    module; records the layout in the config so a saved folder loads back the same way. Returns the modules."""
    *parents, _ = layers_path.split(".")
    owner = model.get_submodule(".".join(parents)) if parents else model
    hidden = model.config.hidden_size
    dtype = next(model.parameters()).dtype
    ordered = dict(sorted(ranks.items(), key=lambda item: int(item[0])))
    container = nn.ModuleDict({key: Harmonizer(hidden, rank).to(dtype) for key, rank in ordered.items()})
    owner.add_module(CONTAINER, container)
    for key, harmonizer in container.items():
        gap_module(model, layers_path, final_norm_path, int(key)).register_forward_pre_hook(
            _rewrite_input(harmonizer), with_kwargs=True
        )
    record = {"layers": layers_path, "final_norm": final_norm_path, "ranks": ordered}
    setattr(model.config, HARMONIZER_RECORD, record)
    return container
