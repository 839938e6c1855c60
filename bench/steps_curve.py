"""What a device's adapter is worth after a whole run of N steps: the utility per-device configuration chooses by.

    python -m bench.steps_curve [--emulator SPEC] [--steps 20 40 80 120 200 400] [--seeds 0 1] [--devices K]
                                [--report-only]

A device trains its adapter for the steps it was given, with the learning-rate schedule (warm-up, then linear
decay to zero) spread over those steps, and returns the last adapter. So the utility of N steps is the plug-in
accuracy of a complete N-step run, not that of step N of a longer run (`bench.recipe_choice`'s checkpoints, taken
mid-schedule, at the highest learning rate). For each N and seed: the job's default 2+2 layer adapter, trained
from the full model's layers through the emulator on the training file less 600 carved validation reviews,
plugged into the full model and scored on those 600. No test review is read. `python -m bench.utility_table` then
writes the mean curve into `coordinator/fleet/utility_table.json` ("runs").

With `--devices K` (K > 1) the training file is dealt into K private shards (2:3:4 for three, as
`bench.heterogeneous`; a seed deals them), every device runs its N steps on its own shard, and the curve is the
FedAvg aggregate's (by examples, as the service): what one round of a K-device job returns ("aggregates"). Each
device's own adapter is scored beside it, to show what averaging does to short runs.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.heterogeneous import shards
from bench.markdown import machine_line, measuring_command, save_figure, write_section
from coordinator.adapters import plugged_in
from coordinator.adapters.layers import LayerAdapter, adapter_parameters, adapter_state, plug_in, weighted_mean
from coordinator.compression import EmulatorSpec, make_emulator
from coordinator.datasets import dataset_path
from coordinator.emulator import Split
from coordinator.evaluation.selection import carve_validation
from coordinator.models import load_model
from coordinator.options import add_request_options, request_from_args
from coordinator.tasks import make_task
from coordinator.train import train
from edge_runtime.data import load_examples
from edge_runtime.files import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results" / "steps_curve"
VALIDATION = 600  # as bench.recipe_choice and `coordinator evaluate --validation 600`


def out_path(spec: str, devices: int = 1) -> Path:
    stem = re.sub(r"[^A-Za-z0-9]+", "_", spec).strip("_")
    return RESULTS / (stem + (f"_devices_{devices}" if devices > 1 else "") + ".json")


def measure(emulator_text: str | None, steps: list[int], seeds: list[int], devices: int = 1) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    add_request_options(parser)
    request = request_from_args(parser.parse_args(["--emulator", emulator_text] if emulator_text else []))
    loaded = load_model(request.model)
    rest, validation = carve_validation(
        load_examples(dataset_path("sentiment", "train")), load_examples(dataset_path("sentiment", "test")), VALIDATION
    )
    task = make_task(loaded.tokenizer, rest, validation)
    split = Split(*request.adapter_layers, keep=request.keep)
    spec = EmulatorSpec.parse(request.emulator, split.keep)
    emulator = make_emulator(loaded.model, split, spec, loaded.tokenizer)
    device_split = spec.split_for(split)
    adapter = adapter_parameters(emulator, device_split.bottom, device_split.top)
    initial = adapter_state(emulator, device_split.bottom, device_split.top)
    full_zero_shot = task.score(loaded.model, validation, 16)
    runs: dict[int, dict[int, float]] = {}
    singles: dict[int, dict[int, list[float]]] = {}  # with several devices: each device's own adapter

    def score(state: dict[str, Any]) -> float:
        with plugged_in(LayerAdapter(), loaded.model, state, split.bottom, split.top):
            return task.score(loaded.model, validation, 16)

    seconds = 0.0
    for seed in seeds:
        data = shards(rest, devices, seed) if devices > 1 else [rest]
        for count in steps:
            config = replace(request.training, steps=count, seed=seed)
            trained = []
            for device, examples in enumerate(data):
                plug_in(emulator, initial)
                start = time.perf_counter()
                label = f"{count} steps, seed {seed}" + (f", device {device + 1}/{devices}" if devices > 1 else "")
                train(emulator, adapter.values(), task, examples, config, label)
                seconds += time.perf_counter() - start
                trained.append(adapter_state(emulator, device_split.bottom, device_split.top))
            if devices > 1:
                singles.setdefault(count, {})[seed] = [score(state) for state in trained]
            sizes = [len(examples) for examples in data]
            runs.setdefault(count, {})[seed] = score(weighted_mean(trained, [n / sum(sizes) for n in sizes]))
            print(f"{count} steps, seed {seed}: plug-in {runs[count][seed]:.4f}", flush=True)
    plug_in(emulator, initial)
    curve = [[0, full_zero_shot]] + [[n, sum(runs[n].values()) / len(runs[n])] for n in steps]
    return {
        "command": measuring_command("bench.steps_curve"),
        "machine": machine_line(),
        "spec": spec.label(),
        "adapter": request.adapter_kind,
        "lr": request.training.lr,
        "batch_size": request.training.batch_size,
        "validation_examples": len(validation),
        "devices": devices,
        "full_zero_shot": full_zero_shot,
        "runs": {str(n): {str(s): v for s, v in by_seed.items()} for n, by_seed in runs.items()},
        "singles": {str(n): {str(s): v for s, v in by_seed.items()} for n, by_seed in singles.items()},
        "curve": curve,
        "train_seconds": round(seconds, 1),
    }


def _checkpoints(spec: str) -> list[list[float]] | None:
    """The same recipe's curve at checkpoints of one 400-step run (`bench.recipe_choice`), where saved."""
    path = RESULTS.parent / "recipe_choice" / out_path(spec).name
    return json.loads(path.read_text())["plugin_curve"] if path.is_file() else None


