"""Expected utility of a device configuration: the plug-in accuracy the studies measured on validation data.

`utility_table.json` (written by `python -m bench.utility_table`) holds, per model, task, emulator recipe and
adapter kind, plug-in accuracies on validation reviews carved from the training file, of two kinds:

- "runs" (`bench.steps_curve`): the last adapter of a complete run of N steps, its learning-rate schedule spread
  over those N: what a device given N steps returns. Between measured N the value is interpolated; past the
  last one it stays flat. A configuration measured this way ranks above any measured only the other way.
- "aggregates" (`bench.steps_curve --devices K`): the FedAvg aggregate of K devices' complete N-step runs on
  their own shards: what one round of a job returns, from K runs per seed (short runs through a lossy emulator
  vary by tens of points; the aggregate scores about its devices' mean, with less spread). A job of several
  devices scores a device's steps by this curve where it is measured (whatever the job's K; each device's steps
  as if all ran that many), by "runs" where not.
- "checkpoints" (`bench.recipe_choice`, `bench.adapter_kinds`, `bench.utility`): every 50 steps of one longer
  run, mid-schedule. A configuration's utility after `steps` steps is the best the curve reached by then.

Where the table has neither (another model, task or recipe), configurations are ranked by a prior instead: the
share of the middle the emulator keeps, float storage over int8, then more steps.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from coordinator.compression import EmulatorSpec

TABLE = Path(__file__).with_name("utility_table.json")
RUNS, AGGREGATES, CHECKPOINTS = "runs", "aggregates", "checkpoints"
Curve = list[tuple[int, float]]


@dataclass(frozen=True)
class Utility:
    """How good a configuration is expected to be; compares greater for the better one."""

    accuracy: float | None  # from the table; None: not measured
    measured_as_run: bool  # from complete runs of `steps` steps (or their aggregate), as a device trains
    middle_kept: float  # share of the middle layers the emulator keeps
    float_storage: bool
    steps: int
    source: str

    def key(self) -> tuple[bool, float, float, bool, int]:
        accuracy = self.accuracy if self.accuracy is not None else -1.0
        return (self.measured_as_run, accuracy, self.middle_kept, self.float_storage, self.steps)

    def describe(self) -> str:
        if self.accuracy is None:
            storage = "float" if self.float_storage else "int8"
            return f"not measured; prior: {self.middle_kept:.0%} of the middle, {storage}"
        return f"{100 * self.accuracy:.1f} % expected ({self.source})"


def recipe_key(emulator: str, keep: int) -> str:
    """An emulator spec written one way, whatever order or defaults it was given in."""
    return EmulatorSpec.parse(emulator, keep).label()


@cache
def _table(path: Path) -> dict[tuple[str, str, str, str, str], Curve]:
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text(encoding="utf-8"))["curves"]
    return {
        (r["model"], r["task"], r["emulator"], r["adapter"], r.get("kind", CHECKPOINTS)): [tuple(p) for p in r["curve"]]
        for r in rows
    }


def _curve(model: str, task: str, emulator: str, keep: int, adapter: str, kind: str, path: Path | None) -> Curve | None:
    return _table(path or TABLE).get((model, task, recipe_key(emulator, keep), adapter.partition(":")[0], kind))


def interpolate(curve: Curve, steps: int) -> float:
    """The curve's value at `steps`: linear between its points, flat past its last."""
    points = sorted(curve)
    at = bisect_right([step for step, _ in points], steps)
    if at == len(points):
        return points[-1][1]
    if at == 0:
        return points[0][1]
    (left, low), (right, high) = points[at - 1], points[at]
    return low + (high - low) * (steps - left) / (right - left)


def _runs(
    model: str, task: str, emulator: str, keep: int, adapter: str, devices: int, path: Path | None
) -> tuple[str, Curve] | None:
    """The complete-runs curve a job of `devices` devices is scored by, and its kind; None: not measured."""
    for kind in (AGGREGATES, RUNS) if devices > 1 else (RUNS,):
        curve = _curve(model, task, emulator, keep, adapter, kind, path)
        if curve:
            return kind, curve
    return None


def measured_steps(
    model: str, task: str, emulator: str, keep: int, adapter: str, fewest: int, most: int, devices: int = 1,
    path: Path | None = None,
) -> list[int]:  # fmt: skip
    """The step counts worth trying for a device that may train between `fewest` and `most` steps: every count
    the runs curve measured in that range, and `most` (the configuration's utility may peak before the most
    steps the deadline allows, e.g. in the early dip where steps still fit the adapter to the emulator)."""
    _, curve = _runs(model, task, emulator, keep, adapter, devices, path) or (RUNS, [])
    return sorted({step for step, _ in curve if fewest <= step <= most} | {most})


def expected_utility(
    model: str, task: str, emulator: str, keep: int, adapter: str, steps: int, middle: int, devices: int = 1,
    path: Path | None = None,
) -> Utility:  # fmt: skip
    """The utility of training `adapter` (a kind name) through `emulator` for `steps` steps in a job of `devices`
    devices; `middle` is the number of middle layers of the full model (the emulator keeps `keep` of them)."""
    spec, kind = EmulatorSpec.parse(emulator, keep), adapter.partition(":")[0]
    kept = min(1.0, (spec.keep or keep) / middle) if middle else 1.0
    runs = _runs(model, task, emulator, keep, adapter, devices, path)
    if runs:
        measured, curve = runs
        what = "aggregates of devices' runs" if measured == AGGREGATES else "runs"
        source = f"{what} of {spec.label()}, {kind}, at {steps} steps"
        return Utility(interpolate(curve, steps), True, kept, spec.store == "float32", steps, source)
    checkpoints = _curve(model, task, emulator, keep, adapter, CHECKPOINTS, path)
    if checkpoints:
        accuracy = max((value for step, value in checkpoints if step <= steps), default=None)
        source = f"validation curve of {spec.label()}, {kind}, best by step {steps}"
        return Utility(accuracy, False, kept, spec.store == "float32", steps, source)
    return Utility(None, False, kept, spec.store == "float32", steps, "prior")
