"""Shared layers (CRaSh): emulator positions that run another position's layer, its weights held once.

Imported by the PyTorch backend and the coordinator; it needs torch. A tied position keeps its own module (so its
attention keeps its own layer index and a KV cache stays per position) but its parameters are the very
Parameter objects of its source position: the device stores and loads them once, `named_parameters` lists them
once, and the ONNX export makes one initializer of each. The tied positions are recorded in the config so a
saved folder, which holds each shared tensor under one name only, loads back tied.
"""

from __future__ import annotations

import re

from torch import nn

# Config attribute of an emulator with shared layers: {"layers": path, "ties": {position: source position}}.
SHARED_RECORD = "offsite_shared_layers"


def tie_layer(layers: nn.ModuleList, position: int, source: int) -> None:
    """Make layer `position` run with layer `source`'s parameters (the same objects, not copies)."""
    target = layers[position]
    names = []
    for name, parameter in list(layers[source].named_parameters()):
        owner_path, _, leaf = name.rpartition(".")
        setattr(target.get_submodule(owner_path) if owner_path else target, leaf, parameter)
        names.append(re.escape(name) + "$")
    target._dynamic_tied_weights_keys = names  # transformers' save_pretrained then writes the source's copy only


def share_layers(model: nn.Module, layers_path: str, ties: dict[str, int]) -> None:
    """Tie each layer position in `ties` ({position: source}) to its source, and record the ties in the config.

    A source must be a layer that is not itself tied, so every shared weight has one owner.
    """
    layers = model.get_submodule(layers_path)
    ordered = {str(position): int(source) for position, source in sorted(ties.items(), key=lambda t: int(t[0]))}
    for position, source in ordered.items():
        if not (0 <= int(position) < len(layers) and 0 <= source < len(layers)) or position == str(source):
            raise ValueError(f"layer tie {position} -> {source} leaves 0..{len(layers) - 1} or ties a layer to itself")
        if str(source) in ordered:
            raise ValueError(f"layer tie {position} -> {source}: {source} is tied itself; tie to its source instead")
        tie_layer(layers, int(position), source)
    setattr(model.config, SHARED_RECORD, {"layers": layers_path, "ties": ordered})


def tied_names(record: dict, state_names: list[str]) -> set[str]:
    """The parameter names of tied positions among `state_names` (a saved folder may hold either copy's name)."""
    prefixes = tuple(f"{record['layers']}.{position}." for position in record["ties"])
    return {name for name in state_names if name.startswith(prefixes)}
