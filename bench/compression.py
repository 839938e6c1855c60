"""Benchmark: the privacy–utility table of every emulator recipe against uniform drop, SmolLM2-135M, on
movie-review sentiment (accuracy) and Wikipedia (perplexity).

Run from the repository root: `python -m bench.compression [--steps N] [--lm-steps N]` (or `make bench`).
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
from coordinator.tradeoff import format_tradeoff

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BASELINE = "uniform:keep=4"  # every recipe below but the last two has the same middle size: 4 of 26 layers
LARGER = "uniform:keep=8"
RECIPES = (
    BASELINE,
    "importance:keep=4",
    "luc:keep=8,size=0.5",
    "lowrank:keep=8,size=0.5",
    "uniform:keep=4,distill=40",
    LARGER,
    "luc:keep=8,size=0.25",
)


def _run(task: str, steps: int, limit_test: int, extra: list[str]) -> tuple[dict, list[str]]:
    out = RESULTS / f"compression_{task}.json"
    argv = [
        "evaluate", "--model", "smollm2-135m",
        "--train", str(dataset_path(task, "train")), "--test", str(dataset_path(task, "test")),
        "--adapter-layers", "2,2", "--steps", str(steps), "--limit-test", str(limit_test), *extra,
    ]  # fmt: skip
    for recipe in RECIPES:
        argv += ["--emulator", recipe]
    argv += ["--out", str(out)]
    if coordinator(argv) != 0:
        raise SystemExit(f"the {task} comparison failed")
    return json.loads(out.read_text()), argv


def _findings(results: dict) -> list[str]:
    metric = results["metric"]
    better = (lambda a, b: a > b) if metric == "accuracy" else (lambda a, b: a < b)
    unit = (lambda v: f"{100 * v:.1f} %") if metric == "accuracy" else (lambda v: f"{v:.2f}")
    rows = {row["emulator"]["spec"]: row for row in results["recipes"]}
    plugin = {spec: row["offsite_plugin"][metric] for spec, row in rows.items()}
    size = {spec: row["emulator"]["middle_fraction"] for spec, row in rows.items()}
    same = [s for s in rows if s != BASELINE and abs(size[s] - size[BASELINE]) <= 0.02 * size[BASELINE] + 1e-9]
    best = min(same, key=lambda s: plugin[s]) if metric != "accuracy" else max(same, key=lambda s: plugin[s])
    lines = [
        f"- At the size of `{BASELINE}` ({100 * size[BASELINE]:.1f} % of the middle), the best plug-in is "
        f"`{best}`: {unit(plugin[best])} vs {unit(plugin[BASELINE])} "
        f"({'beats' if better(plugin[best], plugin[BASELINE]) else 'does not beat'} uniform drop)."
    ]
    reaching = [s for s in rows if s != LARGER and not better(plugin[LARGER], plugin[s])]
    if reaching:
        smallest = min(reaching, key=lambda s: size[s])
        lines.append(
            f"- `{LARGER}`'s plug-in ({unit(plugin[LARGER])}) is matched by `{smallest}` "
            f"({unit(plugin[smallest])}) with a middle {size[LARGER] / size[smallest]:.1f}× smaller."
        )
    else:
        lines.append(f"- No smaller recipe matched `{LARGER}`'s plug-in ({unit(plugin[LARGER])}).")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=80, help="adapter steps on sentiment")
    parser.add_argument("--lm-steps", type=int, default=40, help="adapter steps on Wikipedia")
    parser.add_argument("--limit-test", type=int, default=400, help="sentiment test examples")
    parser.add_argument("--lm-limit-test", type=int, default=60, help="Wikipedia test paragraphs")
    args = parser.parse_args()
    prepare_datasets()
    command = " ".join(["python -m bench.compression", *map(shlex.quote, sys.argv[1:])])
    body = [
        "## Emulator compression: privacy–utility, SmolLM2-135M",
        "",
        f"Command: `{command}`. Machine: {machine_line()}.",
        "",
        "Every recipe but the last two keeps a middle of the same compact size as uniform drop to 4 of 26 "
        "layers; `middle` is the kept middle's compact size (b-bit values, pruning mask, scales) as a share of "
        "the full middle; `device params` are the float32 weights the device holds (layerwise compression is "
        "fake-quantized: it shrinks what the bundle reveals, not device memory; low rank shrinks both). "
        "Calibration and distillation use the public Wikipedia training split for sentiment, and the news "
        "training split for Wikipedia (so that the emulator never sees the text the adapter trains on).",
    ]
    news = ["--calibration", str(dataset_path("news", "train"))]  # the Wikipedia task calibrates on other text
    tasks = (("sentiment", args.steps, args.limit_test, []), ("wikipedia", args.lm_steps, args.lm_limit_test, news))
    for task, steps, limit, extra in tasks:
        results, argv = _run(task, steps, limit, extra)
        shown = [arg.replace(f"{REPO}/", "").replace(str(cache_root()), "$OFFSITE_EDGE_CACHE") for arg in argv]
        body += [
            "",
            f"### {task} ({results['metric']}), {steps} adapter steps, {results['config']['test_examples']} test "
            f"{'examples' if task == 'sentiment' else 'paragraphs'}",
            "",
            f"Runs `coordinator {' '.join(shown)}`.",
            "",
            "```",
            format_tradeoff(results),
            "```",
            "",
            *_findings(results),
            "",
            f"![{task} privacy-utility](bench/results/compression_{task}.png)",
        ]
    write_section("compression", "\n".join(body))
    print("\nwrote the compression section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
