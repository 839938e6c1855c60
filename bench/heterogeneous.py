"""A heterogeneous fleet's accuracy (SmolLM2-135M, sentiment): each device's own configuration against the best
single configuration every device could run, both chosen by the same search for the same three devices.

    python -m bench.heterogeneous [--deadline 600] [--steps 400] [--rounds 1] [--seeds 0 1 2] [--report-only]

Three devices announce the Raspberry Pi 5, Jetson Orin Nano and Jetson AGX Orin profiles; `fleet dispatch
--per-device --deadline S` chooses each one's configuration (`coordinator.fleet.configure`, the profiles' prior
throughput). Each setting then runs its rounds for real on this machine: every device trains its adapter (PyTorch,
the reference the device backends are checked against) through its chosen emulator for its steps, on its own
shard of the training file, from the last aggregate; FedAvg by examples; the aggregate plugged into the full model
is scored on the whole test split. Only the deadline is simulated (a device's time is its profile's, not this
machine's); no choice here looks at the test split.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.markdown import machine_line, save_figure, write_section
from coordinator.adapters import plugged_in
from coordinator.adapters.layers import LayerAdapter, adapter_parameters, adapter_state, plug_in, weighted_mean
from coordinator.compression import EmulatorSpec, make_emulator
from coordinator.datasets import dataset_path
from coordinator.emulator import Split
from coordinator.fleet.configure import Choice, Fleet, configure
from coordinator.fleet.cost import prior_throughput
from coordinator.fleet.jobs import JobSpec
from coordinator.models import load_model
from coordinator.options import add_request_options, request_from_args
from coordinator.tasks import make_task
from coordinator.train import TrainConfig, train
from device_profiles import load_profile
from edge_runtime.data import Example, load_examples
from edge_runtime.files import write_json_atomic

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results" / "heterogeneous.json"
DEVICES = {"pi": "raspberry-pi-5-8gb", "nano": "jetson-orin-nano-8gb", "agx": "jetson-agx-orin-64gb"}
EVAL_BATCH = 16


def shards(examples: list[Example], count: int, seed: int = 0) -> list[list[Example]]:
    """The training file dealt into `count` private shards of unequal size (2:3:4 for three)."""
    shuffled = examples[:]
    random.Random(seed).shuffle(shuffled)
    weights = [count - 1 + i for i in range(count)]
    bounds = [round(len(shuffled) * sum(weights[:i]) / sum(weights)) for i in range(count + 1)]
    return [shuffled[bounds[i] : bounds[i + 1]] for i in range(count)]


def run_setting(
    name: str, choices: dict[str, Choice], loaded: Any, split: Split, data: dict[str, list[Example]], task: Any,
    test: list[Example], rounds: int, training: TrainConfig,
) -> dict[str, Any]:  # fmt: skip
    """`rounds` federated rounds with each device on its `choices` entry; the plug-in score after each."""
    emulators: dict[str, Any] = {}
    aggregate: dict[str, torch.Tensor] | None = None
    scores, trained_seconds = [], 0.0
    for round_ in range(1, rounds + 1):
        weights, examples = [], []
        for device, choice in sorted(choices.items()):
            if choice.candidate.adapter_kind != "layers":
                raise SystemExit(f"{device} chose a {choice.candidate.adapter_kind} adapter; this study trains layers")
            spec = EmulatorSpec.parse(choice.candidate.emulator, split.keep)
            if choice.candidate.emulator not in emulators:
                emulators[choice.candidate.emulator] = make_emulator(loaded.model, split, spec, loaded.tokenizer)
            emulator, device_split = emulators[choice.candidate.emulator], spec.split_for(split)
            adapter = adapter_parameters(emulator, device_split.bottom, device_split.top)
            initial = adapter_state(emulator, device_split.bottom, device_split.top)
            plug_in(emulator, aggregate if aggregate is not None else initial)
            config = replace(training, steps=choice.steps)  # the job's batch, length and rate; the device's steps
            start = time.perf_counter()
            train(emulator, adapter.values(), task, data[device], config, f"{name} r{round_} {device}")
            trained_seconds += time.perf_counter() - start
            weights.append(adapter_state(emulator, device_split.bottom, device_split.top))
            examples.append(len(data[device]))
            plug_in(emulator, initial)  # the emulator goes back to its own adapter for the next device
        aggregate = weighted_mean(weights, [n / sum(examples) for n in examples])  # FedAvg by examples, as the service
        with plugged_in(LayerAdapter(), loaded.model, aggregate, split.bottom, split.top):
            scores.append(task.score(loaded.model, test, EVAL_BATCH))
        print(f"{name} round {round_}: plug-in {scores[-1]:.4f}", flush=True)
    devices = {
        d: {"profile": c.profile, "emulator": c.candidate.label(), "steps": c.steps, "round_seconds": c.round_seconds}
        for d, c in sorted(choices.items())
    }
    return {
        "devices": devices,
        "plug_in": scores,
        "train_seconds_here": trained_seconds,
    }


def measure(deadline: float, steps: int, rounds: int, seeds: list[int]) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    add_request_options(parser, steps=steps)
    request = request_from_args(parser.parse_args([]))  # what `fleet dispatch` sends by default
    spec = JobSpec("reviews", request, rounds, per_device=True, deadline_s=deadline)
    loaded = load_model(request.model)
    train_examples = load_examples(dataset_path("sentiment", "train"))
    test = load_examples(dataset_path("sentiment", "test"))
    task = make_task(loaded.tokenizer, train_examples, test)
    profiles = {device: load_profile(name) for device, name in DEVICES.items()}
    throughputs = {device: prior_throughput(profile) for device, profile in profiles.items()}
    fleet = Fleet(profiles, dict.fromkeys(DEVICES, "ort"), throughputs)
    configuration = configure(loaded, spec, fleet)
    if configuration.left_out or not configuration.fixed:
        raise SystemExit(f"--deadline {deadline:g} leaves out {configuration.left_out} or fits no single configuration")
    for name, choices in (("per-device", configuration.chosen), ("one for all", configuration.fixed)):
        print("\n".join(f"{name}, {device}: {choice.describe()}" for device, choice in sorted(choices.items())))
    split = Split(*request.adapter_layers, keep=request.keep)
    zero_shot = task.score(loaded.model, test, EVAL_BATCH)
    print(f"zero-shot {zero_shot:.4f}", flush=True)
    settings: dict[str, dict[str, Any]] = {}
    for seed in seeds:  # a seed deals the shards and orders each device's data
        data = dict(zip(sorted(DEVICES), shards(train_examples, len(DEVICES), seed), strict=True))
        training = replace(request.training, seed=seed)
        for name, choices in (("per-device", configuration.chosen), ("one for all", configuration.fixed)):
            run = run_setting(f"{name} seed {seed}", choices, loaded, split, data, task, test, rounds, training)
            setting = settings.setdefault(name, {"devices": run["devices"], "by_seed": {}, "train_seconds_here": 0})
            setting["by_seed"][str(seed)] = run["plug_in"]
            setting["train_seconds_here"] += run["train_seconds_here"]
    for setting in settings.values():
        setting["train_seconds_here"] = round(setting["train_seconds_here"], 1)
        runs = list(setting["by_seed"].values())
        setting["plug_in"] = [sum(run[r] for run in runs) / len(runs) for r in range(rounds)]  # the mean
    return {
        "machine": machine_line(),
        "deadline": deadline,
        "steps": steps,
        "rounds": rounds,
        "seeds": seeds,
        "test_examples": len(test),
        "shards": {device: len(examples) for device, examples in data.items()},
        "zero_shot": zero_shot,
        "settings": settings,
    }


def report(results: dict[str, Any]) -> str:
    rounds, count = results["rounds"], len(results.get("seeds", [0]))
    seeds = f" (mean of {count} seeds, lowest–highest)" if count > 1 else ""
    lines = [
        "| configuration | " + " | ".join(f"{d} ({DEVICES[d]})" for d in sorted(DEVICES)) + " | "
        + " | ".join(f"plug-in after round {r}{seeds}" for r in range(1, rounds + 1)) + " |",
        "| --- | " + " | ".join("---" for _ in DEVICES) + " | " + " | ".join("---" for _ in range(rounds)) + " |",
    ]  # fmt: skip
    for name, setting in results["settings"].items():
        devices = [f"{v['emulator']}, {v['steps']} steps ({v['round_seconds']:.0f} s)" for _, v in
                   sorted(setting["devices"].items())]  # fmt: skip
        scores = [_score(setting, r) for r in range(rounds)]
        lines.append(f"| {name} | " + " | ".join(devices) + " | " + " | ".join(scores) + " |")
    lines.append(f"| full model zero-shot | | | | {100 * results['zero_shot']:.1f} % |" + " |" * (rounds - 1))
    return "\n".join(lines)


def _by_seed(setting: dict[str, Any]) -> list[list[float]]:
    return list(setting.get("by_seed", {"0": setting["plug_in"]}).values())  # one seed, before seeds were kept


def _score(setting: dict[str, Any], round_: int) -> str:
    """The mean after `round_` (0-based), with the lowest and highest seed's where there were several."""
    values = [run[round_] for run in _by_seed(setting)]
    spread = f" ({100 * min(values):.1f}–{100 * max(values):.1f})" if len(values) > 1 else ""
    return f"{100 * sum(values) / len(values):.1f} %{spread}"


