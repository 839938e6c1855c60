"""Benchmark: choosing the emulator recipe on validation only. Each candidate's adapter is trained through it and
plugged into the full model every `--check-every` steps; the bar's three lines are read on the validation reviews
at the plug-in's best checkpoint. The test file is never scored here (it is read only to keep its sentences out
of the validation split); `bench.five_settings` scores the recipe chosen.

Run from the repository root: `python -m bench.recipe_choice [--recipe SPEC ...] [--steps N]`; each recipe's
results land in their own file, so recipes can run in parallel processes; `--report-only` rewrites the
BENCHMARKS.md section from the saved results.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from bench.bar import Condition, accuracy_bar
from bench.markdown import machine_line, measured_or_saved, save_figure, write_section
from coordinator.adapters import plugged_in
from coordinator.adapters.layers import LayerAdapter, adapter_parameters, adapter_state
from coordinator.compression import EmulatorSpec, make_emulator
from coordinator.datasets import dataset_path, prepare_datasets
from coordinator.defaults import DEFAULT_LR
from coordinator.emulator import Split, emulator_record
from coordinator.evaluation.selection import BestCheckpoint, carve_validation
from coordinator.models import load_model
from coordinator.tasks import make_task
from coordinator.train import TrainConfig, train
from edge_runtime.data import load_examples

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "recipe_choice"
# The full fine-tune's validation curve: the movie-review run of bench.five_settings (same split and schedule).
FINETUNE = REPO / "bench" / "results" / "five_settings_sentiment.json"
# The previous default, and harmonized emulators at it and one layer smaller.
CANDIDATES = ("greedy:keep=22", "greedy:keep=22,harmonize=64", "greedy:keep=21,harmonize=64")
VALIDATION = 600  # reviews carved from the training file (seed 7), as `coordinator evaluate --validation 600` does
FINETUNE_BAR = -2.0  # points: the dotted line of the plot


def _out(spec: str) -> Path:
    return RESULTS / (re.sub(r"[^A-Za-z0-9]+", "_", spec).strip("_") + ".json")


def measure(spec_text: str, steps: int, lr: float, every: int) -> dict:
    """Train the 2+2 adapter through `spec_text`'s emulator; the plug-in's validation curve, and at its best
    checkpoint the emulator-with-adapter's validation accuracy."""
    train_examples = load_examples(dataset_path("sentiment", "train"))
    test_examples = load_examples(dataset_path("sentiment", "test"))
    rest, validation = carve_validation(train_examples, test_examples, VALIDATION)
    loaded = load_model("smollm2-135m")
    full, split = loaded.model, Split(2, 2, keep=22)
    task = make_task(loaded.tokenizer, rest, validation)
    spec = EmulatorSpec.parse(spec_text, split.keep)
    start = time.perf_counter()
    emulator = make_emulator(full, split, spec, loaded.tokenizer)
    build_seconds = time.perf_counter() - start
    split = spec.split_for(split)
    adapter = adapter_parameters(emulator, split.bottom, split.top)

    def plugin_score() -> float:
        with plugged_in(
            LayerAdapter(), full, adapter_state(emulator, split.bottom, split.top), split.bottom, split.top
        ):
            return task.score(full, validation, 16)

    emulator_zero_shot = task.score(emulator, validation, 16)
    selection = BestCheckpoint(list(adapter.values()), plugin_score, every)  # scores step 0 too
    report = train(emulator, adapter.values(), task, rest, TrainConfig(steps, lr), "offsite", on_step=selection.on_step)
    selection.finish(report.steps)
    offsite_last = task.score(emulator, validation, 16)  # the last adapter is still in place
    selection.restore()
    offsite_at_best = task.score(emulator, validation, 16)
    record = emulator_record(emulator)
    return {
        "spec": spec.label(),
        "layer_map": record.layer_map,
        "middle_fraction": record.details["footprint"]["middle_fraction"],
        "build_seconds": round(build_seconds, 1),
        "train_seconds": round(report.seconds, 1),
        "steps": steps,
        "lr": lr,
        "validation_examples": len(validation),
        "full_zero_shot": selection.curve[0][1],
        "emulator_zero_shot": emulator_zero_shot,
        "plugin_curve": selection.curve,
        "best_step": selection.best_step,
        "plugin": selection.best_value,
        "offsite_emulator": offsite_at_best,
        "offsite_emulator_last": offsite_last,
    }


def _finetune_best(steps: int) -> tuple[float, str]:
    """The full fine-tune's best validation accuracy, from a run on the same split with as many steps."""
    results = json.loads(FINETUNE.read_text())
    config = results["config"]
    if (config["validation_examples"], config["full_training"]["steps"]) != (VALIDATION, steps):
        raise SystemExit(
            f"{FINETUNE.name} holds a {config['full_training']['steps']}-step fine-tune chosen on "
            f"{config['validation_examples']} validation examples, not {steps} steps on {VALIDATION}; run "
            f"`python -m bench.five_settings --task sentiment --steps {steps}` first"
        )
    selection = results["full_finetune"]["train"]["selection"]
    return selection["best_value"], f"step {selection['best_step']} of `bench.five_settings --task sentiment`"


