"""On-device training of a SmolLM2 bundle: predicted vs measured peak memory per budget, ORT vs PyTorch step time.

Run alone (two torch processes on two cores slow each other down): `python -m bench.device_training`.
Each training run is its own process, as on a device; ORT runs with torch blocked, as where `.[runtime]` alone
is installed (onnxruntime would otherwise import torch to validate itself, and its memory would count).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.markdown import machine_line, write_section
from bench.runs import device_train, export_bundle
from coordinator.datasets import dataset_path
from coordinator.defaults import DEFAULT_EMULATOR
from edge_runtime.files import atomic_path, write_json_atomic
from edge_runtime.manifest import Manifest

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results" / "device_training.json"
BUDGETS_GB = (1, 1.5, 2, 4)
# The default bundle as exported, and with int8 frozen weights and recomputed activations.
VARIANTS = {"float32": [], "int8 + recompute": ["--emulator", f"{DEFAULT_EMULATOR},store=int8", "--recompute"]}
BATCH = 32
STEPS = 12
GOAL = 0.15  # |measured - predicted| / measured


def measure() -> dict:
    """Train each bundle variant under each budget with each backend; one process per run."""
    runs, layers = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        data = dataset_path("sentiment", "train")
        for variant, options in VARIANTS.items():
            bundle = export_bundle(root, variant.replace(" ", ""), ["--batch-size", str(BATCH), *options])
            layers[variant] = len(Manifest.from_json((bundle / "manifest.json").read_bytes()).emulator.layer_map)
            for budget in BUDGETS_GB:
                for backend in ("ort", "torch"):
                    print(f"{variant}: budget {budget} GiB, {backend}", flush=True)
                    out = root / f"{variant.replace(' ', '')}-{backend}-{budget}"
                    runs.append({"variant": variant} | _run(bundle, data, backend, budget, out))
    return {"batch_size": BATCH, "steps": STEPS, "machine": machine_line(), "runs": runs, "layers": layers}


def _run(bundle: Path, data: Path, backend: str, budget: float, out: Path) -> dict:
    """One training run's budget, plan and measurements, or the refusal."""
    metrics = device_train(bundle, data, backend, STEPS, out, budget)
    if "refused" in metrics:
        return {"backend": backend, "budget_gb": budget, "refused": metrics["refused"]}
    keep = (
        "micro_batch",
        "sequence",
        "predicted_peak_bytes",
        "peak_memory_bytes",
        "step_seconds_median",
        "budget_bytes",
        "final_loss",
        "micro_batch_changes",
    )
    return {"backend": backend, "budget_gb": budget} | {key: metrics[key] for key in keep}


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run for run in results["runs"] if "refused" not in run]
    labels = [f"{r.get('variant', '')}\n{r['backend']} {r['budget_gb']} GiB\nmicro {r['micro_batch']}" for r in runs]
    x = range(len(runs))
    figure, axes = plt.subplots(figsize=(13, 4.5))
    axes.bar([i - 0.2 for i in x], [r["predicted_peak_bytes"] / 2**20 for r in runs], 0.4, label="predicted")
    axes.bar([i + 0.2 for i in x], [r["peak_memory_bytes"] / 2**20 for r in runs], 0.4, label="measured")
    axes.scatter(list(x), [r["budget_bytes"] / 2**20 for r in runs], marker="_", s=900, color="black", label="budget")
    axes.set_xticks(list(x), labels, fontsize=6)
    axes.set_ylabel("peak memory, MiB (whole process)")
    axes.set_title(f"SmolLM2 default bundle (2+2 adapter), batch {results['batch_size']}: predicted vs measured")
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)


