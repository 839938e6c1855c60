"""Benchmark: adaptive layer tuning (train a window of adapter layers at a time, vote across exits) against training
the whole adapter at once, SmolLM2-135M: device peak memory and step time (ONNX Runtime), and utility on sentiment.

Run alone from the repository root: `python -m bench.layer_windows` (part of `make bench-studies`).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.markdown import machine_line, measured_or_saved, write_section
from bench.runs import device_train, export_bundle, folder_bytes, repeated
from coordinator.datasets import dataset_path, prepare_datasets
from edge_runtime.files import atomic_path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results" / "layer_windows.json"
SPLIT = ["--adapter-layers", "2,2", "--keep", "4"]
WINDOW = 2  # layers per window: the bottom pair, then the top pair


def _device_run(root: Path, window: int | None, batch: int, steps: int, repeats: int) -> dict:
    """Export an ORT bundle, train it on sentiment `repeats` times, each in its own process with torch blocked (as
    on a device); medians of the whole process's peak memory and of the median step time."""
    windows = ["--layer-window", str(window)] if window else []
    bundle = export_bundle(root, f"bundle-{window}", [*SPLIT, "--batch-size", str(batch), *windows], backends="ort")
    data = dataset_path("sentiment", "train")
    runs = [device_train(bundle, data, "ort", steps, root / f"result-{window}-{r}") for r in range(repeats)]
    return repeated(runs) | {"bundle_bytes": folder_bytes(bundle)}


def _utility(window: int | None, steps: int, limit_test: int) -> dict:
    """Emulator zero-shot, offsite on the emulator and plug-in accuracy, trained here in PyTorch (same schedule)."""
    from coordinator.compression import EmulatorSpec
    from coordinator.emulator import Split
    from coordinator.evaluation.five_settings import Experiment, measure_offsite
    from coordinator.models import load_model
    from coordinator.tasks import make_task
    from coordinator.train import TrainConfig
    from edge_runtime.data import load_examples

    train = load_examples(dataset_path("sentiment", "train"))
    test = load_examples(dataset_path("sentiment", "test"))[:limit_test]
    loaded = load_model("smollm2-135m")
    task = make_task(loaded.tokenizer, train, test)
    training = TrainConfig(steps, 3e-5, 8, 128)
    experiment = Experiment(Split(2, 2, keep=4), training, training, 16, EmulatorSpec(keep=4), window)
    measured = measure_offsite(loaded, task, train, test, experiment)
    plugin = measured["offsite_plugin"]
    return {
        "emulator_zero_shot": measured["emulator_zero_shot"]["accuracy"],
        "offsite_emulator": measured["offsite_emulator"]["accuracy"],
        "plugin": plugin["accuracy"],
        "plugin_final_exit": plugin.get("final_exit_only", plugin["accuracy"]),
        "train_seconds": measured["offsite_emulator"]["train"]["seconds"],
    }


def measure(batch: int, device_steps: int, repeats: int, steps: int, limit_test: int) -> dict:
    prepare_datasets()
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for window in (None, WINDOW):
            label = f"windows of {window}" if window else "whole adapter"
            print(f"{label}: device run", flush=True)
            rows[label] = {"window": window} | _device_run(Path(scratch), window, batch, device_steps, repeats)
            print(f"{label}: utility", flush=True)
            rows[label] |= _utility(window, steps, limit_test)
    return {
        "machine": machine_line(),
        "batch_size": batch,
        "device_steps": device_steps,
        "repeats": repeats,
        "steps": steps,
        "test_examples": limit_test,
        "rows": rows,
    }


