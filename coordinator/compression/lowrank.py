"""Low-rank compression: each middle weight matrix W [out, in] becomes left [out, r] @ right [r, in].

Activation-aware SVD: W·diag(s), with s the root-mean-square of each input feature on calibration text, is
factorized, so the rank goes where the inputs are large; the scale is folded back into `right`. The rank comes
from an energy threshold (the fraction of Σσ² kept) or a size target (the fraction of the matrix's entries). A
matrix whose factors would not be smaller than itself stays dense, so full rank reproduces the model exactly.
The factors are real parameters: the emulator's weights, bundle and device memory shrink with them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from coordinator.architectures import decoder_layers, spec_for
from coordinator.compression.calibration import Calibration, input_scales, linear_modules, weight_matrix
from coordinator.emulator import Split
from coordinator.errors import ConfigError
from edge_runtime.low_rank import LOW_RANK_RECORD, LowRankLinear, in_out_features


def rank_for(singular: torch.Tensor, shape: tuple[int, int], energy: float | None, size: float | None) -> int:
    """The rank that keeps `energy` of Σσ², or whose factors hold `size` × the matrix's entries.

    >>> rank_for(torch.tensor([3.0, 2.0, 1.0, 0.0]), (4, 4), energy=0.9, size=None)
    2
    >>> rank_for(torch.tensor([3.0, 2.0, 1.0, 0.0]), (4, 4), energy=None, size=0.5)
    1
    """
    if energy is not None:
        cumulative = (singular.double() ** 2).cumsum(0)
        return int((cumulative < energy * cumulative[-1] * (1 - 1e-12)).sum()) + 1
    rows, columns = shape
    return max(1, int(size * rows * columns / (rows + columns)))


def factorize(
    module: nn.Module, scales: torch.Tensor, energy: float | None, size: float | None
) -> LowRankLinear | None:
    """The rank-r replacement of a linear module, or None where the factors would not be smaller."""
    matrix = weight_matrix(module).detach().double()
    scale = scales.double().clamp_min(1e-8)
    left, singular, right = torch.linalg.svd(matrix * scale[None], full_matrices=False)
    out_features, in_features = matrix.shape
    rank = rank_for(singular, (out_features, in_features), energy, size)
    if rank * (out_features + in_features) >= out_features * in_features:
        return None
    replacement = LowRankLinear(in_features, out_features, rank, module.bias is not None)
    dtype = module.weight.dtype
    with torch.no_grad():
        replacement.left.weight.copy_((left[:, :rank] * singular[:rank]).to(dtype))
        replacement.right.weight.copy_((right[:rank] / scale[None]).to(dtype))
        if module.bias is not None:
            replacement.left.bias.copy_(module.bias)
    return replacement


def compress_low_rank(
    emulator: PreTrainedModel, split: Split, calibration: Calibration, energy: float | None, size: float | None
) -> dict[str, object]:
    """Factorize the middle layers' weight matrices of `emulator` in place; returns ranks and sizes."""
    if (energy is None) == (size is None):
        raise ConfigError("lowrank needs exactly one of energy=E (e.g. 0.9) or size=F (e.g. 0.5)")
    for name, value in (("energy", energy), ("size", size)):
        if value is not None and not 0 < value <= 1:
            raise ConfigError(f"{name}={value} must be in (0, 1], e.g. 0.9")
    prefix = spec_for(emulator.config.model_type).layers
    layers = decoder_layers(emulator)
    modules = {
        f"{prefix}.{index}.{name}": module
        for index in range(split.bottom, len(layers) - split.top)
        for name, module in linear_modules(layers[index]).items()
    }
    scales = input_scales(emulator, modules, calibration.measure_batches())
    ranks: dict[str, int] = {}
    dense = factored = 0
    for path, module in modules.items():
        in_features, out_features = in_out_features(module)
        dense += in_features * out_features
        replacement = factorize(module, scales[path], energy, size)
        if replacement is None:
            factored += in_features * out_features
            continue
        parent, _, child = path.rpartition(".")
        setattr(emulator.get_submodule(parent), child, replacement)
        rank = replacement.right.out_features
        ranks[path] = rank
        factored += rank * (in_features + out_features)
    setattr(emulator.config, LOW_RANK_RECORD, ranks)
    return {
        "energy": energy,
        "size_target": size,
        "ranks": ranks,
        "weight_fraction": round(factored / dense, 5),
    }