def report(results: dict) -> str:
    """The Markdown section: one row per run, then the ORT vs PyTorch step-time ratio per budget."""
    lines = [
        "| bundle | backend | budget | micro-batch × accumulation | predicted MiB | measured MiB | error "
        "| under budget | s/step |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | :---: | ---: |",
    ]
    worst = 0.0
    for run in results["runs"]:
        variant = run.get("variant", "float32")
        if "refused" in run:
            needed = run["refused"].split("needs at least ")[1].split(" MiB")[0]
            lines.append(
                f"| {variant} | {run['backend']} | {run['budget_gb']} GiB | refused before training: needs "
                f"{needed} MiB | | | | yes | |"
            )
            continue
        predicted, measured = run["predicted_peak_bytes"], run["peak_memory_bytes"]
        error = (predicted - measured) / measured
        worst = max(worst, abs(error))
        under = "yes" if measured <= run["budget_bytes"] else "**no**"
        lines.append(
            f"| {variant} | {run['backend']} | {run['budget_gb']} GiB | {run['micro_batch']} × "
            f"{BATCH // run['micro_batch']} | {predicted / 2**20:,.0f} | {measured / 2**20:,.0f} | {error:+.1%} "
            f"| {under} | {run['step_seconds_median']:.2f} |"
        )
    lines += [
        "",
        "| bundle | budget | ORT s/step | PyTorch s/step | PyTorch ÷ ORT |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for variant in dict.fromkeys(run.get("variant", "float32") for run in results["runs"]):
        for budget in BUDGETS_GB:
            ort, torch = (
                next(
                    r
                    for r in results["runs"]
                    if r.get("variant", "float32") == variant and r["backend"] == b and r["budget_gb"] == budget
                )
                for b in ("ort", "torch")
            )
            if "refused" in ort or "refused" in torch:
                continue
            ratio = torch["step_seconds_median"] / ort["step_seconds_median"]
            lines.append(
                f"| {variant} | {budget} GiB | {ort['step_seconds_median']:.2f} | {torch['step_seconds_median']:.2f} "
                f"| {ratio:.2f}× |"
            )
    lines += ["", f"Largest prediction error: {worst:.1%} (goal: within {GOAL:.0%}, never over budget)."]
    return "\n".join(lines)


READING = (
    "Reading it: every run stayed under its budget, and a budget a configuration cannot meet is refused before "
    "training, with the budget it would need. A checkpoint holds only what trains (the adapter and AdamW's two "
    "moments): the frozen matrices are inputs of the training graph, read once from "
    "`ort/frozen_weights.safetensors`. When ONNX Runtime serialized them into every checkpoint as well (a "
    "FlatBuffer of 1.3-2x the state), it refused 1.5 GiB for the float32 bundle (needing 1,967 MiB) and 1 GiB for "
    "int8 + recompute (1,192 MiB), and float32 at micro-batch 16 peaked at 2,598 MiB and int8 + "
    "recompute at micro-batch 32 at 1,368. The int8 + recompute graph runs from ONNX Runtime's arena (glibc's "
    "heap took the same runs to 2.7 GiB), which keeps a step's memory through a checkpoint write. Without the "
    "arena, ONNX Runtime allocates with malloc, and both it and PyTorch give glibc's free heap pages back after "
    "every micro-batch (malloc_trim): float32 on ORT at 4 rows a call took 1,291-1,329 MiB without that. The "
    "float32 ORT rows are over-predicted more as the micro-batch grows (the plan adds about 107 MiB a row between "
    "8 and 16 rows where these runs took 84): the per-token factors were fitted when the checkpoint, not the "
    "step, decided those runs' peaks, and want refitting on a sweep of micro-batches. Both backends spend a step "
    "in the same float32 matmuls, so the PyTorch fallback costs a device little."
)


def _layers(results: dict) -> int:
    return results.get("layers", {}).get("float32", 12)


def publish(results: dict) -> None:
    """Plot, print and write the BENCHMARKS.md section from measured `results`."""
    _plot(results, OUT.with_suffix(".png"))
    table = report(results)
    print(table)
    body = "\n".join(
        [
            "## On-device training: memory plan vs measurement, ONNX Runtime vs PyTorch",
            "",
            "Command: `python -m bench.device_training` (part of `make bench`).",
            f"Machine: {results['machine']}.",
            "",
            f"The default SmolLM2-135M bundle (`coordinator export --profile laptop-16gb --backends ort,torch "
            f"--batch-size {BATCH}`: {_layers(results)}-layer emulator, adapter = layers 0, 1, 28, 29, 14.2 M "
            "parameters), as exported (float32) and with `--emulator "
            f"{DEFAULT_EMULATOR},store=int8 --recompute` (int8 + recompute), each trained for {STEPS} steps "
            "on movie-review sentences by `edge-runtime train --budget-gb B`, each run its own process. The device "
            "plans with its data's longest row and picks the largest micro-batch whose predicted peak plus 10 % fits "
            "the budget; gradients accumulate over the micro-batches. Measured = the kernel's peak resident set of the "
            "whole process (the kernel's high-water mark, VmHWM). ORT runs with torch blocked, as on a device with "
            "`.[runtime]` only. "
            "s/step is the median over the run; both backends use the 2 cores.",
            "",
            table,
            "",
            READING,
            "",
            f"![predicted vs measured peak memory](bench/results/{OUT.with_suffix('.png').name})",
        ]
    )
    write_section("device_training", body)


def main() -> None:
    results = measure()
    write_json_atomic(OUT, results)
    publish(results)


if __name__ == "__main__":
    main()
