"""Layerwise unified compression (Edge-LLM): per-layer sparsity and bit width chosen by measured sensitivity.

Each kept middle layer is pruned (activation-aware magnitude, per output row) and fake-quantized (symmetric,
per output channel, rounded back to float32: ONNX Runtime cannot train through INT8 graphs). The
layer's sensitivity to each sparsity and each bit width is the KL divergence of the emulator's predictions when
only that layer is compressed so; one (sparsity, bits) per layer is then chosen to minimize the summed
sensitivity within the size target (a knapsack, solved exactly). The size is what the weights would take
stored compactly (b-bit values of the kept weights, a 1-bit mask where pruned, a float32 scale per output
channel); on the device they are float32, so device memory does not shrink: what the bundle reveals does.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from coordinator.architectures import decoder_layers
from coordinator.compression.calibration import (
    Calibration,
    divergence,
    input_scales,
    linear_modules,
    log_probs,
    weight_matrix,
)
from coordinator.emulator import Split
from coordinator.errors import ConfigError

SPARSITIES = (0.0, 0.25, 0.5, 0.75)
BIT_WIDTHS = (32, 8, 4)
FLOAT_BITS = 32


def quantize_rows(matrix: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric round-to-nearest quantization with one scale per row, returned as floats (32 bits: unchanged).

    4 bits give 7 levels each side of zero, so a row whose largest entry is 1.0 lands on multiples of 1/7:

    >>> (quantize_rows(torch.tensor([[1.0, -0.4, 0.2]]), 4) * 7).round().tolist()
    [[7.0, -3.0, 1.0]]
    """
    if bits >= FLOAT_BITS:
        return matrix
    levels = 2 ** (bits - 1) - 1
    scale = (matrix.abs().amax(dim=1, keepdim=True) / levels).clamp_min(torch.finfo(matrix.dtype).tiny)
    return (matrix / scale).round().clamp(-levels, levels) * scale


