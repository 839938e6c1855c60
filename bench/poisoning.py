"""Benchmark: one poisoned device among ten, against each aggregation rule: plug-in accuracy, SmolLM2-135M.

Ten devices each train a LoRA r=8 adapter (rate and steps as bench.adapter_kinds chose them on validation)
through the default emulator, each on its own shard of the movie-review training file (the validation reviews
carved off first), one round, as a device would (same task, loss and AdamW, here in PyTorch). Then one device
is replaced by an attacker and each rule aggregates the ten: the plug-in (the aggregate in the full model) is
scored on the test reviews. Attacks: `scaled` sends its honest update reversed and ×10; `random` sends
Gaussian noise ten times the honest update's norm; `examples` sends its update reversed but claims 10⁹
examples (FedAvg weighs by them; the coordinator caps a claim at the announced dataset size, switched off here
to show what the cap prevents).

Run from the repository root: `python -m bench.poisoning` (in `make bench-studies`); `--report-only` redraws.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.markdown import machine_line, measured_or_saved, save_figure, write_section
from coordinator.adapters import adapter_kind, plugged_in
from coordinator.compression import EmulatorSpec
from coordinator.compression.recipes import make_emulator
from coordinator.datasets import dataset_path, prepare_datasets
from coordinator.defaults import DEFAULT_EMULATOR, DEFAULT_KEEP
from coordinator.emulator import Split
from coordinator.evaluation.selection import carve_validation
from coordinator.fleet.aggregate import federated_average
from coordinator.fleet.robust import AggregationRule
from coordinator.models import load_model
from coordinator.results import DeviceResult
from coordinator.tasks import make_task
from coordinator.train import TrainConfig, train
from edge_runtime.data import load_examples
from edge_runtime.manifest import ResultMetrics, read_metrics

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results" / "poisoning.json"
PLOT = REPO / "bench" / "results" / "poisoning.png"
# LoRA r=8 at the rate and step count bench.adapter_kinds chose on validation (lr 1e-3, best at step 100).
DEVICES, STEPS, LR, KIND = 10, 100, 1e-3, "lora:r=8"
VALIDATION = 600
RULES = ("fedavg", "median", "trimmed-mean:0.2", "krum:f=1")
ATTACKS = ("none", "scaled", "random", "examples")


def _metrics(examples: int) -> ResultMetrics:
    """A device run's metrics as FedAvg reads them (kind and example count)."""
    record = {
        "format": "offsite-edge/result", "schema": 1, "model": {"name": "smollm2-135m", "sha256": "0" * 64,
        "num_layers": 30}, "emulator": {"recipe": "greedy", "source_num_layers": 30, "layer_map": [], "bottom": 2,
        "top": 2}, "backend": "torch", "steps": STEPS, "samples": STEPS * 8, "examples": examples,
        "first_loss": 0.0, "final_loss": 0.0, "loss_curve": [], "wall_seconds": 0.0, "peak_memory_bytes": 0,
        "adapter_kind": "lora",
    }  # fmt: skip
    return read_metrics(json.dumps(record))


def _attacked(results: list[DeviceResult], start: dict[str, torch.Tensor], attack: str) -> list[DeviceResult]:
    """The ten results with the last device's replaced by the attack's."""
    if attack == "none":
        return results
    honest = results[-1]
    update = {name: tensor - start[name] for name, tensor in honest.weights.items()}
    norm = float(torch.sqrt(sum(u.pow(2).sum() for u in update.values())))
    if attack == "random":
        generator = torch.Generator().manual_seed(1)
        noise = {name: torch.randn(u.shape, generator=generator) for name, u in update.items()}
        scale = 10 * norm / float(torch.sqrt(sum(n.pow(2).sum() for n in noise.values())))
        weights = {name: start[name] + scale * n for name, n in noise.items()}
        return [*results[:-1], DeviceResult(weights, honest.metrics)]
    factor = -10.0 if attack == "scaled" else -1.0
    weights = {name: start[name] + factor * u for name, u in update.items()}
    metrics = honest.metrics if attack == "scaled" else replace(honest.metrics, examples=10**9)
    return [*results[:-1], DeviceResult(weights, metrics)]


