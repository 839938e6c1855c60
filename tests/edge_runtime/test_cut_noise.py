"""Noise on the cut: clipping and noise where they belong, ε within the ask, the way back is the clip's Jacobian."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edge_runtime.cut_noise import CutNoise, crossings
from edge_runtime.manifest import DPTarget

PROMPT_TOKENS = 3


def _cut(rows: int = 4, inputs: int = 6, width: int = 16, scale: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    mask = np.ones((rows, PROMPT_TOKENS + inputs), dtype=np.int64)
    mask[0, PROMPT_TOKENS + 2 :] = 0  # row 0: two real input positions, then padding
    return (rng.standard_normal((rows, PROMPT_TOKENS + inputs, width)) * scale).astype(np.float32), mask


def _clipping_only(clip: float) -> CutNoise:
    return CutNoise(DPTarget(1.0, clip=clip), 1, noise_multiplier=0.0, epsilon=math.inf)


def test_crossings_count_epochs_exchanges_and_the_scoring_pass():
    assert crossings(steps=10, batch_size=8, examples=40, local_steps=0, scoring=False) == 2  # 5 steps an epoch
    assert crossings(steps=10, batch_size=8, examples=40, local_steps=0, scoring=True) == 3
    assert crossings(steps=11, batch_size=8, examples=40, local_steps=0, scoring=False) == 3
    assert crossings(steps=3, batch_size=8, examples=1000, local_steps=0, scoring=False) == 1
    assert crossings(steps=10, batch_size=8, examples=8, local_steps=4, scoring=False) == 2  # 2 exchanges


def test_the_noise_spends_at_most_the_ask_and_grows_with_crossings():
    target = DPTarget(epsilon=4.0, delta=1e-5, clip=1.0)
    once, often = CutNoise.make(target, 1), CutNoise.make(target, 20)
    for noise in (once, often):
        assert 0.95 * target.epsilon <= noise.epsilon <= target.epsilon
    assert often.noise_multiplier > 3 * once.noise_multiplier


def test_without_noise_the_release_clips_each_examples_input_positions_and_zeroes_padding():
    (hidden, mask), clip = _cut(), 5.0
    hidden[1] *= 0.001  # row 1's input is already inside the clip: it goes unchanged
    sent = _clipping_only(clip).release(hidden, mask, PROMPT_TOKENS, np.random.default_rng()).hidden
    np.testing.assert_array_equal(sent[:, :PROMPT_TOKENS], hidden[:, :PROMPT_TOKENS])
    assert np.all(sent[0, PROMPT_TOKENS + 2 :] == 0)  # row 0's padding
    norms = np.linalg.norm(sent[:, PROMPT_TOKENS:].reshape(4, -1), axis=1)
    np.testing.assert_allclose(norms[[0, 2, 3]], clip, rtol=1e-5)
    np.testing.assert_allclose(sent[1], hidden[1], rtol=1e-6)


def test_the_noise_has_std_sigma_times_clip_on_real_input_positions_only():
    hidden, mask = np.zeros((64, PROMPT_TOKENS + 50, 32), np.float32), np.ones((64, PROMPT_TOKENS + 50), np.int64)
    mask[:, 40:] = 0
    noise = CutNoise(DPTarget(1.0, clip=0.5), 1, noise_multiplier=2.0, epsilon=1.0)
    sent = noise.release(hidden, mask, PROMPT_TOKENS, np.random.default_rng(0)).hidden
    assert float(sent[:, PROMPT_TOKENS:40].std()) == pytest.approx(1.0, rel=0.02)  # σ·C = 2 × 0.5
    assert np.all(sent[:, :PROMPT_TOKENS] == 0) and np.all(sent[:, 40:] == 0)


@pytest.mark.parametrize("clip", [1e6, 5.0], ids=["inside the clip", "clipped"])
def test_the_way_back_is_the_clippings_jacobian_as_autograd_computes_it(clip):
    hidden, mask = _cut()
    released = _clipping_only(clip).release(hidden, mask, PROMPT_TOKENS, np.random.default_rng())
    upstream = np.random.default_rng(1).standard_normal(hidden.shape).astype(np.float32)

    states = torch.from_numpy(hidden.astype(np.float64)).requires_grad_(True)  # the release, in torch
    real = torch.from_numpy(mask[:, PROMPT_TOKENS:, None]).double()
    inputs = states[:, PROMPT_TOKENS:] * real
    scale = (clip / inputs.flatten(1).norm(dim=1)).clamp(max=1.0)[:, None, None]
    torch.cat([states[:, :PROMPT_TOKENS], inputs * scale], dim=1).backward(torch.from_numpy(upstream).double())
    np.testing.assert_allclose(released.backward(upstream), states.grad.numpy(), rtol=1e-4, atol=1e-6)