def prune_mask(matrix: torch.Tensor, scales: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of an [out, in] matrix: in each row, drop the `sparsity` fraction with the smallest |w|·scale_in."""
    drop = int(matrix.shape[1] * sparsity)
    mask = torch.ones_like(matrix, dtype=torch.bool)
    if drop:
        order = (matrix.abs() * scales[None]).argsort(dim=1)
        mask.scatter_(1, order[:, :drop], False)
    return mask


class FakeCompress(nn.Module):
    """Parametrization of a weight: masked, then fake-quantized; the straight-through gradient lets
    distillation train the float weights underneath, and removing it bakes the compressed values in."""

    def __init__(self, mask: torch.Tensor, bits: int, transposed: bool) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.bits = bits
        self.transposed = transposed

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        masked = weight * self.mask
        matrix = masked.t() if self.transposed else masked
        quantized = quantize_rows(matrix, self.bits)
        quantized = quantized.t() if self.transposed else quantized
        return masked + (quantized - masked).detach()


@dataclass(frozen=True)
class LayerCost:
    """One layer's measured sensitivities and the counts that set its compact size."""

    pruning: dict[float, float]
    quantization: dict[int, float]
    weights: int  # entries of its weight matrices
    rows: int  # output channels over its weight matrices (one scale each when quantized)
    other: int  # every other parameter (norms, biases), kept in float32

    def bits(self, sparsity: float, bits: int) -> float:
        stored = self.weights * (1 - sparsity) * bits + (self.weights if sparsity else 0)
        scales = self.rows * FLOAT_BITS if bits < FLOAT_BITS else 0
        return stored + scales + self.other * FLOAT_BITS

    def full_bits(self) -> float:
        return self.bits(0.0, FLOAT_BITS)

    def cost(self, sparsity: float, bits: int) -> float:
        return max(0.0, self.pruning[sparsity]) + max(0.0, self.quantization[bits])


def allocate(costs: list[LayerCost], target: float, resolution: int = 2000) -> list[tuple[float, int]]:
    """Per layer (sparsity, bits) minimizing the summed sensitivity with compact size ≤ `target` × float32 size.

    A knapsack solved exactly by dynamic programming over the size, counted in 1/`resolution` of the float32
    size and rounded up (so the target always holds). Among equal costs the less compressed option wins.
    """
    if target >= 1:
        return [(0.0, FLOAT_BITS)] * len(costs)
    options = list(itertools.product(SPARSITIES, BIT_WIDTHS))
    total = sum(layer.full_bits() for layer in costs)
    budget = int(target * resolution)

    def units(layer: LayerCost, option: tuple[float, int]) -> int:
        return math.ceil(layer.bits(*option) / total * resolution - 1e-9)

    smallest = sum(min(units(layer, option) for option in options) for layer in costs)
    if smallest > budget:
        raise ConfigError(
            f"size={target} is below the smallest layerwise compression, {smallest / resolution:.3f} of float32 "
            f"(sparsity {max(SPARSITIES)} at {min(BIT_WIDTHS)} bits everywhere); raise size or keep fewer layers"
        )
    best = [0.0] * (budget + 1)  # best[b]: least summed cost of the layers so far within b units
    picks = []
    for layer in costs:
        priced = [
            (layer.cost(*option) + 1e-9 * (1 - layer.bits(*option) / layer.full_bits()), units(layer, option))
            for option in options
        ]
        cheapest, pick = [math.inf] * (budget + 1), [0] * (budget + 1)
        for room in range(budget + 1):
            for index, (cost, size) in enumerate(priced):
                if size <= room and best[room - size] + cost < cheapest[room]:
                    cheapest[room], pick[room] = best[room - size] + cost, index
        best = cheapest
        picks.append(pick)
    chosen, room = [], budget
    for layer, pick in zip(reversed(costs), reversed(picks), strict=True):
        option = options[pick[room]]
        chosen.append(option)
        room -= units(layer, option)
    return chosen[::-1]


@contextmanager
def weights_replaced(modules: dict[str, nn.Module], replacement: dict[str, torch.Tensor]) -> Iterator[None]:
    """While open, each module's weight holds its replacement; the originals come back after."""
    saved = {name: modules[name].weight.detach().clone() for name in replacement}
    with torch.no_grad():
        for name, tensor in replacement.items():
            modules[name].weight.copy_(tensor)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, tensor in saved.items():
                modules[name].weight.copy_(tensor)


def _compressed(module: nn.Module, scales: torch.Tensor, sparsity: float, bits: int) -> torch.Tensor:
    transposed = not isinstance(module, nn.Linear)
    matrix = weight_matrix(module).detach()
    compressed = quantize_rows(matrix * prune_mask(matrix, scales, sparsity), bits)
    return compressed.t() if transposed else compressed


def measure_costs(
    emulator: PreTrainedModel, middle: list[int], calibration: Calibration
) -> tuple[list[LayerCost], dict[str, torch.Tensor]]:
    """Sensitivity of each middle layer to each sparsity and each bit width, alone, on calibration text; and
    the input scales of every middle weight matrix (keyed 'layer.module')."""
    layers = decoder_layers(emulator)
    batches = calibration.measure_batches()
    modules = {(i, name): m for i in middle for name, m in linear_modules(layers[i]).items()}
    scales = input_scales(emulator, {f"{i}.{name}": m for (i, name), m in modules.items()}, batches)
    reference = log_probs(emulator, batches)
    costs = []
    for index in tqdm(middle, desc="layer sensitivity", unit="layer", leave=False):
        own = {name: m for (i, name), m in modules.items() if i == index}

        def measure(sparsity: float, bits: int, own: dict = own, index: int = index) -> float:
            if sparsity == 0 and bits == FLOAT_BITS:
                return 0.0
            replacement = {n: _compressed(m, scales[f"{index}.{n}"], sparsity, bits) for n, m in own.items()}
            with weights_replaced(own, replacement):
                return divergence(emulator, batches, reference)

        weights = sum(m.weight.numel() for m in own.values())
        own_ids = {id(m.weight) for m in own.values()}
        costs.append(
            LayerCost(
                pruning={s: measure(s, FLOAT_BITS) for s in SPARSITIES},
                quantization={b: measure(0.0, b) for b in BIT_WIDTHS},
                weights=weights,
                rows=sum(weight_matrix(m).shape[0] for m in own.values()),
                other=sum(p.numel() for p in layers[index].parameters() if id(p) not in own_ids),
            )
        )
    return costs, scales


def compress_layerwise(
    emulator: PreTrainedModel, split: Split, calibration: Calibration, target: float
) -> dict[str, object]:
    """Measure, allocate and attach the compression to `emulator`'s middle layers (as parametrizations, so
    distillation can still train underneath; `bake` makes them plain weights). Returns what it measured and chose."""
    if not 0 < target <= 1:
        raise ConfigError(f"size={target} must be in (0, 1]: the compact size as a fraction of float32, e.g. 0.25")
    layers = decoder_layers(emulator)
    middle = list(range(split.bottom, len(layers) - split.top))
    costs, scales = measure_costs(emulator, middle, calibration)
    choice = allocate(costs, target)
    for index, (sparsity, bits) in zip(middle, choice, strict=True):
        if sparsity == 0 and bits == FLOAT_BITS:
            continue
        for name, module in linear_modules(layers[index]).items():
            matrix = weight_matrix(module).detach()
            mask = prune_mask(matrix, scales[f"{index}.{name}"], sparsity)
            transposed = not isinstance(module, nn.Linear)
            parametrize.register_parametrization(
                module, "weight", FakeCompress(mask.t() if transposed else mask, bits, transposed)
            )
    total = sum(layer.full_bits() for layer in costs)
    achieved = sum(layer.bits(*option) for layer, option in zip(costs, choice, strict=True))
    return {
        "size_target": target,
        "size_fraction": round(achieved / total, 5),
        "compact_bits": int(achieved),
        "layers": [{"sparsity": s, "bits": b} for s, b in choice],
        "sensitivity": [
            {
                "pruning": {str(k): round(v, 6) for k, v in c.pruning.items()},
                "quantization": {str(k): round(v, 6) for k, v in c.quantization.items()},
            }
            for c in costs
        ],
        "stored_as": "float32 (fake quantization): device memory is that of the uncompressed layers",
    }


def bake(model: nn.Module) -> None:
    """Replace every parametrized weight by its current compressed value, in place."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
