"""Benchmark: the five Offsite-Tuning settings with the default emulator and adapter, SmolLM2-135M, on the task the
defaults were chosen on (movie reviews), a review domain they were not (Amazon products) and Wikipedia perplexity.

Run from the repository root: `python -m bench.five_settings [--task NAME ...] [--steps N]` (or
`make bench-studies`); `--report-only` rewrites the BENCHMARKS.md section from the saved results.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.bar import accuracy_bar, bar_table, perplexity_bar
from bench.markdown import coordinator_command, machine_line, write_section
from coordinator.cli import main as coordinator
from coordinator.datasets import dataset_path, prepare_datasets
from coordinator.defaults import DEFAULT_EMULATOR, DEFAULT_KEEP, DEFAULT_LR
from coordinator.evaluation.report import format_table
from edge_runtime.files import write_json_atomic

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
# Each task's validation split: examples carved from its training file that choose every checkpoint.
VALIDATION = {"sentiment": 600, "products": 300, "wikipedia": 300}
TITLES = {
    "sentiment": "movie-review sentiment (the defaults were chosen on its validation split)",
    "products": "Amazon product-review sentiment (a second file, not tuned on)",
    "wikipedia": "Wikipedia perplexity",
}


def _out(task: str) -> Path:
    return RESULTS / f"five_settings_{task}.json"


def _argv(task: str, steps: int) -> list[str]:
    return [
        "evaluate", "--model", "smollm2-135m",
        "--train", str(dataset_path(task, "train")), "--test", str(dataset_path(task, "test")),
        "--adapter-layers", "2,2", "--emulator", DEFAULT_EMULATOR, "--keep", str(DEFAULT_KEEP),
        "--steps", str(steps), "--lr", str(DEFAULT_LR),
        "--validation", str(VALIDATION[task]), "--check-every", "50", "--out", str(_out(task)),
    ]  # fmt: skip


BAR_SETTINGS = ("full_zero_shot", "emulator_zero_shot", "full_finetune", "offsite_emulator", "offsite_plugin")


def bar_lines(results: dict) -> list[str]:
    """The bar offsite tuning must clear on this task: each condition, its margin, and whether it holds."""
    metric = results["metric"]
    value = {key: results[key][metric] for key in BAR_SETTINGS}
    if metric == "accuracy":
        return bar_table(accuracy_bar(**value))
    return bar_table(perplexity_bar(value["full_zero_shot"], value["full_finetune"], value["offsite_plugin"]))


def _selection_line(results: dict) -> str:
    adapter = results["offsite_emulator"]["train"]["selection"]
    finetune = results["full_finetune"]["train"]["selection"]
    metric = results["metric"]
    scale, unit = (100, " %") if metric == "accuracy" else (1, "")
    return (
        f"Chosen on {results['config']['validation_examples']} validation examples: the adapter's checkpoint at "
        f"step {adapter['best_step']} (plug-in {scale * adapter['best_value']:.1f}{unit} on validation), the "
        f"fine-tune's at step {finetune['best_step']} ({scale * finetune['best_value']:.1f}{unit}). Emulator "
        f"`{results['emulator']['spec']}` built in {results['emulator']['build_seconds']:.0f} s."
    )


def _section(task: str, command: dict[str, str]) -> list[str]:
    results = json.loads(_out(task).read_text())
    ran = (
        f"`{command['bench']}`, which runs `{command['coordinator']}`"
        if command.get("bench")
        else (f"`{command['coordinator']}` (run directly; the same settings as `bench.five_settings`)")
    )
    return [
        f"### {TITLES[task]}",
        "",
        f"Command: {ran}.",
        "",
        "```",
        format_table(results),
        "```",
        "",
        _selection_line(results),
        "",
        *bar_lines(results),
        "",
        f"![five settings, {task}](bench/results/{_out(task).with_suffix('.png').name})",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", action="append", choices=tuple(VALIDATION), help="default: all three")
    parser.add_argument("--steps", type=int, default=400, help="adapter and fine-tune steps")
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the saved results")
    args = parser.parse_args()
    prepare_datasets()
    commands = RESULTS / "five_settings_commands.json"
    saved = json.loads(commands.read_text()) if commands.is_file() else {}
    for task in args.task or VALIDATION:
        argv = _argv(task, args.steps)
        if not args.report_only:
            if coordinator(argv) != 0:
                raise SystemExit(f"the five-setting run on {task} failed")
            saved = json.loads(commands.read_text()) if commands.is_file() else {}  # another task may have run
            saved[task] = {"bench": f"python -m bench.five_settings --task {task} --steps {args.steps}"}
            saved[task]["coordinator"] = coordinator_command(argv)
            write_json_atomic(commands, saved)
    body = [
        "## Five settings with the default emulator and adapter: SmolLM2-135M",
        "",
        f"Machine: {machine_line()}. Each task's own command is under its heading; `make bench-studies` runs all.",
        "",
        f"The defaults (`coordinator/defaults.py`): a 2+2 adapter trained through the `{DEFAULT_EMULATOR}` emulator "
        f"that keeps {DEFAULT_KEEP} of the 26 middle layers, adapter lr {DEFAULT_LR}; the full fine-tune runs as many "
        "steps at lr 2e-5. Each task's validation split is carved from its training file (never a test text); the "
        "whole test file is scored once, at the end. Each task names the emulator it was measured with.",
        "",
    ]
    for task in VALIDATION:
        if task in saved and _out(task).is_file():
            body += _section(task, saved[task])
    write_section("five_settings", "\n".join(body).rstrip())
    print("\nwrote the five_settings section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
