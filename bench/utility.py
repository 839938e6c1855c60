"""Benchmark: does offsite tuning pay? Emulator recipes at two sizes and a mild one, each with its adapter's best
checkpoint chosen on a validation split, against the full fine-tune, SmolLM2-135M, movie-review sentiment.

Run from the repository root: `python -m bench.utility [--steps N]` (or `make bench-studies`);
`--report-only` rewrites the BENCHMARKS.md section from the saved results.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.bar import accuracy_bar
from bench.markdown import coordinator_command, machine_line, measuring_command, write_section
from coordinator.cli import main as coordinator
from coordinator.datasets import dataset_path, prepare_datasets
from coordinator.evaluation.tradeoff import format_tradeoff, plot_tradeoff
from edge_runtime.files import write_json_atomic

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results" / "utility_sentiment.json"
# The 2+2 split leaves 26 middle layers: keep 13 is one half of the middle, keep 9 about one third, keep 22 mild.
RECIPES = ("greedy:keep=9", "uniform:keep=9", "greedy:keep=13", "uniform:keep=13", "greedy:keep=22")
VALIDATION = 600  # reviews carved from the training file; checkpoints are chosen on them, never on the test file


def _argv(steps: int, lr: float) -> list[str]:
    argv = [
        "evaluate", "--model", "smollm2-135m",
        "--train", str(dataset_path("sentiment", "train")), "--test", str(dataset_path("sentiment", "test")),
        "--adapter-layers", "2,2", "--steps", str(steps), "--lr", str(lr),
        "--validation", str(VALIDATION), "--check-every", str(max(1, steps // 4)), "--finetune",
    ]  # fmt: skip
    for recipe in RECIPES:
        argv += ["--emulator", recipe]
    return [*argv, "--out", str(OUT)]


def _verdicts(results: dict) -> list[str]:
    """For each recipe, the bar's conditions in points: plug-in vs fine-tune, vs offsite, emulator vs full."""
    full, finetuned = results["full_zero_shot"]["accuracy"], results["full_finetune"]["accuracy"]
    lines = [
        "| recipe | gradient cosine, bottom / top | plug-in − fine-tune | plug-in − offsite on emulator | "
        "emulator − full zero-shot | best step | meets the bar |",
        "| --- | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for row in results["recipes"]:
        plugin, offsite = row["offsite_plugin"]["accuracy"], row["offsite_emulator"]["accuracy"]
        emulator = row["emulator_zero_shot"]["accuracy"]
        bar = accuracy_bar(full, emulator, finetuned, offsite, plugin)
        step = row["offsite_emulator"]["train"]["selection"]["best_step"]
        cosine = " / ".join(f"{row['alignment'][group]:.2f}" for group in ("bottom", "top"))
        lines.append(
            f"| `{row['emulator']['spec']}` | {cosine} | {bar[0].margin:+.1f} | {bar[1].margin:+.1f} | "
            f"{-bar[3].margin:+.1f} | {step} | {'yes' if all(c.holds for c in bar) else 'no'} |"
        )
    return lines


def _reading(results: dict) -> list[str]:
    """What the numbers say, computed from them: which adapters the validation split refused, and why."""
    zero_shot, finetuned = results["full_zero_shot"]["accuracy"], results["full_finetune"]["accuracy"]
    refused = [row for row in results["recipes"] if row["offsite_emulator"]["train"]["selection"]["best_step"] == 0]
    kept = [row for row in results["recipes"] if row not in refused]
    lines = []
    if refused:
        curves = [row["offsite_emulator"]["train"]["selection"]["validation_curve"] for row in refused]
        last, untouched = [curve[-1][1] for curve in curves], curves[0][0][1]
        names = ", ".join("`" + row["emulator"]["spec"] + "`" for row in refused)
        worse = " Without the validation split they would have shipped and made the model worse." * (
            max(last) < untouched
        )
        lines.append(
            f"- {len(refused)} of {len(results['recipes'])} recipes ({names}) never beat the untrained adapter on "
            f"validation: their last adapters plug in at {100 * min(last):.1f}–{100 * max(last):.1f} % on it "
            f"(untouched model: {100 * untouched:.1f} %), so the run keeps the untrained adapter and the plug-in "
            f"equals zero-shot.{worse}"
        )
    for row in kept:
        plugin = row["offsite_plugin"]["accuracy"]
        lines.append(
            f"- `{row['emulator']['spec']}` ({100 * row['emulator']['middle_fraction']:.0f} % of the middle): its "
            f"adapter helps, plug-in {100 * plugin:.1f} %, {100 * (plugin - zero_shot):+.1f} points over zero-shot "
            f"and {100 * (plugin - finetuned):+.1f} against the full fine-tune."
        )
    aligned = sorted(results["recipes"], key=lambda row: -row["alignment"].get("bottom", 0))
    lines.append(
        "- The gradient cosine says why: through the emulators at one half and one third of the middle the bottom "
        "adapter's gradient is orthogonal to the one the full model would give (cosine "
        f"{min(row['alignment']['bottom'] for row in aligned[1:]):+.2f} to "
        f"{max(row['alignment']['bottom'] for row in aligned[1:]):+.2f}), so what the bottom layers learn repairs "
        f"the emulator and does nothing, or harm, to the full model; at `{aligned[0]['emulator']['spec']}` it is "
        f"{aligned[0]['alignment']['bottom']:.2f}."
    )
    top = {row["emulator"]["spec"]: row["alignment"]["top"] for row in results["recipes"]}
    uniform_of = {spec: "uniform:" + spec.partition(":")[2] for spec in top if spec.startswith("greedy:")}
    pairs = [(top[spec], top[twin]) for spec, twin in uniform_of.items() if twin in top]
    if pairs and all(greedy > uniform for greedy, uniform in pairs):
        lines.append(
            "- Greedy selection keeps the top adapter's input closer to the full model's than uniform drop at the "
            "same size (higher top cosine), but not the bottom adapter's gradient, which must pass back through "
            "the whole emulator."
        )
    return lines


def _add_alignment(results: dict) -> None:
    """Per recipe, the cosine between the adapter's gradient through the emulator and through the full model
    (4 batches of training reviews, untrained adapter): why one emulator's adapter transfers and another's not."""
    from coordinator.compression import EmulatorSpec, make_emulator
    from coordinator.emulator import Split
    from coordinator.evaluation.alignment import gradient_alignment
    from coordinator.evaluation.selection import carve_validation
    from coordinator.models import load_model
    from coordinator.tasks import make_task
    from edge_runtime.data import load_examples

    loaded = load_model("smollm2-135m")
    train = load_examples(dataset_path("sentiment", "train"))
    train, _ = carve_validation(train, load_examples(dataset_path("sentiment", "test")), VALIDATION)
    task = make_task(loaded.tokenizer, train, train)
    bottom, top = results["config"]["adapter_layers"]
    for row in results["recipes"]:
        spec = EmulatorSpec.parse(row["emulator"]["spec"])
        split = spec.split_for(Split(bottom, top, keep=spec.keep))
        emulator = make_emulator(loaded.model, split, spec, loaded.tokenizer)
        row["alignment"] = gradient_alignment(loaded.model, emulator, split, task, train)
        print(f"{spec.label()}: gradient alignment {row['alignment']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200, help="adapter and fine-tune steps")
    parser.add_argument("--lr", type=float, default=1e-4, help="adapter learning rate")
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the saved results")
    args = parser.parse_args()
    prepare_datasets()
    argv = _argv(args.steps, args.lr)
    if not args.report_only and coordinator(argv) != 0:
        raise SystemExit("the utility study failed")
    results = json.loads(OUT.read_text())
    if any("alignment" not in row for row in results["recipes"]):
        _add_alignment(results)
        write_json_atomic(OUT, results)
    plot_tradeoff(results, OUT.with_suffix(".png"))
    body = [
        "## Does offsite tuning pay? Emulator recipes against the full fine-tune, SmolLM2-135M",
        "",
        f"Command: `{measuring_command('bench.utility')}`, which runs `{coordinator_command(argv)}`. "
        f"Machine: {machine_line()}.",
        "",
        f"{VALIDATION} reviews carved from the training file (none in the test file) choose every checkpoint: the "
        "adapter's by its plug-in accuracy, the fine-tune's by its own, checked before training and four times "
        "during it; the test file (all of it) is scored once, at the end. `greedy` removes one middle layer at a "
        "time, the one whose removal moves the next-token predictions on public Wikipedia text least; `uniform` "
        "keeps evenly spaced layers. Build seconds include greedy's removal path, which is cached: the first "
        "greedy build pays for the others. `offsite on emu` scores the emulator with the adapter kept, so where "
        "the untrained adapter is kept it equals the emulator's zero-shot.",
        "",
        "```",
        format_tradeoff(results),
        "```",
        "",
        *_verdicts(results),
        "",
        *_reading(results),
        "",
        f"![utility](bench/results/{OUT.with_suffix('.png').name})",
    ]
    write_section("utility", "\n".join(body))
    print("\nwrote the utility section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
