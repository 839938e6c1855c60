"""Per-device configuration of a heterogeneous fleet job (FedPEAT's adaptive control, by exhaustive search).

For each device: every candidate emulator (the job's recipe, the same stored int8 with recomputation, and any the
operator adds) and adapter (for LoRA, the job's rank and smaller ones) is planned against the device's memory
budget (the memory planner), timed on its throughput (`cost.py`: measured from its last result, else its
profile), allowed as many steps as fit the round's deadline, and scored by expected utility (`utility.py`: for a
job of several devices, the aggregate of several devices' runs where measured) at the step count up to that many
where that peaks; the best feasible one is the device's. The best
single configuration every device could run (at the steps the slowest allows, chosen the same way) is recorded
beside, so `fleet status` shows what the per-device choice gained.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from coordinator.bundles.planner import model_shape
from coordinator.bundles.request import BundleRequest
from coordinator.compression import EmulatorSpec, make_emulator
from coordinator.fleet.cost import Throughput, step_flops
from coordinator.fleet.jobs import JobSpec
from coordinator.fleet.utility import Utility, expected_utility, measured_steps
from coordinator.models import LoadedModel
from device_profiles import DeviceProfile
from edge_runtime.memory import MIB, BudgetError, ModelShape, choose_micro_batch
from edge_runtime.trainer import PLAN_MARGIN

# Of a round's deadline, the share planned for training; the rest is for the download, loading and the result.
TRAINING_SHARE = 0.7


@dataclass(frozen=True)
class Candidate:
    """An emulator and adapter a device could train, before its steps and micro-batch are chosen."""

    emulator: str
    recompute: bool
    adapter_kind: str

    def request(self, base: BundleRequest, steps: int, backend: str) -> BundleRequest:
        training = replace(base.training, steps=steps)
        return replace(
            base, emulator=self.emulator, recompute=self.recompute, adapter_kind=self.adapter_kind,
            training=training, backends=(backend,),
        )  # fmt: skip

    def label(self) -> str:
        return f"{self.emulator}{' + recompute' if self.recompute else ''}, {self.adapter_kind}"


@dataclass(frozen=True)
class Choice:
    """One device's configuration, with the numbers it was chosen by."""

    device: str
    profile: str
    backend: str
    candidate: Candidate
    steps: int
    batch_size: int
    micro_batch: int
    task: str
    predicted_peak_bytes: int
    budget_bytes: int
    step_flops: float
    throughput: Throughput
    utility: Utility
    shape: ModelShape
    steps_fit: int  # the most steps its memory and deadline allowed; `steps` is where the utility peaks
    untrained: float | None  # the measured runs' value at 0 steps (the full model's own); None: not measured

    @property
    def round_seconds(self) -> float:
        return self.steps * self.throughput.step_seconds(self.step_flops)

    def request(self, base: BundleRequest) -> BundleRequest:
        return self.candidate.request(base, self.steps, self.backend)

    def describe(self) -> str:
        return (
            f"{self.candidate.label()}; {self.steps} steps{self._fewer()} of {self.batch_size} (micro-batch "
            f"{self.micro_batch}) on "
            f"{self.backend}; {self.predicted_peak_bytes / MIB:,.0f} of {self.budget_bytes / MIB:,.0f} MiB planned; "
            f"{self.round_seconds:,.0f} s at {_gflops(self.throughput.gflops)} GFLOP/s ({self.throughput.source}); "
            f"utility {self.utility.describe()}{self._warning()}"
        )

    def _warning(self) -> str:
        if self.untrained is None or self.utility.accuracy is None or self.utility.accuracy >= self.untrained:
            return ""
        return f"; below the untrained full model's {100 * self.untrained:.1f} %: more steps or a longer deadline"

    def _fewer(self) -> str:
        return f" ({self.steps_fit} fit; the measured runs peak earlier)" if self.steps < self.steps_fit else ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"round_seconds": self.round_seconds, "why": self.describe()}


def _gflops(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.3g}"


def _lora_spec(kind: Any, r: int) -> str:
    targets = f",targets={','.join(kind.targets)}" if kind.targets else ""
    return f"lora:r={r},alpha={kind.alpha:g}{targets}"


