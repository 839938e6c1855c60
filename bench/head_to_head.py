"""Benchmark: offsite tuning on the device (ORT and PyTorch backends) against full fine-tuning, SmolLM2-135M on
movie-review sentiment, same data, batch, length cap and batch stream: tokens/s, peak memory, time to a target
accuracy, plug-in accuracy, and each configuration's physical memory floor.

Speed and memory ratios are medians of paired runs: each round times full fine-tuning, then every offsite
configuration on both backends, and each offsite run is divided by that round's full run (single runs on this
machine moved by ±40 %). Run alone from the repository root: `python -m bench.head_to_head` (part of `make
bench`); `--report-only` rewrites the section from the saved results.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.floor import full_model_shape, memory_floor
from bench.head_to_head_report import report
from bench.markdown import machine_line, measured_or_saved, measuring_command, write_section
from bench.runs import batch_tokens, device_train, export_bundle, folder_bytes, profiled_train, repeated
from coordinator.datasets import dataset_path, prepare_datasets
from coordinator.defaults import DEFAULT_EMULATOR, DEFAULT_KEEP
from edge_runtime.bundle import TORCH_DIRECTORY
from edge_runtime.files import write_json_atomic
from edge_runtime.manifest import Manifest
from edge_runtime.memory import ModelShape

if TYPE_CHECKING:
    from torch.nn import Parameter
    from transformers import PreTrainedModel

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results" / "head_to_head.json"
BATCH = 8
ADAPTER_LR = 1e-4
FULL_LR = 2e-5


@dataclass(frozen=True)
class Config:
    """One offsite configuration: adapter layers (bottom, top), emulator recipe, middle layers kept, adapter kind,
    and whether the device recomputes layer activations in the backward pass."""

    adapter: tuple[int, int]
    recipe: str
    keep: int
    kind: str = "layers"
    lr: float = ADAPTER_LR
    recompute: bool = False

    @property
    def label(self) -> str:
        kind = "" if self.kind == "layers" else f" · {self.kind}"
        recompute = " · recompute" if self.recompute else ""
        return f"{self.adapter[0]}+{self.adapter[1]}{kind} · {self.recipe} keep {self.keep}{recompute}"

    def export_options(self) -> list[str]:
        adapter = f"{self.adapter[0]},{self.adapter[1]}"
        options = ["--adapter-layers", adapter, "--keep", str(self.keep), "--emulator", self.recipe]
        options += ["--recompute"] if self.recompute else []
        return [*options, "--adapter-kind", self.kind, "--batch-size", str(BATCH), "--lr", str(self.lr)]


CONFIGS = (
    Config((2, 2), "uniform", 8),
    Config((2, 2), "uniform", 4),
    Config((1, 1), "uniform", 8),
    Config((2, 2), "luc:size=0.5", 8),
    Config((2, 2), "lowrank:size=0.5", 8),
    # The small kinds train far fewer weights, so they take a larger step (as the LoRA, BiTFiT and prompt-tuning
    # papers do); a soft prompt's common AdamW rate (peft's examples) is larger still.
    Config((2, 2), "uniform", 8, "lora:r=8", 1e-3),
    Config((2, 2), "uniform", 8, "bias", 1e-3),
    Config((2, 2), "uniform", 8, "prompt:tokens=20", 3e-2),
    # Frozen weights stored as int8 for real, and activations recomputed: at keep 8 and at the default recipe.
    Config((2, 2), "uniform:store=int8", 8),
    Config((2, 2), "uniform:store=int8", 8, recompute=True),
    Config((2, 2), DEFAULT_EMULATOR, DEFAULT_KEEP),
    Config((2, 2), f"{DEFAULT_EMULATOR},store=int8", DEFAULT_KEEP, recompute=True),
)


class Curves:
    """Plug-in accuracy learning curves, trained here in PyTorch with the device's schedule and batch size."""

    def __init__(self, steps: int, every: int, limit_test: int) -> None:
        from coordinator.models import load_model
        from coordinator.tasks import make_task
        from edge_runtime.data import load_examples

        self.loaded = load_model("smollm2-135m")
        self.train_examples = load_examples(dataset_path("sentiment", "train"))
        self.test_examples = load_examples(dataset_path("sentiment", "test"))[:limit_test]
        self.task = make_task(self.loaded.tokenizer, self.train_examples, self.test_examples)
        self.steps, self.every = steps, every
        self.zero_shot = self.score(self.loaded.model)

    def score(self, model: PreTrainedModel) -> float:
        return self.task.score(model, self.test_examples, 16)

    def _train(
        self, model: PreTrainedModel, parameters: Iterable[Parameter], lr: float, on_step: Callable[[int], None]
    ) -> None:
        from coordinator.train import TrainConfig, train

        config = TrainConfig(steps=self.steps, lr=lr, batch_size=BATCH, max_length=self.task.max_length)
        train(model, parameters, self.task, self.train_examples, config, "curve", on_step=on_step)

    def full(self) -> list[tuple[int, float]]:
        """Full fine-tuning's accuracy every `every` steps."""
        tuned = copy.deepcopy(self.loaded.model)
        curve = [(0, self.zero_shot)]

        def on_step(step: int) -> None:
            if step % self.every == 0:
                curve.append((step, self.score(tuned)))

        self._train(tuned, tuned.parameters(), FULL_LR, on_step)
        return curve

    def offsite(self, bundle: Path, lr: float) -> list[tuple[int, float]]:
        """The plug-in's accuracy every `every` steps, the adapter trained through the bundle's own emulator."""
        from coordinator.adapters import adapter_kind_of, plugged_in
        from edge_runtime.adapter_modules import add_adapter
        from edge_runtime.low_rank import load_causal_lm

        manifest = Manifest.from_json((bundle / "manifest.json").read_bytes())
        emulator = load_causal_lm(bundle / TORCH_DIRECTORY)
        names = add_adapter(emulator, manifest.adapter)  # the emulator's names -> full-model names
        kind = adapter_kind_of(manifest.adapter.kind, manifest.adapter.options)
        named = dict(emulator.named_parameters())
        adapter = {full: named[local] for local, full in names.items()}
        full_model = self.loaded.model
        bottom, top = manifest.adapter.bottom, manifest.adapter.top
        curve = [(0, self.zero_shot)]

        def on_step(step: int) -> None:
            if step % self.every == 0:
                with plugged_in(kind, full_model, {n: p.detach() for n, p in adapter.items()}, bottom, top):
                    curve.append((step, self.score(full_model)))

        self._train(emulator, adapter.values(), lr, on_step)
        return curve


