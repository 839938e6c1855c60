"""Benchmark: the five Offsite-Tuning settings for SmolLM2 on the held-out movie-review test split.

Run from the repository root: `python -m bench.five_settings [--steps N]` (or `make bench-studies`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from bench.markdown import machine_line, write_section
from coordinator.cli import main as coordinator
from coordinator.datasets import dataset_path, prepare_datasets
from coordinator.models import cache_root
from coordinator.report import format_table

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results" / "five_settings.json"


def _ratios(results: dict) -> list[str]:
    metric = results["metric"]
    value = {
        key: results[key][metric] for key in ("full_zero_shot", "emulator_zero_shot", "full_finetune", "offsite_plugin")
    }
    offsite, full = results["offsite_emulator"]["train"], results["full_finetune"]["train"]
    per_step = (full["seconds"] / full["steps"]) / (offsite["seconds"] / offsite["steps"])
    return [
        f"- plug-in − full zero-shot: {100 * (value['offsite_plugin'] - value['full_zero_shot']):+.1f} points",
        f"- plug-in − emulator zero-shot (the model owner's privacy margin): "
        f"{100 * (value['offsite_plugin'] - value['emulator_zero_shot']):+.1f} points",
        f"- plug-in − full fine-tune (utility lost by offsite tuning): "
        f"{100 * (value['offsite_plugin'] - value['full_finetune']):+.1f} points",
        f"- training step time, full fine-tune ÷ offsite adapter (same batch, same run): {per_step:.1f}×",
        f"- trainable parameters, full ÷ adapter: "
        f"{full['trainable_parameters'] / offsite['trainable_parameters']:.0f}×",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--keep", type=int, default=8)
    parser.add_argument("--adapter-layers", default="2,2")
    args = parser.parse_args()
    prepare_datasets()
    argv = [
        "evaluate", "--model", "smollm2-135m",
        "--train", str(dataset_path("sentiment", "train")), "--test", str(dataset_path("sentiment", "test")),
        "--adapter-layers", args.adapter_layers, "--keep", str(args.keep), "--steps", str(args.steps),
        "--out", str(OUT),
    ]  # fmt: skip
    if coordinator(argv) != 0:
        raise SystemExit("the five-setting run failed")
    results = json.loads(OUT.read_text())
    command = " ".join(["python -m bench.five_settings", *map(shlex.quote, sys.argv[1:])])
    shown = [arg.replace(f"{REPO}/", "").replace(str(cache_root()), "$OFFSITE_EDGE_CACHE") for arg in argv]
    body = "\n".join([
        "## Five settings: SmolLM2-135M, movie-review sentiment",
        "",
        f"Command: `{command}`, which runs `coordinator {' '.join(shown)}`.",
        "",
        f"Machine: {machine_line()}.",
        "",
        "```",
        format_table(results),
        "```",
        "",
        *_ratios(results),
        "",
        f"![five settings](bench/results/{OUT.with_suffix('.png').name})",
        "",
        f"Adapter training: {results['config']['adapter_training']}; "
        f"full fine-tune lr {results['config']['full_training']['lr']}.",
    ])  # fmt: skip
    write_section("five_settings", body)
    print("\nwrote the five_settings section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
