"""Benchmark: bytes a device sends and receives per federated round, for each adapter kind and size, against
shipping the full model (federated full fine-tuning sends it both ways every round), SmolLM2-135M.

Sizes are of what goes on the wire (edge_runtime/transfer.py packs a folder as one tar, sent in chunks): the ORT
bundle once, then per round the starting adapter down (from round 2, the last round's aggregate) and the device's
result folder up. Run alone: `python -m bench.communication` (part of `make bench`); `--report-only` rewrites the
section from the saved results.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.markdown import machine_line, measured_or_saved, save_figure, write_section
from bench.runs import device_train, export_bundle
from coordinator.datasets import dataset_path, prepare_datasets
from coordinator.models import prepare_named_model
from edge_runtime.manifest import Manifest
from edge_runtime.transfer import pack_directory

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results" / "communication.json"
PLOT = REPO / "bench" / "results" / "communication.png"
# (label, adapter layers, adapter kind): whole layers at three sizes, then the small kinds on the default 2+2.
ADAPTERS = (
    ("whole layers 1+1", "1,1", "layers"),
    ("whole layers 2+2", "2,2", "layers"),
    ("whole layers 4+4", "4,4", "layers"),
    ("LoRA r=8 (q, v) on 2+2", "2,2", "lora:r=8"),
    ("bias terms of 2+2", "2,2", "bias"),
    ("soft prompt, 20 tokens", "2,2", "prompt:tokens=20"),
)
# The wire sizes do not depend on the recipe; uniform keep 8 builds in seconds (the default's greedy path would not).
EMULATOR = ["--emulator", "uniform", "--keep", "8"]
ROUNDS = 20
MB = 1e6


def _packed(folder: Path, out: Path) -> int:
    return pack_directory(folder, out).stat().st_size


def measure() -> dict:
    """Export each adapter, train it one step (a real result folder), and weigh what each message carries."""
    prepare_datasets()
    kinds = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for index, (label, layers, kind) in enumerate(ADAPTERS):
            print(f"adapter {label}", flush=True)
            name = f"adapter-{index}"
            options = ["--adapter-layers", layers, "--adapter-kind", kind, *EMULATOR]
            bundle = export_bundle(root, name, options, backends="ort")
            result = root / f"result-{name}"
            device_train(bundle, dataset_path("sentiment", "train"), "ort", 1, result)
            manifest = Manifest.from_json((bundle / "manifest.json").read_bytes())
            kinds.append(
                {
                    "adapter": label,
                    "trainable_parameters": manifest.plan.shape.trainable_parameters,
                    "bundle_bytes": _packed(bundle, root / f"{name}.tar"),
                    "up_bytes": _packed(result, root / f"{name}-result.tar"),
                    "down_bytes": (result / "adapter.safetensors").stat().st_size,  # the aggregate's one file
                }
            )
        model = prepare_named_model("smollm2-135m")
        full_bytes = sum(path.stat().st_size for path in model.glob("*.safetensors"))
    return {"machine": machine_line(), "kinds": kinds, "full_model_bytes": full_bytes, "rounds": ROUNDS}


def _cumulative(kind: dict, rounds: int) -> list[float]:
    """Bytes one device has moved after each round: the bundle and round 1's result, then down and up per round."""
    return [
        (kind["bundle_bytes"] + r * kind["up_bytes"] + (r - 1) * kind["down_bytes"]) / MB for r in range(1, rounds + 1)
    ]


def _plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = list(range(1, results["rounds"] + 1))
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for kind in results["kinds"]:
        axes.plot(rounds, _cumulative(kind, results["rounds"]), marker=".", label=f"offsite, {kind['adapter']}")
    full = [2 * r * results["full_model_bytes"] / MB for r in rounds]
    axes.plot(rounds, full, linestyle="--", color="black", label="federated full fine-tuning")
    axes.set_xlabel("rounds")
    axes.set_ylabel("MB moved per device (down + up)")
    axes.set_yscale("log")  # the small kinds move kilobytes a round, full fine-tuning gigabytes
    axes.set_title("SmolLM2-135M: one device's traffic over a federated job")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    save_figure(figure, PLOT)


def _count(parameters: int) -> str:
    return f"{parameters / 1e6:.1f} M" if parameters >= 1e6 else f"{parameters / 1e3:,.1f} k"


def _size(size: int) -> str:
    return f"{size / MB:,.1f} MB" if size >= MB else f"{size / 1e3:,.0f} kB"


def report(results: dict) -> str:
    _plot(results)
    full = results["full_model_bytes"]
    lines = [
        "## Communication per device per round",
        "",
        f"Command: `{results['command']}` (part of `make bench`).",
        f"Machine: {results['machine']}.",
        "",
        "Measured sizes of what crosses the wire (tar of the folder, as `edge_runtime/transfer.py` sends it), "
        "float32 weights, emulator `uniform:keep=8` (the adapter's bytes do not depend on the recipe). Federated "
        f"full fine-tuning sends the full model ({full / MB:,.0f} MB, float32 safetensors) down and its update up "
        "every round. `up ÷ full model` is what a device sends per round against the full model's float32 weights.",
        "",
        "| adapter | trainable | bundle (once) | down per round | up per round | up ÷ full model | round ÷ full round "
        f"| total after {results['rounds']} rounds | ÷ full |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind in results["kinds"]:
        per_round = kind["down_bytes"] + kind["up_bytes"]
        total = _cumulative(kind, results["rounds"])[-1] * MB
        full_total = 2 * results["rounds"] * full
        lines.append(
            f"| {kind['adapter']} | {_count(kind['trainable_parameters'])} | {kind['bundle_bytes'] / MB:,.0f} MB "
            f"| {_size(kind['down_bytes'])} | {_size(kind['up_bytes'])} | {kind['up_bytes'] / full:.2%} "
            f"| {per_round / (2 * full):.4f} "
            f"| {total / MB:,.0f} MB | {full_total / total:.1f}× less |"
        )
    lines += ["", "![communication](bench/results/communication.png)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the saved results")
    args = parser.parse_args()
    results = measured_or_saved(OUT, "bench.communication", args.report_only, measure)
    write_section("communication", report(results))


if __name__ == "__main__":
    main()
