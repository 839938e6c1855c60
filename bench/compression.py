"""Benchmark: the privacy–utility table of every emulator recipe against uniform drop, SmolLM2-135M, on
movie-review sentiment (accuracy) and Wikipedia (perplexity).

Run from the repository root: `python -m bench.compression [--steps N] [--lm-steps N]` (or `make bench-studies`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.markdown import coordinator_command, machine_line, measuring_command, write_section
from coordinator.cli import main as coordinator
from coordinator.datasets import dataset_path, prepare_datasets
from coordinator.evaluation.tradeoff import format_tradeoff, plot_tradeoff

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


def _argv(task: str, steps: int, limit_test: int, extra: list[str]) -> list[str]:
    argv = [
        "evaluate", "--model", "smollm2-135m",
        "--train", str(dataset_path(task, "train")), "--test", str(dataset_path(task, "test")),
        "--adapter-layers", "2,2", "--steps", str(steps), "--limit-test", str(limit_test), *extra,
    ]  # fmt: skip
    for recipe in RECIPES:
        argv += ["--emulator", recipe]
    return [*argv, "--out", str(RESULTS / f"compression_{task}.json")]


def _tolerance(results: dict) -> tuple[float, str]:
    """How far apart two plug-in scores must be to count as different, and the sentence that says why."""
    if results["metric"] == "accuracy":
        n, p = results["config"]["test_examples"], results["full_zero_shot"]["accuracy"]
        error = (p * (1 - p) / n) ** 0.5
        return error, f"one standard error of an accuracy on {n} test examples is {100 * error:.1f} points"
    return 0.01, "perplexities within 1 % count as equal"


def _findings(results: dict) -> list[str]:
    """Plain sentences: the best recipe at uniform drop's size, and the smallest that matches a larger uniform drop."""
    metric = results["metric"]
    sign = 1 if metric == "accuracy" else -1  # higher accuracy, lower perplexity is better
    unit = (lambda v: f"{100 * v:.1f} %") if metric == "accuracy" else (lambda v: f"{v:.2f}")
    tolerance, why = _tolerance(results)
    rows = {row["emulator"]["spec"]: row for row in results["recipes"]}
    plugin = {spec: row["offsite_plugin"][metric] for spec, row in rows.items()}
    size = {spec: row["emulator"]["middle_fraction"] for spec, row in rows.items()}

    def margin(a: str, b: str) -> float:  # how much better a's plug-in is than b's, in the tolerance's terms
        gain = sign * (plugin[a] - plugin[b])
        return gain if metric == "accuracy" else gain / plugin[b]

    same = [s for s in rows if s != BASELINE and size[s] <= 1.02 * size[BASELINE]]
    best = max(same, key=lambda s: margin(s, BASELINE))
    verdict = "beats" if margin(best, BASELINE) > tolerance else "is within noise of"
    if margin(best, BASELINE) < -tolerance:
        verdict = "falls short of"
    lines = [
        f"- At most the size of `{BASELINE}` ({100 * size[BASELINE]:.1f} % of the middle), the best plug-in is "
        f"`{best}`: {unit(plugin[best])} vs {unit(plugin[BASELINE])}, so it {verdict} uniform drop ({why})."
    ]
    reaching = [s for s in rows if s != LARGER and margin(s, LARGER) >= -tolerance]
    smallest = min(reaching, key=lambda s: size[s], default=None)
    if smallest is not None and size[smallest] < size[LARGER]:
        lines.append(
            f"- `{LARGER}`'s plug-in ({unit(plugin[LARGER])}) is matched within noise by `{smallest}` "
            f"({unit(plugin[smallest])}) with a middle {size[LARGER] / size[smallest]:.1f}× smaller."
        )
    else:
        lines.append(f"- No smaller recipe matched `{LARGER}`'s plug-in ({unit(plugin[LARGER])}) within noise.")
    emulator = [row["emulator_zero_shot"][metric] for row in rows.values()]
    full = results["full_zero_shot"][metric]
    lines.append(
        f"- Across recipes the emulator's zero-shot spans {unit(min(emulator))} to {unit(max(emulator))} while the "
        f"plug-in spans only {unit(min(plugin.values()))} to {unit(max(plugin.values()))} (full model: {unit(full)}): "
        "at this adapter budget what the emulator reveals varies far more than what the owner gets back, so the "
        "weaker emulators buy privacy at little cost in utility."
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=80, help="adapter steps on sentiment")
    parser.add_argument("--lm-steps", type=int, default=40, help="adapter steps on Wikipedia")
    parser.add_argument("--limit-test", type=int, default=400, help="sentiment test examples")
    parser.add_argument("--lm-limit-test", type=int, default=60, help="Wikipedia test paragraphs")
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the last results")
    args = parser.parse_args()
    prepare_datasets()
    command = measuring_command("bench.compression")
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
        argv = _argv(task, steps, limit, extra)
        if not args.report_only and coordinator(argv) != 0:
            raise SystemExit(f"the {task} comparison failed")
        results = json.loads(Path(argv[-1]).read_text())
        plot_tradeoff(results, RESULTS / f"compression_{task}.png")  # redrawn, so --report-only refreshes it too
        body += [
            "",
            f"### {task} ({results['metric']}), {steps} adapter steps, {results['config']['test_examples']} test "
            f"{'examples' if task == 'sentiment' else 'paragraphs'}",
            "",
            f"Runs `{coordinator_command(argv)}`.",
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