def _offsite(root: Path, config: Config, data: Path, steps: int, curves: Curves) -> tuple[dict, Path]:
    """Export the configuration's bundle, profile it and trace its plug-in's curve (timing comes in rounds)."""
    print(f"{config.label}: export, profile, learning curve", flush=True)
    bundle = export_bundle(root, "bundle", config.export_options())
    manifest = Manifest.from_json((bundle / "manifest.json").read_bytes())
    result = {
        "label": config.label,
        "adapter": list(config.adapter),
        "recipe": config.recipe,
        "keep": config.keep,
        "recompute": config.recompute,
        "shape": manifest.plan.shape.to_dict(),
        "bundle_bytes": folder_bytes(bundle),
        "profile": profiled_train(bundle, data, "adapter", steps, root / "profile.json"),
        "kind": config.kind,
        "lr": config.lr,
        "curve": curves.offsite(bundle, config.lr),
    }
    return result | {"tokens": batch_tokens(bundle, data, steps)}, bundle


def _paired(runs: list[dict], full_runs: list[dict]) -> dict:
    """Medians of a configuration's runs, and of each run's speed and memory against its round's full run."""
    speed = [
        full["step_seconds_median"] / run["step_seconds_median"] for run, full in zip(runs, full_runs, strict=True)
    ]
    memory = [full["peak_memory_bytes"] / run["peak_memory_bytes"] for run, full in zip(runs, full_runs, strict=True)]
    return repeated(runs) | {"speed_ratios": speed, "memory_ratios": memory}


