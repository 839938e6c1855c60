"""Gaussian noise on the cut: each example's part of what the device sends is clipped and noised, its ε accounted.

For one example the device sends its hidden states after layer k at the input's positions. They are clipped to
L2 norm C (over all the example's real positions together), get Gaussian noise of std σ·C on every coordinate of
those positions, and padding positions go as zeros; the prompt's positions go as they are (causal attention, the
prompt in front: they do not depend on the input). Two inputs of the same length give clipped cuts at most 2C
apart, so each time an example crosses is a Gaussian mechanism of noise multiplier σ/2 on it; its crossings
compose (Rényi DP, dp-accounting: `privacy.py`). Every example crosses at most once an epoch, and once more for
pruning's scoring pass. The noise is drawn from the OS, never from the job's seed, which the server knows.

Not covered: the input's length (the mask goes as it is), the labels (the gradient on the logits gives them to a
server that knows its logits), the prompt's positions at the cut, and the trained prompt returned as the result.
numpy only: both device sides (ONNX Runtime, PyTorch) release through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edge_runtime.errors import ConfigError
from edge_runtime.manifest import DPTarget
from edge_runtime.privacy import epsilon_spent, noise_multiplier_for

MECHANISM = "gaussian noise on each example's clipped cut (split learning)"


def crossings(steps: int, batch_size: int, examples: int, local_steps: int, scoring: bool) -> int:
    """How often one example can cross the cut: once in each epoch the exchanges reach (an epoch is
    ceil(examples / batch_size) steps; every `local_steps + 1`-th step is an exchange), once more if scored."""
    if examples < 1 or steps < 1:
        raise ConfigError(f"noise on the cut needs at least one example and one step (got {examples}, {steps})")
    epochs = math.ceil(steps / math.ceil(examples / batch_size))
    exchanges = math.ceil(steps / (local_steps + 1))
    return min(epochs, exchanges) + int(scoring)


@dataclass(frozen=True)
class Released:
    """What crosses for one cut [B, P + T, H], and the way back for the server's gradient at it."""

    hidden: np.ndarray
    inputs: np.ndarray  # the cut's input positions [B, T, H], padding zeroed, before clipping
    norms: np.ndarray  # their L2 norm per row [B]
    real: np.ndarray  # [B, T, 1]: 1 at real input positions
    clip: float
    prompt_tokens: int

    def backward(self, gradient: np.ndarray) -> np.ndarray:
        """The gradient at the device's cut for `gradient` at the release: through the prompt's positions as it
        is; through a clipped row's input positions as the clipping's Jacobian (transposed) maps it."""
        back = np.array(gradient, dtype=np.float32)
        at_inputs = back[:, self.prompt_tokens :] * self.real
        clipped = self.norms > self.clip
        if clipped.any():
            rows, norms = self.inputs[clipped], self.norms[clipped][:, None, None]
            along = (rows * at_inputs[clipped]).sum(axis=(1, 2), keepdims=True) / norms**2
            at_inputs[clipped] = (self.clip / norms) * (at_inputs[clipped] - along * rows)
        back[:, self.prompt_tokens :] = at_inputs
        return back


@dataclass(frozen=True)
class CutNoise:
    """The noise for one run: σ (std over C) calibrated so that `crossings` releases stay within `target`."""

    target: DPTarget
    crossings: int
    noise_multiplier: float
    epsilon: float  # what the accountant says the run spends on each example's input (≤ target.epsilon)

    @classmethod
    def make(cls, target: DPTarget, crossings: int) -> CutNoise:
        half = noise_multiplier_for(target, 1.0, crossings)  # the mechanism's σ/2: sensitivity 2C, std σ·C
        epsilon = epsilon_spent(half, 1.0, crossings, target.delta)
        while epsilon > target.epsilon:  # never over the ask, whatever the search's tolerance left
            half *= 1.001
            epsilon = epsilon_spent(half, 1.0, crossings, target.delta)
        return cls(target, crossings, 2 * half, epsilon)

    def release(
        self, hidden: np.ndarray, attention_mask: np.ndarray, prompt_tokens: int, rng: np.random.Generator
    ) -> Released:
        """What crosses for the cut `hidden` (its mask [B, P + T]): each row's input positions clipped to C and
        noised, padding zeroed, the prompt's positions unchanged."""
        real = attention_mask[:, prompt_tokens:, None].astype(np.float32)
        inputs = hidden[:, prompt_tokens:].astype(np.float32) * real
        norms = np.sqrt((inputs.astype(np.float64) ** 2).sum(axis=(1, 2)))
        scale = np.minimum(1.0, self.target.clip / np.maximum(norms, 1e-12)).astype(np.float32)
        std = np.float32(self.noise_multiplier * self.target.clip)
        noise = rng.standard_normal(inputs.shape, dtype=np.float32) * std
        sent = np.concatenate([hidden[:, :prompt_tokens], inputs * scale[:, None, None] + noise * real], axis=1)
        return Released(sent.astype(np.float32), inputs, norms, real, self.target.clip, prompt_tokens)

    def record(self) -> dict[str, object]:
        """The run report's `cut_privacy`: the ask, what was spent on each example's input, and how."""
        return {
            "mechanism": MECHANISM,
            "epsilon": round(self.epsilon, 6),
            "delta": self.target.delta,
            "target_epsilon": self.target.epsilon,
            "clip": self.target.clip,
            "noise_multiplier": round(self.noise_multiplier, 6),
            "crossings": self.crossings,
            "accountant": "rdp",
        }
