"""Differential privacy accounting for DP-SGD on the device (dp-accounting's RDP accountant, never by hand).

DP-SGD here: every step takes each of the device's N examples with probability q = batch_size / N (Poisson
sampling), clips each example's gradient to L2 norm C, sums them, adds Gaussian noise of std σ·C to every
coordinate and divides by the expected batch size q·N. Its privacy is that of `steps` compositions of the
Poisson-subsampled Gaussian mechanism with noise multiplier σ, accounted with Rényi DP.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.errors import ConfigError
from edge_runtime.files import write_json_atomic
from edge_runtime.manifest import DPTarget, PrivacyRecord

logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting warns for every Rényi order it drops

ACCOUNTANT = "rdp"
MECHANISM = "dp-sgd (poisson sampling, per-example clipping, gaussian noise)"
MAX_NOISE_MULTIPLIER = 1e4  # beyond this the search gives up: the request cannot be met with useful noise
ORT_REFUSAL = (
    "this bundle asks for differentially private training, which needs each example's gradient; ONNX Runtime "
    "1.19's training graphs give only the batch's sum, so DP-SGD runs on the PyTorch backend: export with "
    "--backends torch and train with --backend torch"
)


def secret_rng() -> np.random.Generator:
    """A generator seeded from the OS, never from the job: DP-SGD's analysis needs its sampling kept secret."""
    return np.random.default_rng(np.random.SeedSequence(int.from_bytes(os.urandom(16), "little")))


def poisson_draw(rng: np.random.Generator, count: int, rate: float) -> np.ndarray:
    """Indices of the `count` items each taken, independently, with probability `rate` (Poisson sampling)."""
    return np.flatnonzero(rng.random(count) < rate)


def parse_dp(text: str) -> DPTarget:
    """`epsilon=3,delta=1e-5,clip=1.0` (delta and clip optional) as a DPTarget, or ConfigError naming the part."""
    values: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in ("epsilon", "delta", "clip") or not value:
            raise ConfigError(f"--dp {text!r}: {part!r} is not epsilon=E, delta=D or clip=C")
        try:
            values[key] = float(value)
        except ValueError:
            raise ConfigError(f"--dp {text!r}: {value!r} is not a number") from None
    if "epsilon" not in values:
        raise ConfigError(f"--dp {text!r} names no epsilon; e.g. --dp epsilon=3,delta=1e-5,clip=1.0")
    try:
        return DPTarget(**values)
    except ValueError as error:
        raise ConfigError(f"--dp {text!r}: {error}") from None


def _event(noise_multiplier: float, sampling_rate: float, steps: int) -> object:  # a dp_accounting DpEvent
    from dp_accounting import dp_event

    step = dp_event.PoissonSampledDpEvent(sampling_rate, dp_event.GaussianDpEvent(noise_multiplier))
    return dp_event.SelfComposedDpEvent(step, steps)