def measure(limit_test: int) -> dict:
    prepare_datasets()
    loaded = load_model("smollm2-135m")
    train_examples = load_examples(dataset_path("sentiment", "train"))
    test_examples = load_examples(dataset_path("sentiment", "test"))[:limit_test]
    rest, _ = carve_validation(train_examples, test_examples, VALIDATION)
    task = make_task(loaded.tokenizer, rest, test_examples)
    spec = EmulatorSpec.parse(DEFAULT_EMULATOR, DEFAULT_KEEP)
    emulator = make_emulator(loaded.model, Split(2, 2, keep=DEFAULT_KEEP), spec, loaded.tokenizer)
    kind = adapter_kind(KIND)
    attached = kind.attach(emulator, 2, 2)
    start = {name: p.detach().clone() for name, p in attached.items()}
    results, began = [], time.perf_counter()
    for device in range(DEVICES):
        shard = rest[device::DEVICES]
        with torch.no_grad():
            for name, parameter in attached.items():
                parameter.copy_(start[name])
        config = TrainConfig(STEPS, LR, batch_size=8, max_length=task.max_length, seed=device)
        train(emulator, attached.values(), task, shard, config, f"device {device + 1}/{DEVICES}")
        weights = {name: p.detach().clone() for name, p in attached.items()}
        results.append(DeviceResult(weights, _metrics(len(shard))))
    training_seconds = round(time.perf_counter() - began, 1)

    def plug_in_accuracy(weights: dict[str, torch.Tensor]) -> float:
        with plugged_in(kind, loaded.model, weights, 2, 2):
            return task.score(loaded.model, test_examples, 16)

    table = {"zero_shot": plug_in_accuracy(start)}
    for attack in ATTACKS:
        fleet = _attacked(results, start, attack)
        for rule in RULES:
            table[f"{attack}/{rule}"] = plug_in_accuracy(federated_average(fleet, AggregationRule.parse(rule)))
            print(f"{attack:>8} {rule:>16}: {100 * table[f'{attack}/{rule}']:.1f} %", flush=True)
    return {
        "machine": machine_line(),
        "devices": DEVICES,
        "steps": STEPS,
        "lr": LR,
        "kind": KIND,
        "emulator": spec.label(),
        "test_examples": len(test_examples),
        "training_seconds": training_seconds,
        "accuracy": table,
    }


def _plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(RULES)
    for index, rule in enumerate(RULES):
        values = [100 * results["accuracy"][f"{attack}/{rule}"] for attack in ATTACKS]
        axes.bar([a + index * width for a in range(len(ATTACKS))], values, width, label=rule)
    axes.axhline(100 * results["accuracy"]["zero_shot"], color="black", linestyle=":", label="zero-shot")
    axes.set_xticks([a + 0.4 - width / 2 for a in range(len(ATTACKS))], ATTACKS)
    axes.set_ylabel("plug-in accuracy (%)")
    axes.set_title(f"one attacker among {results['devices']} devices, per aggregation rule")
    axes.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, PLOT)


def report(results: dict) -> str:
    _plot(results)
    accuracy = results["accuracy"]
    lines = [
        "## Poisoning: one attacker among ten devices, per aggregation rule",
        "",
        f"Command: `{results.get('command', 'python -m bench.poisoning')}` (part of `make bench-studies`).",
        f"Machine: {results['machine']}.",
        "",
        f"{results['devices']} devices each train `{results['kind']}` (lr {results['lr']:g}, the rate and step "
        f"count bench.adapter_kinds chose on validation) for {results['steps']} steps, batch 8, through `"
        f"{results['emulator']}`, each on its own tenth of the movie-review training file (validation reviews "
        "carved off); one round. Then the last device is replaced by an attacker: `scaled` sends its update "
        "reversed ×10, `random` Gaussian noise of ten times its norm, `examples` its update reversed while claiming "
        "10⁹ examples (the coordinator caps a claim at the announced dataset size; the cap is off here to show what "
        f"it prevents). Plug-in accuracy (%) on the first {results['test_examples']} test reviews; zero-shot "
        f"{100 * accuracy['zero_shot']:.1f} %.",
        "",
        "| attack | " + " | ".join(RULES) + " |",
        "| --- | " + " | ".join("---:" for _ in RULES) + " |",
    ]
    for attack in ATTACKS:
        cells = " | ".join(f"{100 * accuracy[f'{attack}/{rule}']:.1f}" for rule in RULES)
        lines.append(f"| {attack} | {cells} |")
    clean = accuracy["none/fedavg"]
    worst = {rule: min(accuracy[f"{attack}/{rule}"] for attack in ATTACKS[1:]) for rule in RULES}
    lines += [
        "",
        "Worst attacked plug-in against the clean FedAvg aggregate ("
        + ", ".join(f"{rule} {100 * (worst[rule] - clean):+.1f}" for rule in RULES)
        + " points).",
        "",
        "![poisoning](bench/results/poisoning.png)",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-test", type=int, default=500, help="test reviews each aggregate is scored on")
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the saved results")
    args = parser.parse_args()
    results = measured_or_saved(OUT, "bench.poisoning", args.report_only, lambda: measure(args.limit_test))
    write_section("poisoning", report(results))


if __name__ == "__main__":
    main()
