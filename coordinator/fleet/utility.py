"""Expected utility of a device configuration: the plug-in accuracy the studies measured on validation data.

`utility_table.json` (written by `python -m bench.utility_table` from the saved results of `bench.recipe_choice`
and `bench.adapter_kinds`) holds, per model, task, emulator recipe and adapter kind, the plug-in accuracy on
validation reviews carved from the training file every 50 steps. A configuration's utility after `steps` steps is
the best the curve reached by then (a device's adapter is averaged, not chosen, but a curve's dips are noise of
one run). Where the table has no curve (another model, task or recipe), configurations are ranked by a prior
instead: the share of the middle the emulator keeps, float storage over int8, then more steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from coordinator.compression import EmulatorSpec

TABLE = Path(__file__).with_name("utility_table.json")


@dataclass(frozen=True)
class Utility:
    """How good a configuration is expected to be; compares greater for the better one."""

    accuracy: float | None  # from the table; None: not measured
    middle_kept: float  # share of the middle layers the emulator keeps
    float_storage: bool
    steps: int
    source: str

    def key(self) -> tuple[float, float, bool, int]:
        return (self.accuracy if self.accuracy is not None else -1.0, self.middle_kept, self.float_storage, self.steps)

    def describe(self) -> str:
        if self.accuracy is None:
            storage = "float" if self.float_storage else "int8"
            return f"not measured; prior: {self.middle_kept:.0%} of the middle, {storage}"
        return f"{100 * self.accuracy:.1f} % expected ({self.source})"


def recipe_key(emulator: str, keep: int) -> str:
    """An emulator spec written one way, whatever order or defaults it was given in."""
    return EmulatorSpec.parse(emulator, keep).label()


@cache
def _table(path: Path) -> dict[tuple[str, str, str, str], list[tuple[int, float]]]:
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text(encoding="utf-8"))["curves"]
    return {(r["model"], r["task"], r["emulator"], r["adapter"]): [tuple(p) for p in r["curve"]] for r in rows}


def expected_utility(
    model: str, task: str, emulator: str, keep: int, adapter: str, steps: int, middle: int, path: Path = TABLE
) -> Utility:
    """The utility of training `adapter` (a kind name) through `emulator` for `steps` steps; `middle` is the
    number of middle layers of the full model (the emulator keeps `keep` of them)."""
    spec, kind = EmulatorSpec.parse(emulator, keep), adapter.partition(":")[0]
    curve = _table(path).get((model, task, spec.label(), kind))
    accuracy = max((value for step, value in curve if step <= steps), default=None) if curve else None
    kept = min(1.0, (spec.keep or keep) / middle) if middle else 1.0
    source = f"validation curve of {spec.label()}, {kind}, best by step {steps}"
    return Utility(accuracy, kept, spec.store == "float32", steps, source if curve else "prior")
