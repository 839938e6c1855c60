"""Benchmark: how a training step's time and peak memory grow with sequence length and with the emulator's kept
layers, offsite on the device (ONNX Runtime) beside full fine-tuning (PyTorch), SmolLM2-135M, with plots. Each
length is trained on the plain bundle and on one with int8 frozen weights and recomputed activations
(`uniform:store=int8`, `--recompute`).

Run alone from the repository root: `python -m bench.cost_growth` (part of `make bench`); `--report-only`
rewrites the section from the saved results.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tokenizers import Tokenizer

from bench.floor import full_model_shape, memory_floor
from bench.markdown import machine_line, measured_or_saved, save_figure, write_section
from bench.runs import batch_tokens, device_train, export_bundle, profiled_train
from coordinator.datasets import dataset_path, prepare_datasets
from edge_runtime.bundle import TOKENIZER_FILE
from edge_runtime.data import load_examples
from edge_runtime.files import atomic_path
from edge_runtime.manifest import Manifest

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results" / "cost_growth.json"
PLOT = REPO / "bench" / "results" / "cost_growth.png"
BATCH = 8
LENGTHS = (64, 128, 256, 512)
KEEPS = (2, 8, 14, 20, 26)
LENGTH_OF_KEEP_SWEEP = 128
SMALL_EMULATOR = "uniform:store=int8"  # with --recompute: the small-memory variant of the keep-8 bundle
MIB = 2**20


def _rows_of(tokens: int, tokenizer: Tokenizer, out: Path, rows: int = 64) -> Path:
    """Wikipedia paragraphs cut to about `tokens` tokens once templated (the device caps rows from the left)."""
    texts, stream = [], []
    for example in load_examples(dataset_path("wikipedia", "train")):
        stream += tokenizer.encode(" " + example.text, add_special_tokens=False).ids
        while len(stream) >= tokens and len(texts) < rows:
            texts.append(tokenizer.decode(stream[: tokens - 8]))
            stream = stream[tokens:]
        if len(texts) == rows:
            break
    with atomic_path(out) as temporary:
        temporary.write_text("".join(json.dumps({"text": t, "label": "positive"}) + "\n" for t in texts))
    return out


def _ort(bundle: Path, data: Path, steps: int, out: Path) -> dict:
    metrics = device_train(bundle, data, "ort", steps, out, budget_gb=20)
    keys = ("step_seconds_median", "peak_memory_bytes", "predicted_peak_bytes", "micro_batch")
    shape = Manifest.from_json((bundle / "manifest.json").read_bytes()).plan.shape
    widest = batch_tokens(bundle, data, steps)["widest"]
    return {key: metrics[key] for key in keys} | {"floor": memory_floor(shape, BATCH, widest)["total"]}


def _point(bundle: Path, data: Path, steps: int, out: Path, full: bool, small: Path | None = None) -> dict:
    """One offsite (ORT) run (and one of the `small` bundle), and a full fine-tuning run on the same rows if `full`."""
    manifest = Manifest.from_json((bundle / "manifest.json").read_bytes())
    shape = manifest.plan.shape
    tokens = batch_tokens(bundle, data, steps)
    ort = _ort(bundle, data, steps, out / "ort")
    point = {
        "sequence": tokens["widest"],
        "keep": len(manifest.emulator.layer_map) - 4,
        "ort": ort,
        "micro_batch": ort["micro_batch"],
        "floor": ort["floor"],
    }
    if small is not None:
        point["small"] = _ort(small, data, steps, out / "small")
    if full:
        run = profiled_train(bundle, data, "full", steps, out / "full.json")
        point["full"] = {key: run[key] for key in ("step_seconds_median", "peak_memory_bytes")}
        full_shape = full_model_shape(shape, run["trainable_parameters"], manifest.model.num_layers)
        point["full"]["floor"] = memory_floor(full_shape, BATCH, tokens["widest"])["total"]
    return point


def measure(steps: int) -> dict:
    prepare_datasets()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        common = ["--adapter-layers", "2,2", "--batch-size", str(BATCH), "--max-length", str(max(LENGTHS))]
        bundle = export_bundle(root, "keep-8", [*common, "--keep", "8"], backends="ort")
        small_options = [*common, "--keep", "8", "--emulator", SMALL_EMULATOR, "--recompute"]
        small = export_bundle(root, "keep-8-small", small_options, backends="ort")
        tokenizer = Tokenizer.from_file(str(bundle / TOKENIZER_FILE))
        data = {length: _rows_of(length, tokenizer, root / f"rows-{length}.jsonl") for length in LENGTHS}
        by_length = []
        for length in LENGTHS:
            print(f"sequence {length}", flush=True)
            point = _point(bundle, data[length], steps, root / f"run-length-{length}", full=True, small=small)
            by_length.append(point)
        by_keep = []
        for keep in KEEPS:
            print(f"keep {keep}", flush=True)
            kept = bundle if keep == 8 else export_bundle(root, f"keep-{keep}", [*common, "--keep", str(keep)], "ort")
            by_keep.append(_point(kept, data[LENGTH_OF_KEEP_SWEEP], steps, root / f"run-keep-{keep}", full=False))
    return {"machine": machine_line(), "batch_size": BATCH, "steps": steps, "by_length": by_length, "by_keep": by_keep}


def _plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    length, keep = results["by_length"], results["by_keep"]
    sequences, keeps = [p["sequence"] for p in length], [p["keep"] + 4 for p in keep]
    axes[0][0].plot(sequences, [p["ort"]["step_seconds_median"] for p in length], marker="o", label="offsite (ORT)")
    axes[0][0].plot(sequences, [p["full"]["step_seconds_median"] for p in length], marker="o", label="full (torch)")
    axes[0][1].plot(sequences, [p["ort"]["peak_memory_bytes"] / MIB for p in length], marker="o", label="offsite")
    axes[0][1].plot(sequences, [p["floor"] / MIB for p in length], linestyle=":", label="offsite floor")
    if all("small" in p for p in length):
        small = [p["small"] for p in length]
        axes[0][0].plot(sequences, [p["step_seconds_median"] for p in small], marker="o", label="int8+recompute")
        axes[0][1].plot(sequences, [p["peak_memory_bytes"] / MIB for p in small], marker="o", label="int8+recompute")
        axes[0][1].plot(sequences, [p["floor"] / MIB for p in small], linestyle=":", label="int8 floor")
    axes[0][1].plot(sequences, [p["full"]["peak_memory_bytes"] / MIB for p in length], marker="o", label="full")
    axes[0][1].plot(sequences, [p["full"]["floor"] / MIB for p in length], linestyle=":", label="full floor")
    axes[1][0].plot(keeps, [p["ort"]["step_seconds_median"] for p in keep], marker="o", label="offsite (ORT)")
    axes[1][1].plot(keeps, [p["ort"]["peak_memory_bytes"] / MIB for p in keep], marker="o", label="offsite")
    axes[1][1].plot(keeps, [p["ort"]["predicted_peak_bytes"] / MIB for p in keep], linestyle="--", label="predicted")
    axes[1][1].plot(keeps, [p["floor"] / MIB for p in keep], linestyle=":", label="floor")
    for row, xlabel in ((0, f"tokens per row (batch {results['batch_size']}, keep 8)"), (1, "emulator layers")):
        if row == 1:
            xlabel = f"emulator layers (keep + 2+2 adapter; {keep[0]['sequence']} tokens per row)"
        axes[row][0].set_ylabel("s per step (median)")
        axes[row][1].set_ylabel("peak MiB (whole process)")
        for column in (0, 1):
            axes[row][column].set_xlabel(xlabel)
            axes[row][column].legend(fontsize=8)
            axes[row][column].grid(alpha=0.3)
    figure.suptitle("SmolLM2-135M: step cost vs sequence length and vs emulator depth")
    figure.tight_layout()
    save_figure(figure, PLOT)


def report(results: dict) -> str:
    _plot(results)
    lines = [
        "## Cost growth: sequence length and emulator depth",
        "",
        f"Command: `{results['command']}` (part of `make bench`).",
        f"Machine: {results['machine']}.",
        "",
        f"Batch {results['batch_size']} rows of Wikipedia text cut to a fixed length, adapter 2+2; each point is one "
        f"process training {results['steps']} steps (median s/step; peak = the process's high-water mark). Offsite = "
        "`edge-runtime train` on an ORT bundle (torch blocked), keep 8: the default recipe as exported (float32), "
        f"and `--emulator {SMALL_EMULATOR} --recompute` (int8 + recompute), the same 12 layers' shapes chosen "
        "uniformly and without harmonizers, so compare their memory and time, not their loss; full = every weight "
        "trained in PyTorch on the same rows. The runs write no checkpoint (4 steps), which the predictions count.",
        "",
        "| tokens per row | bundle | offsite s/step | full s/step | full ÷ offsite | offsite MiB | full MiB "
        "| full ÷ offsite | offsite floor | offsite ÷ floor | full floor |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in results["by_length"]:
        full = p["full"]
        variants = [("float32", p["ort"])] + ([("int8 + recompute", p["small"])] if "small" in p else [])
        for name, ort in variants:
            seconds, peak = ort["step_seconds_median"], ort["peak_memory_bytes"]
            floor = ort.get("floor", p["floor"])
            lines.append(
                f"| {p['sequence']} | {name} | {seconds:.2f} | {full['step_seconds_median']:.2f} "
                f"| {full['step_seconds_median'] / seconds:.2f}× | {peak / MIB:,.0f} "
                f"| {full['peak_memory_bytes'] / MIB:,.0f} | {full['peak_memory_bytes'] / peak:.2f}× "
                f"| {floor / MIB:,.0f} | {peak / floor:.2f}× | {full['floor'] / MIB:,.0f} |"
            )
    lines += [
        "",
        "| emulator layers (kept + adapter) | s/step | peak MiB | predicted MiB | floor MiB | micro-batch |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in results["by_keep"]:
        ort = p["ort"]
        lines.append(
            f"| {p['keep']} + 4 | {ort['step_seconds_median']:.2f} | {ort['peak_memory_bytes'] / MIB:,.0f} "
            f"| {ort['predicted_peak_bytes'] / MIB:,.0f} | {p['floor'] / MIB:,.0f} | {p['micro_batch']} |"
        )
    lines += ["", "![cost growth](bench/results/cost_growth.png)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="training steps per point")
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the saved results")
    args = parser.parse_args()
    results = measured_or_saved(OUT, "bench.cost_growth", args.report_only, lambda: measure(args.steps))
    write_section("cost_growth", report(results))


if __name__ == "__main__":
    main()
