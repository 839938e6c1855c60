"""Importance-based layer selection: keep the middle layers whose removal moves the model's predictions most."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from coordinator.architectures import decoder_layers
from coordinator.compression.calibration import Calibration, divergence, log_probs
from coordinator.emulator import Split


@contextmanager
def layer_skipped(layer: nn.Module) -> Iterator[None]:
    """While open, `layer` passes its input hidden states through unchanged (as if removed from the stack)."""

    def identity(_module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = layer.register_forward_hook(identity, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def removal_importance(model: PreTrainedModel, split: Split, calibration: Calibration) -> list[float]:
    """For each middle layer (in order), the mean per-token KL divergence of the model's next-token predictions
    when that layer alone is skipped: 0 for a layer that changes nothing, large for one the output depends on."""
    layers = decoder_layers(model)
    middle = range(split.bottom, len(layers) - split.top)
    batches = calibration.measure_batches()
    reference = log_probs(model, batches)
    scores = []
    for index in tqdm(middle, desc="importance", unit="layer", leave=False):
        with layer_skipped(layers[index]):
            scores.append(divergence(model, batches, reference))
    return scores


def most_important(scores: list[float], keep: int) -> list[int]:
    """Offsets of the `keep` highest scores, in layer order.

    >>> most_important([0.5, 0.1, 0.9, 0.2], 2)
    [0, 2]
    """
    ranked = sorted(range(len(scores)), key=lambda offset: (-scores[offset], offset))
    return sorted(ranked[:keep])


@torch.no_grad()
def select_important(model: PreTrainedModel, split: Split, calibration: Calibration) -> tuple[list[int], dict]:
    """The kept middle offsets by removal importance, and what was measured (rounded for the manifest)."""
    scores = removal_importance(model, split, calibration)
    return most_important(scores, split.keep), {"importance": [round(score, 6) for score in scores]}
