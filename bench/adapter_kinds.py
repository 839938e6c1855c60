"""Benchmark: the five settings per adapter kind on movie-review sentiment, SmolLM2-135M, default emulator.

Whole layers are `bench.five_settings`' movie-review run; LoRA, bias terms and soft prompts are trained here
through the same emulator, on the same training file less the same 600 validation reviews, keeping the checkpoint
whose plug-in scores best on them, and scored on the whole test file. Each kind runs at a few learning rates; the
one reported is the one whose kept checkpoint scores best on validation (the test scores of the others play no
part). The full model's settings (zero-shot, fine-tune) do not depend on the adapter, so they are read from that
run, which must match this one's split and steps.

Run from the repository root: `python -m bench.adapter_kinds [--kind SPEC ...] [--lr LR ...]` (one results file
per kind and rate, so they can run in parallel processes); `--report-only` rewrites the BENCHMARKS.md section
from the saved results.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from bench.bar import accuracy_bar, bar_table
from bench.markdown import machine_line, measured_or_saved, write_section
from coordinator.datasets import dataset_path, prepare_datasets
from coordinator.defaults import DEFAULT_EMULATOR, DEFAULT_KEEP
from coordinator.emulator import Split
from coordinator.evaluation.five_settings import Experiment, measure_offsite
from coordinator.evaluation.selection import carve_validation
from coordinator.models import load_model
from coordinator.tasks import make_task
from coordinator.train import TrainConfig
from edge_runtime.data import load_examples
from edge_runtime.manifest import DPTarget

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "adapter_kinds"
WHOLE_LAYERS = REPO / "bench" / "results" / "five_settings_sentiment.json"
# Candidate learning rates per kind, around the common defaults (LoRA and BitFit 1e-3; prompt tuning with AdamW
# takes far larger steps, 1e-2 to 3e-2 in peft's examples); the rate and the step are chosen on validation.
# Whole layers keep the project default (bench.five_settings).
KINDS = {"lora:r=8": (1e-3, 3e-4), "bias": (1e-3, 3e-4), "prompt:tokens=20": (3e-2, 1e-2)}
VALIDATION = 600
SETTINGS = ("full_zero_shot", "emulator_zero_shot", "full_finetune", "offsite_emulator", "offsite_plugin")


def _out(kind: str, lr: float) -> Path:
    return RESULTS / (re.sub(r"[^A-Za-z0-9]+", "_", f"{kind} lr {lr:g}").strip("_") + ".json")


def _validation_best(results: dict) -> float:
    return results["offsite_emulator"]["train"]["selection"]["best_value"]


def _whole_layers() -> dict:
    results = json.loads(WHOLE_LAYERS.read_text())
    if results["config"]["validation_examples"] != VALIDATION or results["emulator"]["spec"] != _spec():
        raise SystemExit(f"{WHOLE_LAYERS.name} is not a run of the default emulator on {VALIDATION} validation reviews")
    return results


def _spec() -> str:
    from coordinator.compression import EmulatorSpec

    return EmulatorSpec.parse(DEFAULT_EMULATOR, DEFAULT_KEEP).label()


def measure(kind: str, lr: float, steps: int, dp: DPTarget | None = None) -> dict:
    """Train `kind` through the default emulator as `coordinator evaluate --validation 600 [--dp]` would; score
    the test."""
    reference = _whole_layers()
    if reference["config"]["adapter_training"]["steps"] != steps:
        raise SystemExit(
            f"{WHOLE_LAYERS.name} trained {reference['config']['adapter_training']['steps']} steps, not {steps}"
        )
    train_examples = load_examples(dataset_path("sentiment", "train"))
    test_examples = load_examples(dataset_path("sentiment", "test"))
    rest, validation = carve_validation(train_examples, test_examples, VALIDATION)
    loaded = load_model("smollm2-135m")
    task = make_task(loaded.tokenizer, rest, test_examples)
    from coordinator.compression import EmulatorSpec

    training = TrainConfig(steps, lr)
    experiment = Experiment(
        Split(2, 2, keep=DEFAULT_KEEP), training, training, emulator=EmulatorSpec.parse(DEFAULT_EMULATOR, DEFAULT_KEEP),
        adapter=kind, dp=dp,
    )  # fmt: skip
    start = time.perf_counter()
    results = measure_offsite(loaded, task, rest, test_examples, experiment, validation=validation)
    return results | {
        "kind": kind,
        "lr": lr,
        "steps": steps,
        "seconds": round(time.perf_counter() - start, 1),
        "machine": machine_line(),
        "test_examples": len(test_examples),
        "validation_examples": len(validation),
    }


def _row(label: str, results: dict, reference: dict, lr: float) -> tuple[str, list[str]]:
    value = {key: (reference if key.startswith("full") else results)[key]["accuracy"] for key in SETTINGS}
    selection = results["offsite_emulator"]["train"]["selection"]
    trained = results["emulator"]["adapter_parameters"]
    cells = " | ".join(f"{100 * value[key]:.1f}" for key in SETTINGS)
    row = f"| {label} | {trained / 1e6:.3f} M | {lr:g} | {selection['best_step']} | {cells} |"
    return row, bar_table(accuracy_bar(**value))


def report(kinds: dict[str, list[dict]]) -> str:
    reference = _whole_layers()
    lines = [
        "## Five settings per adapter kind: movie-review sentiment, SmolLM2-135M",
        "",
        "Command: `python -m bench.adapter_kinds` (LoRA, bias and prompt; whole layers are "
        "`python -m bench.five_settings --task sentiment`, whose full zero-shot and fine-tune every row shares).",
        f"Machine: {machine_line()}.",
        "",
        f"Emulator `{_spec()}`, 2+2 adapter layers, {reference['config']['adapter_training']['steps']} steps, batch 8; "
        f"the step kept is the plug-in's best on {VALIDATION} validation reviews carved from the training file; "
        f"accuracy (%) on all {reference['config']['test_examples']:,} test reviews. LoRA: rank 8, alpha 16, on the "
        "query and value projections. Bias: every bias of the adapter layers (SmolLM2's projections have none: "
        "zero-initialized ones are added and plugged in with them). Prompt: 20 trainable vectors in front of every "
        "review, started as the embeddings of 20 sampled vocabulary entries. Each kind's learning rate is chosen on "
        "validation among the candidates listed below the table.",
        "",
        "| adapter | trainable | lr | step kept | full 0-shot | emulator 0-shot | full FT | tuned emulator | plug-in |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    bars = []
    row, bar = _row("whole layers", reference, reference, reference["config"]["adapter_training"]["lr"])
    lines.append(row)
    bars += ["", "Whole layers:", "", *bar]
    curves = ["", "The plug-in on the validation reviews every 50 steps (%), from which the rate and step are chosen:"]
    curves.append("")
    chosen = {}
    for kind, runs in kinds.items():
        chosen[kind] = max(runs, key=_validation_best)  # the first listed rate wins a tie
    for label, results in [("whole layers", [reference]), *kinds.items()]:
        for run in results:
            curve = run["offsite_emulator"]["train"]["selection"]["validation_curve"]
            lr = run.get("lr", reference["config"]["adapter_training"]["lr"])
            mark = " (chosen)" if label in chosen and run is chosen[label] else ""
            curves.append(f"- {label}, lr {lr:g}{mark}: " + ", ".join(f"{100 * value:.1f}" for _, value in curve))
    for kind, results in chosen.items():
        row, bar = _row(kind, results, reference, results["lr"])
        lines.append(row)
        bars += ["", f"`{kind}`:", "", *bar]
    reading = [
        "",
        "A kept step of 0 means no trained checkpoint beat the untrained adapter on validation, so the untrained one "
        "is what plugs in: for LoRA and bias a no-op (the row then shows zero-shot, as a user keeping the best "
        "checkpoint would get), for a prompt its starting text.",
    ]
    return "\n".join(lines + curves + reading + bars)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", action="append", choices=tuple(KINDS), help="default: every kind")
    parser.add_argument("--lr", type=float, action="append", help="default: every candidate rate of the kind")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the saved results")
    args = parser.parse_args()
    prepare_datasets()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for kind in [] if args.report_only else args.kind or KINDS:
        for lr in args.lr or KINDS[kind]:
            measured_or_saved(
                _out(kind, lr), "bench.adapter_kinds", False, lambda k=kind, r=lr: measure(k, r, args.steps)
            )
    saved = {
        kind: [json.loads(_out(kind, lr).read_text()) for lr in rates if _out(kind, lr).is_file()]
        for kind, rates in KINDS.items()
    }
    saved = {kind: runs for kind, runs in saved.items() if runs}
    write_section("adapter_kinds", report(saved))


if __name__ == "__main__":
    main()
