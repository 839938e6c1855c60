"""LoRA results of different ranks: dense FedAvg, factored again exactly, cut per device to its best approximation."""

from __future__ import annotations

import pytest
import torch

from coordinator.adapters.layers import weighted_mean
from coordinator.adapters.lora_ranks import RankedLoRA, combine_ranks, factored
from coordinator.errors import DataError

TARGETS = ("model.layers.0.self_attn.q_proj", "model.layers.3.self_attn.v_proj")


def _lora(r: int, alpha: float, seed: int) -> RankedLoRA:
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for target in TARGETS:
        weights[f"{target}.lora_A"] = torch.randn(r, 24, generator=generator)
        weights[f"{target}.lora_B"] = torch.randn(20, r, generator=generator)
    return RankedLoRA(weights, r, alpha)


def _product(lora: RankedLoRA, target: str) -> torch.Tensor:
    a, b = lora.weights[f"{target}.lora_A"].double(), lora.weights[f"{target}.lora_B"].double()
    return lora.alpha / lora.r * b @ a


def test_results_of_three_ranks_average_to_the_weighted_mean_of_their_updates_exactly():
    results = [_lora(2, 4.0, 1), _lora(4, 16.0, 2), _lora(8, 16.0, 3)]
    shares = [0.5, 0.3, 0.2]
    aggregate = combine_ranks(results, [None, None, None], shares, weighted_mean)
    assert aggregate.r == 14 and aggregate.weights[f"{TARGETS[0]}.lora_A"].shape == (14, 24)
    for target in TARGETS:
        expected = sum(share * _product(result, target) for result, share in zip(results, shares, strict=True))
        torch.testing.assert_close(_product(aggregate, target), expected, rtol=1e-5, atol=1e-5)


def test_updates_are_taken_from_each_devices_own_start_and_added_to_the_previous_aggregate():
    previous = _lora(6, 6.0, 10)
    starts = [factored(previous.dense(), 2, 4.0), factored(previous.dense(), 4, 8.0)]
    results = [_lora(2, 4.0, 11), _lora(4, 8.0, 12)]
    aggregate = combine_ranks(results, starts, [0.25, 0.75], weighted_mean, previous)
    assert aggregate.r == 6 + 2 * 2 + 2 * 4  # the previous aggregate's rank and each update's (twice its own)
    for target in TARGETS:
        updates = [_product(r, target) - _product(s, target) for r, s in zip(results, starts, strict=True)]
        expected = _product(previous, target) + 0.25 * updates[0] + 0.75 * updates[1]
        torch.testing.assert_close(_product(aggregate, target), expected, rtol=1e-5, atol=1e-5)


def test_a_cut_is_the_best_approximation_of_its_rank_and_pads_beyond_the_width():
    whole = _lora(6, 6.0, 4).dense()
    cut = factored(whole, 2, 16.0)
    for target in TARGETS:
        u, s, vh = torch.linalg.svd(whole[target])
        torch.testing.assert_close(_product(cut, target), (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-5, atol=1e-5)
    wide = factored(whole, 30, 30.0)  # wider than the 20 x 24 updates: exact, the extra rank is zeros
    assert wide.weights[f"{TARGETS[0]}.lora_B"].shape == (20, 30)
    torch.testing.assert_close(_product(wide, TARGETS[1]), whole[TARGETS[1]], rtol=1e-5, atol=1e-5)


def test_adapters_on_different_projections_are_refused():
    other = RankedLoRA({k.replace("q_proj", "k_proj"): v for k, v in _lora(2, 2.0, 5).weights.items()}, 2, 2.0)
    with pytest.raises(DataError, match="different projections"):
        combine_ranks([_lora(2, 2.0, 6), other], [None, None], [0.5, 0.5], weighted_mean)