def report(results: dict) -> str:
    lines = [
        "| adapter training | bundle MB | device peak MiB | device s/step | emulator 0-shot | offsite on emu "
        "| plug-in (voted) | plug-in (last exit) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, row in results["rows"].items():
        lines.append(
            f"| {label} | {row['bundle_bytes'] / 1e6:,.0f} | {row['peak_memory_bytes'] / 2**20:,.0f} | "
            f"{row['step_seconds_median']:.2f} | "
            f"{100 * row['emulator_zero_shot']:.1f} % | {100 * row['offsite_emulator']:.1f} % | "
            f"{100 * row['plugin']:.1f} % | {100 * row['plugin_final_exit']:.1f} % |"
        )
    whole, windowed = results["rows"]["whole adapter"], results["rows"][f"windows of {WINDOW}"]
    lines += [
        "",
        f"Windows ÷ whole adapter: peak memory {windowed['peak_memory_bytes'] / whole['peak_memory_bytes']:.2f}×, "
        f"step time {windowed['step_seconds_median'] / whole['step_seconds_median']:.2f}×, bundle "
        f"{windowed['bundle_bytes'] / whole['bundle_bytes']:.2f}×. Peak memory per run (MiB): "
        + "; ".join(
            f"{label}: {', '.join(f'{peak / 2**20:,.0f}' for peak in row['peak_memory_bytes_runs'])}"
            for label, row in results["rows"].items()
        )
        + ".",
    ]
    return "\n".join(lines)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results["rows"])
    rows = [results["rows"][label] for label in labels]
    figure, (memory, utility) = plt.subplots(1, 2, figsize=(9, 3.6))
    memory.bar(labels, [row["peak_memory_bytes"] / 2**20 for row in rows], color=["tab:gray", "tab:blue"])
    memory.set_ylabel("device peak memory, MiB (ORT)")
    x = range(len(labels))
    for offset, key, name in ((-0.2, "plugin", "plug-in (voted)"), (0.2, "plugin_final_exit", "plug-in (last exit)")):
        utility.bar([i + offset for i in x], [100 * row[key] for row in rows], 0.4, label=name)
    utility.set_xticks(list(x), labels)
    utility.set_ylabel("sentiment accuracy, %")
    utility.set_ylim(40, 100)
    utility.legend(fontsize=8)
    figure.suptitle("SmolLM2-135M, adapter 2+2, emulator keeps 4: whole adapter vs layer windows")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)


READING = (
    "Reading it: a window's step back-propagates from its exit through its own two layers only, so the device "
    "keeps far fewer activations and a step takes about half the time; the bottom window's graphs hold only "
    "the embeddings and two layers. The peak does not fall as far, because the top window's graphs still hold "
    "the whole emulator and ONNX Runtime serializes that state into a buffer 1.6× its size when it checkpoints "
    "(every 10 steps by default), and each window adds a set of graphs to the bundle. Voting across the exits "
    "hurts here: the exit after layer 1 learns to answer confidently from two layers and outvotes the final "
    "exit, so the plug-in read at the last layer alone is the number to compare with the whole adapter. "
    "Edge-LLM votes across exits of a model tuned at every depth; an adapter at the two ends of a 30-layer model "
    "leaves its lower exit too shallow to vote."
)


def publish(results: dict) -> None:
    """Plot, print and write the BENCHMARKS.md section from measured `results`."""
    _plot(results, OUT.with_suffix(".png"))
    table = report(results)
    print(table)
    body = "\n".join(
        [
            "## Adaptive layer tuning: one window of adapter layers at a time, SmolLM2-135M",
            "",
            f"Command: `{results['command']}`. Machine: {results['machine']}.",
            "",
            f"Adapter = layers 0, 1, 28, 29; the emulator keeps 4 of the 26 middle layers. `whole adapter` trains "
            f"all four layers every step; `windows of {WINDOW}` trains layers 0-1 through an exit after layer 1 for "
            f"the first half of the steps, then layers 28-29 through the model's own exit (Edge-LLM's adaptive layer "
            f"tuning), and scores by confidence voting across the two exits. Device columns: an ORT bundle trained "
            f"by `edge-runtime train` for {results['device_steps']} steps of batch {results['batch_size']} in its own "
            f"process (peak resident set of the whole process; medians of {results['repeats']} runs). Accuracy "
            f"columns: {results['steps']} adapter steps (batch 8, lr 3e-5), {results['test_examples']} test reviews.",
            "",
            table,
            "",
            READING,
            "",
            "![layer windows](bench/results/layer_windows.png)",
        ]
    )
    write_section("layer_windows", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=16, help="device batch (memory and step time)")
    parser.add_argument("--device-steps", type=int, default=16, help="device steps (memory and step time)")
    parser.add_argument("--repeats", type=int, default=3, help="device runs per configuration (medians)")
    parser.add_argument("--steps", type=int, default=80, help="adapter steps for the accuracy columns")
    parser.add_argument("--limit-test", type=int, default=400, help="sentiment test examples")
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the last results")
    args = parser.parse_args()
    results = measured_or_saved(
        OUT,
        "bench.layer_windows",
        args.report_only,
        lambda: measure(args.batch_size, args.device_steps, args.repeats, args.steps, args.limit_test),
    )
    publish(results)


if __name__ == "__main__":
    main()