def _plot(results: dict[str, Any], beside: tuple[str, list[list[float]]] | None, path: Path) -> None:
    """The mean curve with each seed's dots (and each device's own adapter, for a fleet), `beside` dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = results.get("devices", 1)
    figure, axis = plt.subplots(figsize=(7, 3.8))
    for count, by_seed in results.get("singles", {}).items():
        own = [100 * v for values in by_seed.values() for v in values]
        axis.scatter([int(count)] * len(own), own, color="tab:grey", marker="x", s=14)
    if results.get("singles"):
        axis.scatter([], [], color="tab:grey", marker="x", s=14, label="each device's own adapter")
    for count, by_seed in results["runs"].items():
        axis.scatter([int(count)] * len(by_seed), [100 * v for v in by_seed.values()], color="tab:blue", s=12)
    steps, values = zip(*results["curve"], strict=True)
    what = f"FedAvg of {devices} devices' N-step runs" if devices > 1 else "complete runs of N steps"
    axis.plot(steps, [100 * v for v in values], marker="o", label=f"{what} (mean; dots: seeds)")
    if beside:
        steps, values = zip(*beside[1], strict=True)
        axis.plot(steps, [100 * v for v in values], linestyle="--", label=beside[0])
    axis.axhline(100 * results["full_zero_shot"], color="grey", linestyle=":", label="full model, untrained")
    axis.set_xlabel("steps per device" if devices > 1 else "steps")
    axis.set_ylabel("plug-in validation accuracy (%)")
    rounds = f"One round of {devices} devices" if devices > 1 else "What N steps"
    axis.set_title(f"{rounds} through {results['spec']}" + ("" if devices > 1 else " are worth"))
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    save_figure(figure, path)


def publish(results: dict[str, Any]) -> None:
    if results.get("devices", 1) > 1:
        publish_fleet(results)
        return
    checkpoints = dict(_checkpoints(results["spec"]) or [])
    plot = out_path(results["spec"]).with_suffix(".png")
    points = [[int(s), v] for s, v in checkpoints.items()]
    _plot(results, ("step N of one 400-step run", points) if points else None, plot)
    seeds = sorted({seed for by_seed in results["runs"].values() for seed in by_seed})
    lines = [
        "| steps | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | step N of one 400-step run |",
        "| --- | " + " | ".join("---" for _ in seeds) + " | --- | --- |",
        f"| 0 (untrained) | {' | '.join('' for _ in seeds)} | {100 * results['full_zero_shot']:.1f} % | |",
    ]
    for count, mean in results["curve"][1:]:
        values = [results["runs"][str(count)].get(str(s)) for s in seeds]
        cells = [f"{100 * v:.1f} %" if v is not None else "" for v in values]
        at = checkpoints.get(count)
        lines.append(f"| {count} | {' | '.join(cells)} | {100 * mean:.1f} % | {f'{100 * at:.1f} %' if at else ''} |")
    body = "\n".join(
        [
            f"## What N steps are worth: complete device runs ({results['spec']}, {results['adapter']} adapter)",
            "",
            f"`{results['command']}` ({results['machine']}). Plug-in accuracy on {results['validation_examples']} "
            "validation reviews carved from the training file, of the last adapter of a complete run of N steps "
            "(the learning-rate schedule spread over those N, as a device given N steps trains), beside step N of "
            "one 400-step run where `bench.recipe_choice` saved it. Per-device configuration chooses steps by the "
            'mean (`coordinator/fleet/utility_table.json`, "runs").',
            "",
            *lines,
            "",
            f"![complete runs against checkpoints](bench/results/steps_curve/{plot.name})",
        ]
    )
    write_section("steps-curve", body)
    print(body)


def publish_fleet(results: dict[str, Any]) -> None:
    """The aggregate's table and plot, beside each device's own adapter and one device's runs where saved."""
    single_path = out_path(results["spec"])
    single = json.loads(single_path.read_text()) if single_path.is_file() else None
    plot = out_path(results["spec"], results["devices"]).with_suffix(".png")
    _plot(results, ("one device, the whole file", single["curve"]) if single else None, plot)
    one = dict(single["curve"]) if single else {}
    seeds = sorted({seed for by_seed in results["runs"].values() for seed in by_seed})
    lines = [
        "| steps per device | "
        + " | ".join(f"aggregate, seed {s}" for s in seeds)
        + " | aggregate, mean | each device's own: mean (lowest–highest) | one device, the whole file |",
        "| --- | " + " | ".join("---" for _ in seeds) + " | --- | --- | --- |",
        f"| 0 (untrained) | {' | '.join('' for _ in seeds)} | {100 * results['full_zero_shot']:.1f} % | | |",
    ]
    for count, mean in results["curve"][1:]:
        cells = [f"{100 * results['runs'][str(count)][str(s)]:.1f} %" for s in seeds]
        own = [v for values in results["singles"][str(count)].values() for v in values]
        own_text = f"{100 * sum(own) / len(own):.1f} % ({100 * min(own):.1f}–{100 * max(own):.1f})"
        at = f"{100 * one[count]:.1f} %" if count in one else ""
        lines.append(f"| {count} | {' | '.join(cells)} | {100 * mean:.1f} % | {own_text} | {at} |")
    body = "\n".join(
        [
            f"## What N steps are worth to a job: one round of {results['devices']} devices ({results['spec']})",
            "",
            f"`{results['command']}` ({results['machine']}). The training file less {results['validation_examples']} "
            f"validation reviews, dealt into {results['devices']} shards (2:3:4; a seed deals them); every device runs "
            "N steps from the full model's layers on its shard; the FedAvg aggregate (by examples) plugged into the "
            "full model and scored on the validation reviews, beside each device's own adapter and one device's "
            "complete runs on the whole file (above). Jobs of several devices choose steps by the aggregate "
            '(`coordinator/fleet/utility_table.json`, "aggregates").',
            "",
            *lines,
            "",
            f"![one round's aggregate against single runs](bench/results/steps_curve/{plot.name})",
        ]
    )
    write_section("steps-curve-fleet", body)
    print(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--emulator", default=None, help="recipe (default: the job's default emulator)")
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 40, 80, 120, 200, 400])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--devices", type=int, default=1, help="devices of a job round, each on its own shard")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table and plot from saved results")
    args = parser.parse_args()
    if args.report_only:
        saved = sorted(RESULTS.glob("*.json"))
        if not saved:
            raise SystemExit(f"no saved results in {RESULTS}: run python -m bench.steps_curve first")
        for path in saved:
            publish(json.loads(path.read_text()))
        return
    if args.devices < 1:
        raise SystemExit(f"--devices {args.devices}: give 1 (one device) or more (one job round)")
    results = measure(args.emulator, sorted(set(args.steps)), args.seeds, args.devices)
    write_json_atomic(out_path(results["spec"], results["devices"]), results)
    publish(results)


if __name__ == "__main__":
    main()
