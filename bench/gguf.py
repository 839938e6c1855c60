"""Benchmark: the tuned model where users run it: PyTorch against llama.cpp's GGUF f16, q8_0 and LoRA-on-base.

A LoRA bundle of SmolLM2-135M (laptop profile, PyTorch backend) trained as a device would, plugged in with
`coordinator plug --out --gguf --gguf-lora`, then scored on the whole sentiment test split the same way four times:
PyTorch's plugged-in model (float32), the GGUF model in f16 and in q8_0 through llama-cpp-python, and the source
GGUF (Q4_1) with the GGUF LoRA applied at load. Scoring speed is tokens/s over the same prompts, one prompt at a
time in every runtime (a user's request), all threads.

Run from the repository root, alone (it measures speed): `python -m bench.gguf [--steps 200]`.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.markdown import machine_line, measured_or_saved, write_section
from bench.runs import COORDINATOR, device_train, export_bundle
from coordinator.datasets import dataset_path, prepare_datasets
from coordinator.evaluation.gguf_score import accuracy, open_gguf
from coordinator.models import gguf_tokenizer, load_model, packaged_gguf_path
from coordinator.tasks import ClassificationTask, make_task
from edge_runtime.data import load_examples

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results" / "gguf.json"
GOALS = {"f16": 1.0, "q8_0": 2.0}  # the most accuracy points each may lose against PyTorch


def _pytorch(folder: Path, task: ClassificationTask, examples: list) -> dict[str, Any]:
    model = load_model(str(folder)).model
    batches = [next(task.batches([example], 1, seed=None)) for example in examples]
    start, correct = time.perf_counter(), 0
    with torch.inference_mode():
        for batch in batches:
            correct += int(task.label_logits(model, batch).argmax(dim=1) == batch.targets)
    seconds = time.perf_counter() - start
    tokens = sum(int(batch.attention_mask.sum()) for batch in batches)
    return {"accuracy": correct / len(examples), "tokens_per_second": tokens / seconds}


def measure(steps: int, lr: float) -> dict[str, Any]:
    test = load_examples(dataset_path("sentiment", "test"))
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        options = ["--adapter-kind", "lora:r=8", "--steps", str(steps), "--lr", str(lr)]
        bundle = export_bundle(root, "lora", options, "torch")
        device_train(bundle, dataset_path("sentiment", "train"), "torch", steps, root / "result")
        files = {kind: root / f"tuned-{kind}.gguf" for kind in GOALS}
        for kind, path in files.items():
            plug = ["plug", "--adapter", str(root / "result"), "--gguf", str(path), "--gguf-type", kind]
            extra = ["--out", str(root / "tuned"), "--gguf-lora", str(root / "lora.gguf")] if kind == "f16" else []
            subprocess.run([*COORDINATOR, *plug, *extra], check=True, capture_output=True)
        task = make_task(gguf_tokenizer(files["f16"]), test, test)
        rows = {"PyTorch float32": _pytorch(root / "tuned", task, test)}
        rows["PyTorch float32"]["bytes"] = sum(p.stat().st_size for p in (root / "tuned").glob("*.safetensors"))
        runs = {f"GGUF {kind}": (path, None) for kind, path in files.items()}
        runs["GGUF Q4_1 base + GGUF LoRA"] = (packaged_gguf_path("smollm2-135m"), root / "lora.gguf")
        for label, (model, lora) in runs.items():
            score = accuracy(open_gguf(model, lora), task, test)
            size = model.stat().st_size + (lora.stat().st_size if lora else 0)
            rows[label] = {"accuracy": score.value, "tokens_per_second": score.tokens_per_second, "bytes": size}
            print(f"{label}: {100 * score.value:.1f} %, {score.tokens_per_second:,.0f} tokens/s", flush=True)
    return {"machine": machine_line(), "steps": steps, "lr": lr, "test_examples": len(test), "rows": rows}


def report(results: dict[str, Any]) -> str:
    rows = results["rows"]
    reference = rows["PyTorch float32"]
    lines = [
        "| model | runtime | accuracy (%) | Δ vs PyTorch (points) | file MiB | tokens/s | ÷ PyTorch tokens/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, row in rows.items():
        runtime = "PyTorch" if label.startswith("PyTorch") else "llama.cpp"
        delta = 100 * (row["accuracy"] - reference["accuracy"])
        speed = row["tokens_per_second"] / reference["tokens_per_second"]
        lines.append(
            f"| {label} | {runtime} | {100 * row['accuracy']:.1f} | {delta:+.1f} | {row['bytes'] / 2**20:,.0f} | "
            f"{row['tokens_per_second']:,.0f} | {speed:.2f}× |"
        )
    verdicts = []
    for kind, goal in GOALS.items():
        lost = 100 * (reference["accuracy"] - rows[f"GGUF {kind}"]["accuracy"])
        verdicts.append(f"{kind} {'within' if lost <= goal else 'outside'} {goal:g} point(s) ({lost:+.1f} lost)")
    return "\n".join([*lines, "", "Goals: " + "; ".join(verdicts) + "."])


def _reading(rows: dict[str, dict[str, Any]]) -> str:
    base, f16 = rows["GGUF Q4_1 base + GGUF LoRA"], rows["GGUF f16"]
    return (
        f"Reading: the GGUF LoRA on the shipped Q4_1 file ({base['bytes'] / 2**20:,.0f} MiB with its adapter) scores "
        f"{100 * base['accuracy']:.1f} % against the merged f16 file's {100 * f16['accuracy']:.1f} % "
        f"({f16['bytes'] / 2**20:,.0f} MiB): one base file and a small adapter per task. llama.cpp's speed here "
        "is a floor: it is built for AVX2/FMA/F16C only (its native build, which would use this CPU's AVX-512, "
        "crashed in decode; see the README), while PyTorch's CPU wheel runs its matrix products through oneDNN with "
        "AVX-512, and prompts of about 30 tokens leave little to amortize."
    )


def publish(results: dict[str, Any]) -> None:
    table = report(results)
    print(table)
    body = [
        "## The tuned model in llama.cpp: GGUF f16, q8_0 and LoRA-on-base against PyTorch",
        "",
        f"Command: `{results['command']}`.",
        f"Machine: {results['machine']}.",
        "",
        f"A LoRA bundle of SmolLM2-135M (r = 8 on the query and value projections of 2+2 adapter layers) trained "
        f"{results['steps']} steps at lr {results['lr']:g} on the device (PyTorch backend), plugged in by "
        "`coordinator plug --out --gguf --gguf-type f16|q8_0 --gguf-lora`, then scored on all "
        f"{results['test_examples']:,} sentiment test reviews "
        "with the same prompts and label words in each runtime (label-word logits at the last prompt token). "
        "The LoRA row is the model as shipped (its Q4_1 GGUF) with the GGUF LoRA applied at load (sizes summed), "
        "so a user keeps one base file and many adapters; PyTorch's plug-in used that file's exact dequantization, and "
        "llama.cpp's Q4_1 kernels also round activations to 8 bits. Speed: one prompt at a time, all cores, the "
        "prompt's tokens per second of wall time.",
        "",
        table,
        "",
        _reading(results["rows"]),
    ]
    write_section("gguf", "\n".join(body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3, help="default: the LoRA rate bench.adapter_kinds chose")
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the saved results")
    args = parser.parse_args()
    prepare_datasets()
    publish(measured_or_saved(OUT, "bench.gguf", args.report_only, lambda: measure(args.steps, args.lr)))


if __name__ == "__main__":
    main()