def measure(
    steps: int, pairs: int, curve_steps: int, every: int, limit_test: int, configs: tuple[Config, ...] = CONFIGS
) -> dict:
    """Each offsite configuration's export, profile and curve; then `pairs` rounds of timed runs, each round full
    fine-tuning first and every offsite configuration after it on both backends; one process per run."""
    prepare_datasets()
    data = dataset_path("sentiment", "train")
    curves = Curves(curve_steps, every, limit_test)
    offsite, bundles = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for config in configs:
            root = Path(scratch) / config.label.replace(" ", "").replace("·", "-").replace(":", "-")
            result, bundle = _offsite(root, config, data, steps, curves)
            offsite.append(result)
            bundles.append(bundle)
        first = bundles[0]
        print("full fine-tuning: profile, learning curve", flush=True)
        full = {"profile": profiled_train(first, data, "full", steps, first.parent / "full.json")}
        if configs == CONFIGS:  # a re-measured row keeps the saved run's full fine-tuning curve
            full |= {"curve": curves.full()}
        full |= {"tokens": offsite[0]["tokens"]}  # the same batch stream
        full_runs, runs = [], {(i, b): [] for i in range(len(bundles)) for b in ("ort", "torch")}
        for round_ in range(pairs):
            print(f"timed round {round_ + 1} of {pairs}", flush=True)
            full_runs.append(profiled_train(first, data, "full", steps, first.parent / f"full-{round_}.json"))
            for (index, backend), done in runs.items():
                out = bundles[index].parent / f"{backend}-{round_}"
                done.append(device_train(bundles[index], data, backend, steps, out))
                shutil.rmtree(out)
    full |= repeated(full_runs)
    for index, result in enumerate(offsite):
        result["backends"] = {b: _paired(runs[(index, b)], full_runs) for b in ("ort", "torch")}
    model = curves.loaded.model
    shape = ModelShape(**offsite[0]["shape"])
    full_shape = full_model_shape(shape, sum(p.numel() for p in model.parameters()), model.config.num_hidden_layers)
    full["shape"] = full_shape.to_dict()
    for result in [full, *offsite]:
        result["floor"] = memory_floor(ModelShape(**result["shape"]), BATCH, result["tokens"]["widest"])
    return {
        "machine": machine_line(),
        "batch_size": BATCH,
        "max_length": curves.task.max_length,
        "steps": steps,
        "pairs": pairs,
        "curve": {"steps": curve_steps, "every": every, "test_examples": limit_test, "zero_shot": curves.zero_shot},
        "lr": {"adapter": ADAPTER_LR, "full": FULL_LR},
        "full": full,
        "offsite": offsite,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per device run")
    parser.add_argument("--pairs", type=int, default=5, help="timed rounds (full, then every offsite run)")
    parser.add_argument("--curve-steps", type=int, default=60, help="training steps of each learning curve")
    parser.add_argument("--every", type=int, default=20, help="score the plug-in every this many steps")
    parser.add_argument("--limit-test", type=int, default=300, help="test reviews each point is scored on")
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the saved results")
    parser.add_argument(
        "--only",
        action="append",
        metavar="LABEL",
        help="re-measure only this configuration (its table label, e.g. '2+2 · uniform keep 8'; repeatable), paired "
        "with full fine-tuning runs of its own, into the saved results; the other rows stay as saved",
    )
    args = parser.parse_args()
    chosen = _chosen(args.only) if args.only else CONFIGS
    results = measured_or_saved(
        OUT,
        "bench.head_to_head",
        args.report_only or bool(args.only),
        lambda: measure(args.steps, args.pairs, args.curve_steps, args.every, args.limit_test),
    )
    if args.only and not args.report_only:
        again = measure(args.steps, args.pairs, args.curve_steps, args.every, args.limit_test, chosen)
        results = merge_remeasured(results, again | {"command": measuring_command("bench.head_to_head")})
        write_json_atomic(OUT, results)
    write_section("head_to_head", report(results))


def _chosen(labels: list[str]) -> tuple[Config, ...]:
    known = {config.label: config for config in CONFIGS}
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise SystemExit(f"--only {unknown[0]!r} is not a configuration here; one of: {', '.join(known)}")
    return tuple(known[label] for label in labels)


def merge_remeasured(saved: dict, again: dict) -> dict:
    """`saved` with each configuration of `again` in place of its saved row, marked with the command that re-measured
    it and its own full fine-tuning runs' medians (its ratios are to those runs, as every row's are to its own)."""
    merged = copy.deepcopy(saved)
    rows = {row["label"]: index for index, row in enumerate(merged["offsite"])}
    full = {key: again["full"][key] for key in ("step_seconds_median", "peak_memory_bytes")}
    for row in again["offsite"]:
        row = row | {"remeasured": {"command": again["command"], "pairs": again["pairs"], "full": full}}
        if row["label"] in rows:
            merged["offsite"][rows[row["label"]]] = row
        else:
            merged["offsite"].append(row)
    return merged


if __name__ == "__main__":
    main()
