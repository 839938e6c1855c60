"""The bar offsite tuning must clear, stated once for every benchmark: each condition, its margin, what it needs.

Accuracy (points): the plug-in within 2 of the full fine-tune (the data owner's utility), 3 over the emulator with
its adapter (the emulator alone does not give that utility), over zero-shot (the adapter helps), and the emulator
3 under the full model zero-shot (the model owner keeps something back). Perplexity (%): the plug-in below the
full model's zero-shot and within 5 % of the full fine-tune's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Condition:
    """One line of the bar: `margin` must reach `needed` (both in `unit`)."""

    name: str
    margin: float
    needed: float
    unit: str

    @property
    def holds(self) -> bool:
        """At the edge it holds: 0.88 − 0.90 is −2.0000000000000018 points in floats, and −2 is what it needs."""
        return round(self.margin, 9) >= self.needed


def accuracy_bar(
    full_zero_shot: float,
    emulator_zero_shot: float,
    full_finetune: float,
    offsite_emulator: float,
    offsite_plugin: float,
) -> list[Condition]:
    """The bar on a classification task; accuracies as fractions, margins in points."""
    plugin = offsite_plugin
    return [
        Condition("plug-in ≥ full fine-tune − 2 points", 100 * (plugin - full_finetune), -2, "points"),
        Condition("plug-in ≥ offsite on emulator + 3 points", 100 * (plugin - offsite_emulator), 3, "points"),
        Condition("plug-in ≥ full zero-shot (the adapter helps)", 100 * (plugin - full_zero_shot), 0, "points"),
        Condition(
            "emulator zero-shot ≤ full zero-shot − 3 points", 100 * (full_zero_shot - emulator_zero_shot), 3, "points"
        ),
    ]


def perplexity_bar(full_zero_shot: float, full_finetune: float, plugin: float) -> list[Condition]:
    """The bar on language modelling; margins in percent of the reference perplexity."""
    return [
        Condition("plug-in perplexity below full zero-shot's", 100 * (1 - plugin / full_zero_shot), 0, "%"),
        Condition("plug-in perplexity within 5 % of the full fine-tune's", 100 * (1 - plugin / full_finetune), -5, "%"),
    ]


def bar_table(conditions: list[Condition]) -> list[str]:
    """Markdown rows: condition, margin (and what it needs), whether it holds."""
    lines = ["| condition | margin | holds |", "| --- | ---: | :---: |"]
    for condition in conditions:
        lines.append(
            f"| {condition.name} | {condition.margin:+.1f} {condition.unit} (needs {condition.needed:+.0f}) | "
            f"{'yes' if condition.holds else 'no'} |"
        )
    return lines