def epsilon_spent(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> float:
    """ε of `steps` Poisson-sampled Gaussian steps (noise multiplier σ, sampling rate q) at `delta`."""
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(_event(noise_multiplier, sampling_rate, steps))
    return float(accountant.get_epsilon(delta))


def noise_multiplier_for(target: DPTarget, sampling_rate: float, steps: int) -> float:
    """The smallest σ (to 1e-4) whose `steps` steps at sampling rate q stay within `target`'s (ε, δ)."""
    from dp_accounting import mechanism_calibration
    from dp_accounting.rdp import rdp_privacy_accountant

    if not 0 < sampling_rate <= 1 or steps < 1:
        raise ConfigError(f"sampling rate {sampling_rate} must be in (0, 1] and steps {steps} at least 1")
    try:
        sigma = mechanism_calibration.calibrate_dp_mechanism(
            rdp_privacy_accountant.RdpAccountant,
            lambda value: _event(value, sampling_rate, steps),
            target.epsilon,
            target.delta,
            mechanism_calibration.LowerEndpointAndGuess(0.0, 1.0),
            tol=1e-4,
        )
    except (mechanism_calibration.NoBracketIntervalFoundError, mechanism_calibration.NonEmptyAccountantError):
        sigma = math.inf
    sigma = float(sigma) + 1e-4  # calibration returns within tol of the boundary: step to its private side
    if not sigma < MAX_NOISE_MULTIPLIER:
        raise ConfigError(
            f"ε = {target.epsilon} at δ = {target.delta} over {steps} steps at sampling rate {sampling_rate:.3g} needs "
            "more noise than any useful training has; allow a larger epsilon, fewer steps or more examples"
        )
    return sigma


@dataclass(frozen=True)
class DPPlan:
    """How one device run is privatized: its σ and q for its own example count, and the ε it spends."""

    target: DPTarget
    noise_multiplier: float
    sampling_rate: float
    steps: int
    examples: int
    epsilon: float  # what the accountant says the run spends (≤ target.epsilon)

    @classmethod
    def make(cls, target: DPTarget, batch_size: int, examples: int, steps: int) -> DPPlan:
        if examples < 1:
            raise ConfigError("differentially private training needs at least one example")
        rate = min(1.0, batch_size / examples)
        sigma = noise_multiplier_for(target, rate, steps)
        epsilon = epsilon_spent(sigma, rate, steps, target.delta)
        while epsilon > target.epsilon:  # never over the ask, whatever the search's tolerance left
            sigma *= 1.001
            epsilon = epsilon_spent(sigma, rate, steps, target.delta)
        return cls(target, sigma, rate, steps, examples, epsilon)

    @property
    def expected_batch(self) -> float:
        """q·N: what each step's clipped sum (plus noise) is divided by, whatever its sampled size."""
        return self.sampling_rate * self.examples

    @property
    def noise_std(self) -> float:
        """σ·C: the std of the Gaussian noise added to each coordinate of the clipped sum."""
        return self.noise_multiplier * self.target.clip

    def record(self) -> PrivacyRecord:
        """The result's `privacy` record of this run."""
        return PrivacyRecord(
            MECHANISM,
            round(self.epsilon, 6),
            self.target.delta,
            round(self.noise_multiplier, 6),
            self.target.clip,
            self.steps,
            round(self.sampling_rate, 8),
            ACCOUNTANT,
            self.target.epsilon,
        )


class PrivacyBudgetError(ConfigError):
    """A job would spend more of this device's lifetime privacy budget than is left."""


class PrivacyLedger:
    """A device's lifetime ε, in `path` (written atomically, so it survives restarts and never resets).

    Jobs compose by summing their ε and δ (basic composition: an upper bound whatever the jobs were). A job is
    charged before it trains, once; a job charged before a restart is not charged again when it resumes.
    """

    def __init__(self, path: Path, budget: float) -> None:
        if not (math.isfinite(budget) and budget > 0):
            raise ConfigError(f"--privacy-budget epsilon={budget} must be a positive number")
        self.path, self.budget = path, budget
        state = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        self.jobs: dict[str, dict[str, float]] = state.get("jobs", {})

    @property
    def spent(self) -> float:
        return sum(charge["epsilon"] for charge in self.jobs.values())

    def charge(self, job: str, plan: DPPlan | None) -> None:
        """Record `job`'s ε (from its plan), or PrivacyBudgetError naming the budget, what is spent and the ask."""
        if job in self.jobs:
            return
        if plan is None:
            raise PrivacyBudgetError(
                f"this device trains only with differential privacy (--privacy-budget epsilon={self.budget:g}); "
                "the job asks for non-private training: dispatch it with --dp"
            )
        if self.spent + plan.epsilon > self.budget:
            raise PrivacyBudgetError(
                f"the job would spend ε = {plan.epsilon:.3f}, but this device's lifetime budget is ε = "
                f"{self.budget:g} and {self.spent:.3f} is spent ({len(self.jobs)} jobs): "
                f"{max(0.0, self.budget - self.spent):.3f} is left"
            )
        self.jobs[job] = {"epsilon": plan.epsilon, "delta": plan.target.delta}
        write_json_atomic(self.path, {"budget": self.budget, "spent": self.spent, "jobs": self.jobs})