def _plot(saved: dict[str, Any], path: Path) -> None:
    """Per measured command line, each setting's plug-in accuracy after its last round, beside zero-shot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.8))
    labels = list(saved)
    names = sorted({name for results in saved.values() for name in results["settings"]})
    width = 0.8 / len(names)
    for offset, name in enumerate(names):
        heights = [100 * saved[label]["settings"][name]["plug_in"][-1] for label in labels]
        lasts = [[100 * run[-1] for run in _by_seed(saved[label]["settings"][name])] for label in labels]
        spread = [[h - min(v) for h, v in zip(heights, lasts, strict=True)],
                  [max(v) - h for h, v in zip(heights, lasts, strict=True)]]  # fmt: skip
        positions = [i + (offset - (len(names) - 1) / 2) * width for i in range(len(labels))]
        bars = axis.bar(positions, heights, width, label=name, yerr=spread, capsize=3)
        axis.bar_label(bars, fmt="%.1f", fontsize=8)
    zero_shot = 100 * next(iter(saved.values()))["zero_shot"]
    axis.axhline(zero_shot, color="grey", linestyle=":", label=f"full model zero-shot ({zero_shot:.1f})")
    axis.set_xticks(range(len(labels)), [label.replace(" --rounds", "\n--rounds") for label in labels], fontsize=8)
    axis.set_ylim(60, 95)
    axis.set_ylabel("plug-in accuracy after the last round (%)")
    axis.set_title("Pi 5 + Orin Nano + AGX Orin: each device's configuration vs one for all")
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    save_figure(figure, path)


def _label(results: dict[str, Any]) -> str:
    seeds = results.get("seeds", [0])
    label = f"--deadline {results['deadline']:g} --steps {results['steps']} --rounds {results['rounds']}"
    return label + (f" --seeds {' '.join(map(str, seeds))}" if seeds != [0] else "")


def publish(saved: dict[str, Any]) -> None:
    """Every measured command line's table, and all of them in one plot."""
    latest = saved[next(reversed(saved))]
    _plot(saved, OUT.with_suffix(".png"))
    tables = []
    for label, results in saved.items():
        tables += [f"`python -m bench.heterogeneous {label}` ({results['machine']}):", "", report(results), ""]
    print("\n".join(tables))
    results = latest
    body = "\n".join(
        [
            "## Heterogeneous fleet: each device's own configuration vs one for all (SmolLM2-135M, sentiment)",
            "",
            "Three devices with the Raspberry Pi 5, Jetson Orin Nano and Jetson AGX Orin profiles; `fleet dispatch "
            "--per-device --deadline S --steps N` with every other option at its default (the default emulator "
            "and 2+2 layer adapter). The same search "
            "(`coordinator/fleet/configure.py`, the profiles' prior throughput, 70 % of the deadline for training) "
            "gives each device's configuration and the best single one every device could run (the slowest "
            "device's steps for all). Each then ran for real here: every device trains through its emulator for "
            "its steps on its own shard of the training file (shards of "
            + ", ".join(f"{n:,}" for n in results["shards"].values())
            + " reviews), from the last aggregate; FedAvg by examples; the aggregate plugged into the full model is "
            f"scored on the whole test split ({results['test_examples']:,} reviews). Only the devices' time is "
            "simulated (their profiles', in parentheses: the predicted training seconds per round).",
            "",
            *tables,
            "Reading: the search scores a device's steps by what a round of three devices' complete runs "
            "returns (`bench.steps_curve --devices 3`: 76 % at 20 and 30 steps, 77 % at 40, 73 % at 80, 83 % at "
            "200 on validation; a single device's runs: 66 % at 40, 78 % at 80, 87 % at 200) and may give a "
            "device fewer steps than fit. At 400 steps (600 s) it gives the AGX and the Orin Nano 400 and the Pi "
            "the 109 that fit: the per-device aggregate scores 87.1 % against 84.1 % for one configuration at the "
            "Pi's 109 steps. At 80 steps (165 s) every choice is expected below the untrained model, and `fleet "
            "status` says so; it gives 40/40/30 steps against 30 each. Over three seeds (each deals the shards and "
            "orders the data) the per-device job leads after one round with a narrower spread, and both are back "
            "at zero-shot after two: so short a round does not pay, however the steps are spread. (Earlier "
            "searches gave this setting 80/80/20 against 20 each, scored by one device's runs: 82.2 % against "
            "81.0 % after two rounds, 78.8–84.2 against 80.7–81.3; and 80/80/30 against 30, scored by step 80 of "
            "a 400-step run, which lost on one seed, 75.2 % against 82.7 %.)",
            "",
            f"![plug-in accuracy per setting](bench/results/{OUT.with_suffix('.png').name})",
        ]
    )
    write_section("heterogeneous", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds a round may take on the devices")
    parser.add_argument("--steps", type=int, default=400, help="the job's steps per device per round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="repeats: each deals and orders the data")
    parser.add_argument("--report-only", action="store_true", help="rewrite the tables and plot from saved results")
    args = parser.parse_args()
    saved = json.loads(OUT.read_text()) if OUT.exists() else {}
    if args.report_only:
        if not saved:
            raise SystemExit(f"no saved results in {OUT}: run python -m bench.heterogeneous first")
        publish(saved)
        return
    results = measure(args.deadline, args.steps, args.rounds, sorted(set(args.seeds)))
    saved.pop(_label(results), None)
    saved[_label(results)] = results  # the latest last
    write_json_atomic(OUT, saved)
    publish(saved)


if __name__ == "__main__":
    main()