def candidates(spec: JobSpec) -> list[Candidate]:
    """The job's configurations to choose from, the job's own first (it wins ties)."""
    base = spec.bundle
    variants: list[tuple[str, bool]] = []
    for text in (base.emulator, *spec.candidate_emulators):
        recipe = EmulatorSpec.parse(text, base.keep)
        variants.append((recipe.label(), base.recompute))
        if recipe.store == "float32" and base.dp is None:  # DP-SGD keeps activations: no recomputation
            variants.append((replace(recipe, store="int8").label(), True))
    kind = base.adapter()
    kinds = [base.adapter_kind]
    if kind.name == "lora":
        ranks = spec.lora_ranks or sorted({kind.r, max(1, kind.r // 2), max(1, kind.r // 4)}, reverse=True)
        kinds = [_lora_spec(kind, r) for r in ranks]
    unique = dict.fromkeys(Candidate(emulator, recompute, k) for emulator, recompute in variants for k in kinds)
    return list(unique)


def candidate_shapes(loaded: LoadedModel, spec: JobSpec, chosen: list[Candidate]) -> dict[Candidate, ModelShape]:
    """Each candidate's sizes, from its emulator built once per recipe (cached recipes load from the cache)."""
    shapes: dict[Candidate, ModelShape] = {}
    base = spec.bundle
    for emulator_text in dict.fromkeys(c.emulator for c in chosen):
        request = replace(base, emulator=emulator_text)
        split = request.split()
        split.check(loaded.model.config.num_hidden_layers)
        emulator = make_emulator(loaded.model, split, request.recipe(), loaded.tokenizer)
        for candidate in (c for c in chosen if c.emulator == emulator_text):
            kind = replace(request, adapter_kind=candidate.adapter_kind).adapter()
            adapter = kind.attach(emulator, split.bottom, split.top)
            shapes[candidate] = model_shape(emulator, adapter, base.dp is not None, candidate.recompute)
            kind.detach(emulator)
        del emulator
    return shapes


@dataclass(frozen=True)
class Fleet:
    """What the search knows of each device: profile, the backend it trains on, its throughput."""

    profiles: dict[str, DeviceProfile]
    backends: dict[str, str]
    throughputs: dict[str, Throughput]


def _option(
    device: str, fleet: Fleet, spec: JobSpec, loaded: LoadedModel, candidate: Candidate, shape: ModelShape,
    steps_cap: int | None = None,
) -> Choice | str:  # fmt: skip
    """`candidate` on `device` with the most steps that fit, or why it does not fit."""
    base, profile, backend = spec.bundle, fleet.profiles[device], fleet.backends[device]
    training, task = base.training, base.task.kind
    try:
        micro_batch, predicted = choose_micro_batch(
            shape, training.batch_size, training.max_length, task, backend, profile.budget_bytes, PLAN_MARGIN
        )
    except BudgetError:
        return f"{candidate.label()}: does not fit {profile.budget_bytes / MIB:,.0f} MiB"
    flops = step_flops(shape, training.batch_size, training.max_length, task)
    step_seconds = fleet.throughputs[device].step_seconds(flops)
    most = training.steps if steps_cap is None else steps_cap
    if spec.deadline_s is not None:
        most = min(most, math.floor(spec.deadline_s * TRAINING_SHARE / step_seconds))
    if most < spec.fewest_steps:
        return f"{candidate.label()}: {step_seconds:.1f} s a step leaves {most} steps in the deadline"
    layers = loaded.model.config.num_hidden_layers
    bottom, top = base.adapter_layers
    recipe = (base.model, task, candidate.emulator, base.keep, candidate.adapter_kind)
    devices = len(fleet.profiles)
    counts = measured_steps(*recipe, spec.fewest_steps, most, devices)
    utility = max((expected_utility(*recipe, n, layers - bottom - top, devices) for n in counts), key=Utility.key)
    untrained = expected_utility(*recipe, 0, layers - bottom - top, devices)
    return Choice(
        device, profile.name, backend, candidate, utility.steps, training.batch_size, micro_batch, task,
        predicted.total, profile.budget_bytes, flops, fleet.throughputs[device], utility, shape, most,
        untrained.accuracy if untrained.measured_as_run else None,
    )  # fmt: skip


def _best(options: list[Choice], order: list[Candidate]) -> Choice | None:
    return max(options, key=lambda c: (c.utility.key(), -order.index(c.candidate)), default=None)


@dataclass(frozen=True)
class Configuration:
    """A job's per-device choices, the devices nothing fits (with why), and the best one-for-all alternative."""

    chosen: dict[str, Choice]
    left_out: dict[str, str]
    fixed: dict[str, Choice]  # the one configuration every device could run, per device (empty: there is none)


def configure(loaded: LoadedModel, spec: JobSpec, fleet: Fleet) -> Configuration:
    """Choose every device's configuration (see the module's docstring)."""
    order = candidates(spec)
    shapes = candidate_shapes(loaded, spec, order)
    chosen: dict[str, Choice] = {}
    left_out: dict[str, str] = {}
    options: dict[str, dict[Candidate, Choice]] = {}
    for device in sorted(fleet.profiles):
        tried = {c: _option(device, fleet, spec, loaded, c, shapes[c]) for c in order}
        options[device] = {c: o for c, o in tried.items() if isinstance(o, Choice)}
        best = _best(list(options[device].values()), order)
        if best is None:
            left_out[device] = "nothing fits: " + "; ".join(str(o) for o in tried.values())
        else:
            chosen[device] = best
    return Configuration(chosen, left_out, _fixed(loaded, spec, fleet, order, shapes, options))


def _fixed(
    loaded: LoadedModel, spec: JobSpec, fleet: Fleet, order: list[Candidate], shapes: dict[Candidate, ModelShape],
    options: dict[str, dict[Candidate, Choice]],
) -> dict[str, Choice]:  # fmt: skip
    """The candidate every device can run, at the steps the slowest of them can: the best such, per device."""
    runnable: list[dict[str, Choice]] = []
    for candidate in order:
        if not options or not all(candidate in by_device for by_device in options.values()):
            continue
        steps = min(by_device[candidate].steps_fit for by_device in options.values())
        fixed = {d: _option(d, fleet, spec, loaded, candidate, shapes[candidate], steps) for d in options}
        if all(isinstance(choice, Choice) for choice in fixed.values()):
            runnable.append(fixed)  # type: ignore[arg-type]
    return max(runnable, key=lambda fixed: next(iter(fixed.values())).utility.key(), default={})
