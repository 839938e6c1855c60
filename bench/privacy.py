"""DP-SGD's cost on the device: time per step and peak memory of bias and LoRA training with and without DP.

Run alone (it measures speed): `python -m bench.privacy [--steps 30] [--pairs 3]`.
SmolLM2-135M bundles (2+2 adapter layers, PyTorch backend, batch 8, 128 tokens) trained with `edge-runtime train`,
each run its own process as on a device, the runs interleaved (plain, DP, plain, DP, …) so that drift hits both;
the ratio is the median of the paired ratios. DP-BiTFiT's claim for bias terms: ≤ 25 % more time per step and
≤ 20 % more peak memory than non-private bias training.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.markdown import machine_line, measured_or_saved, write_section
from bench.runs import device_train, export_bundle
from coordinator.datasets import dataset_path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results" / "privacy.json"
KINDS = ("bias", "lora")
DP = "epsilon=3,delta=1e-5,clip=1.0"
TIME_GOAL, MEMORY_GOAL = 1.25, 1.20  # DP-BiTFiT: bias DP within these of non-private bias


def measure(steps: int, pairs: int) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    data = dataset_path("sentiment", "train")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        bundles = {}
        for kind in KINDS:
            for private in (False, True):
                options = ["--adapter-kind", kind, "--steps", str(steps), *(["--dp", DP] if private else [])]
                bundles[(kind, private)] = export_bundle(
                    root, f"{kind}-{'dp' if private else 'plain'}", options, "torch"
                )
        for pair in range(pairs):
            for kind in KINDS:
                for private in (False, True):
                    out = root / f"run-{kind}-{private}-{pair}"
                    metrics = device_train(bundles[(kind, private)], data, "torch", steps, out)
                    runs.append(
                        {
                            "kind": kind,
                            "dp": private,
                            "pair": pair,
                            "step_seconds_median": metrics["step_seconds_median"],
                            "peak_memory_bytes": metrics["peak_memory_bytes"],
                            "samples": metrics["samples"],
                            "epsilon": metrics["privacy"]["epsilon"],
                        }
                    )
                    print(
                        f"{kind} {'DP' if private else 'plain'} #{pair + 1}: {metrics['step_seconds_median']:.3f} "
                        f"s/step, {metrics['peak_memory_bytes'] / 2**20:,.0f} MiB",
                        flush=True,
                    )
    return {"machine": machine_line(), "steps": steps, "pairs": pairs, "dp": DP, "runs": runs}


def _ratios(results: dict[str, Any], kind: str, key: str) -> list[float]:
    plain = {r["pair"]: r[key] for r in results["runs"] if r["kind"] == kind and not r["dp"]}
    private = {r["pair"]: r[key] for r in results["runs"] if r["kind"] == kind and r["dp"]}
    return [private[pair] / plain[pair] for pair in sorted(plain)]


def report(results: dict[str, Any]) -> str:
    lines = [
        "| adapter | training | s/step (median) | peak MiB (median) | DP ÷ plain time | DP ÷ plain memory |",
        "| --- | --- | ---: | ---: | --- | --- |",
    ]
    for kind in KINDS:
        for private in (False, True):
            runs = [r for r in results["runs"] if r["kind"] == kind and r["dp"] == private]
            seconds = statistics.median(r["step_seconds_median"] for r in runs)
            memory = statistics.median(r["peak_memory_bytes"] for r in runs) / 2**20
            time_cell = memory_cell = ""
            if private:
                times, memories = (
                    _ratios(results, kind, "step_seconds_median"),
                    _ratios(results, kind, "peak_memory_bytes"),
                )
                time_cell = f"**{statistics.median(times):.2f}×** ({min(times):.2f}–{max(times):.2f})"
                memory_cell = f"**{statistics.median(memories):.2f}×** ({min(memories):.2f}–{max(memories):.2f})"
            label = "DP-SGD (ε = 3, δ = 1e-5, C = 1)" if private else "non-private"
            lines.append(f"| {kind} | {label} | {seconds:.3f} | {memory:,.0f} | {time_cell} | {memory_cell} |")
    time = statistics.median(_ratios(results, "bias", "step_seconds_median"))
    memory = statistics.median(_ratios(results, "bias", "peak_memory_bytes"))
    verdict = "meets" if time <= TIME_GOAL and memory <= MEMORY_GOAL else "misses"
    lines.append(
        f"\nDP bias training {verdict} DP-BiTFiT's bound (≤ {TIME_GOAL:.2f}× time, ≤ {MEMORY_GOAL:.2f}× memory): "
        f"{time:.2f}× and {memory:.2f}×."
    )
    return "\n".join(lines)


def publish(results: dict[str, Any]) -> None:
    table = report(results)
    print(table)
    body = "\n".join(
        [
            "## Differential privacy on the device: DP-SGD's cost for bias terms and LoRA",
            "",
            f"Command: `{results['command']}`.",
            f"Machine: {results['machine']}.",
            "",
            f"SmolLM2-135M, 2+2 adapter layers, PyTorch backend, batch 8 (DP: Poisson-sampled, 8 expected), 128 "
            f"tokens, {results['steps']} steps per run; each run `edge-runtime train` in its own process; "
            f"{results['pairs']} interleaved pairs (plain, DP) per kind, ratios = median of the paired ratios "
            "(range in brackets). Per-example gradients come from one batched backward by module hooks (a bias's: "
            "its output gradient summed over positions; LoRA's: one einsum per tensor), then clipping, noise and "
            "the AdamW step. A DP step trains on however many rows its Poisson draw took (8 on average, as many "
            "as a plain step), so its time per step is like for like on average, not step by step.",
            "",
            table,
            "",
            "Accuracy under DP at ε = 1, 3 and 8: `python -m bench.privacy_accuracy`, the next section.",
        ]
    )
    write_section("privacy", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the saved results")
    args = parser.parse_args()
    publish(measured_or_saved(OUT, "bench.privacy", args.report_only, lambda: measure(args.steps, args.pairs)))


if __name__ == "__main__":
    main()