def bar(row: dict, finetune: float) -> list[Condition]:
    """The bar's conditions on validation, in points, at the plug-in's best checkpoint."""
    return accuracy_bar(
        row["full_zero_shot"], row["emulator_zero_shot"], finetune, row["offsite_emulator"], row["plugin"]
    )


def meets(row: dict, finetune: float) -> bool:
    return all(condition.holds for condition in bar(row, finetune))


def slack(row: dict, finetune: float) -> float:
    """Points by which the row clears its tightest line: the choice least likely to be luck of one split."""
    return min(condition.margin - condition.needed for condition in bar(row, finetune))


def _plot(rows: list[dict], finetune: float) -> Path:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 5.0))
    for row in rows:
        steps, values = zip(*row["plugin_curve"], strict=True)
        (line,) = axis.plot(steps, [100 * v for v in values], marker="o", label=f"plug-in, {row['spec']}")
        axis.scatter([row["best_step"]], [100 * row["offsite_emulator"]], marker="x", s=60, color=line.get_color(),
                     label="  its emulator with the adapter, at the plug-in's best step", zorder=3)  # fmt: skip
    axis.axhline(100 * finetune, color="black", linestyle="--", label="full fine-tune (best)")
    axis.axhline(100 * finetune + FINETUNE_BAR, color="grey", linestyle=":", label="fine-tune − 2 points")
    axis.set_xlabel("adapter step")
    axis.set_ylabel("validation accuracy, %")
    axis.set_title("Plug-in accuracy on the validation reviews while the adapter trains")
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    figure.tight_layout()
    path = RESULTS.parent / "recipe_choice.png"
    save_figure(figure, path)
    return path


def report(rows: list[dict]) -> None:
    steps = {row["steps"] for row in rows}
    if len(steps) != 1:
        raise SystemExit(f"the saved recipes trained for different step counts {sorted(steps)}; compare like with like")
    finetune, source = _finetune_best(steps.pop())
    lines = [
        "## Choosing the emulator recipe on validation: SmolLM2-135M, movie reviews",
        "",
        f"Machine: {machine_line()}. Command: `python -m bench.recipe_choice --recipe SPEC` for each recipe "
        "(commands saved in `bench/results/recipe_choice/`). 2+2 adapter; plug-in scored on the "
        f"{VALIDATION} validation reviews carved from the training file every 50 steps; offsite on emulator is "
        "the emulator with the adapter of the plug-in's best checkpoint. No test sentence is scored. Full "
        f"fine-tune on validation: {100 * finetune:.1f} % ({source}).",
        "",
        "| recipe | middle | build s | emulator 0-shot | best plug-in (step) | offsite on emulator | plug-in − "
        "fine-tune | plug-in − offsite | plug-in − zero-shot | full − emulator | meets the bar |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for row in rows:
        shown = " | ".join(f"{condition.margin:+.1f}" for condition in bar(row, finetune))
        lines.append(
            f"| `{row['spec']}` | {100 * row['middle_fraction']:.0f} % | {row['build_seconds']:.0f} | "
            f"{100 * row['emulator_zero_shot']:.1f} | {100 * row['plugin']:.1f} ({row['best_step']}) | "
            f"{100 * row['offsite_emulator']:.1f} | {shown} | {'yes' if meets(row, finetune) else 'no'} |"
        )
    chosen = [row for row in rows if meets(row, finetune)]
    conditions = "; ".join(condition.name for condition in bar(rows[0], finetune))
    lines += ["", f"Full zero-shot on validation: {100 * rows[0]['full_zero_shot']:.1f} %. The bar: {conditions}."]
    if chosen:
        best = max(chosen, key=lambda row: slack(row, finetune))
        others = ", ".join(f"`{row['spec']}` {slack(row, finetune):.1f}" for row in chosen if row is not best)
        lines.append(
            f"Chosen: `{best['spec']}`, the recipe that clears the bar's tightest line by the most on validation "
            f"({slack(best, finetune):.1f} points" + (f"; {others}" if others else "") + ")."
        )
    else:
        lines.append("No candidate meets the bar on validation.")
    lines += ["", f"![plug-in on validation](bench/results/{_plot(rows, finetune).name})"]
    write_section("recipe_choice", "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", action="append", help=f"emulator spec (default: {', '.join(CANDIDATES)})")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--check-every", type=int, default=50)
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the saved results")
    args = parser.parse_args()
    if not args.report_only:
        prepare_datasets()
        for spec in args.recipe or CANDIDATES:
            measured_or_saved(
                _out(spec),
                "bench.recipe_choice",
                False,
                lambda s=spec: measure(s, args.steps, args.lr, args.check_every),
            )
    rows = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("*.json"))]
    report(rows)
    print("\nwrote the recipe_choice section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
