"""The five Offsite-Tuning settings, measured together on one task: zero-shot, fine-tune, offsite, plug-in."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from coordinator.adapters import AdapterKind, adapter_kind, check_layer_window, plugged_in
from coordinator.adapters.files import save_adapter
from coordinator.adapters.layers import adapter_exits, adapter_windows, plug_in
from coordinator.architectures import decoder_layers
from coordinator.compression import EmulatorSpec, make_emulator
from coordinator.emulator import Split, count_parameters, emulator_record
from coordinator.errors import ConfigError
from coordinator.evaluation.exits import exit_views
from coordinator.evaluation.selection import BestCheckpoint
from coordinator.models import LoadedModel, source_sha256
from coordinator.results import DeviceResult
from coordinator.tasks import ClassificationTask, Task
from coordinator.train import TrainConfig, train
from edge_runtime import __version__
from edge_runtime.data import Example
from edge_runtime.manifest import DPTarget

RESULTS_SCHEMA = 1
# What the five-setting results keep of a device's metrics.json.
DEVICE_SUMMARY = (
    "steps",
    "samples",
    "backend",
    "first_loss",
    "final_loss",
    "loss_curve",
    "wall_seconds",
    "peak_memory_bytes",
)
SETTINGS: tuple[tuple[str, str], ...] = (
    ("full_zero_shot", "Full zero-shot"),
    ("emulator_zero_shot", "Emulator zero-shot"),
    ("full_finetune", "Full fine-tune"),
    ("offsite_emulator", "Offsite on emulator"),
    ("offsite_plugin", "Offsite plug-in"),
)


@dataclass(frozen=True)
class Experiment:
    """One run: the split, the emulator recipe, how the adapter and the full-model baseline train, how to score."""

    split: Split
    adapter_training: TrainConfig
    full_training: TrainConfig
    eval_batch_size: int = 16
    emulator: EmulatorSpec = field(default_factory=EmulatorSpec)
    layer_window: int | None = None  # adaptive layer tuning: train this many adapter layers at a time, then vote
    check_every: int = 50  # with a validation split: score a checkpoint every this many steps, keep the best
    adapter: str = "layers"  # the adapter kind, KIND[:KEY=VALUE,...] (coordinator/adapters/)
    dp: DPTarget | None = None  # train the offsite adapter with DP-SGD, as a --dp bundle would on the device

    def __post_init__(self) -> None:
        if self.check_every < 1:
            raise ConfigError(f"--check-every {self.check_every} must be at least 1 step")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size={self.eval_batch_size} must be at least 1, e.g. 16")
        check_layer_window(self.layer_window, self.adapter_kind())

    def adapter_kind(self) -> AdapterKind:
        return adapter_kind(self.adapter)


def timed_score(
    task: Task, model: PreTrainedModel, examples: Sequence[Example], batch_size: int, exits: Sequence[int] = ()
) -> dict[str, float]:
    start = time.perf_counter()
    value = task.score(model, examples, batch_size, exits)
    return {task.metric: value, "eval_seconds": round(time.perf_counter() - start, 2)}


def higher_is_better(task: Task) -> bool:
    return task.metric != "perplexity"


def measure_offsite(
    loaded: LoadedModel,
    task: Task,
    train_examples: Sequence[Example],
    test_examples: Sequence[Example],
    experiment: Experiment,
    adapter_path: Path | None = None,
    device: DeviceResult | None = None,
    validation: Sequence[Example] = (),
) -> dict[str, object]:
    """Build the experiment's emulator and score it zero-shot, with its adapter trained on it (here, or `device`'s),
    and with that adapter plugged into the full model; `loaded.model` is left as it was.

    With `validation` examples, the adapter kept is the checkpoint whose plug-in scores best on them (checked
    every `experiment.check_every` steps and before the first, so an adapter that never helps is not kept)."""
    full, split, batch = loaded.model, experiment.emulator.split_for(experiment.split), experiment.eval_batch_size
    start = time.perf_counter()
    emulator = make_emulator(full, split, experiment.emulator, loaded.tokenizer)
    build_seconds = round(time.perf_counter() - start, 2)
    results: dict[str, object] = {"emulator_zero_shot": timed_score(task, emulator, test_examples, batch)}
    kind = experiment.adapter_kind()
    adapter = kind.attach(emulator, split.bottom, split.top)
    layers = decoder_layers(emulator)
    windows = adapter_windows(len(layers), split.bottom, split.top, experiment.layer_window)
    exits = adapter_exits(len(layers), split.bottom, split.top, experiment.layer_window)
    full_exits = adapter_exits(len(decoder_layers(full)), split.bottom, split.top, experiment.layer_window)
    selection = None
    if device is None:
        if validation:
            selection = BestCheckpoint(
                list(adapter.values()),
                lambda: _plugged_in_score(task, full, kind, adapter, split, validation, batch, full_exits),
                experiment.check_every,
                higher_is_better(task),
            )
        phases = (
            [
                (view, [p for i in window for p in layers[i].parameters()])
                for view, window in zip(exit_views(emulator, exits), windows, strict=True)
            ]
            if exits
            else []
        )
        config = experiment.adapter_training
        summary = _train_keeping_best(
            emulator, adapter.values(), task, train_examples, config, phases, selection, "offsite", experiment.dp
        )
    else:
        _check_same_emulator(device, emulator)
        if device.metrics.adapter_kind != kind.name:
            raise ConfigError(
                f"the device trained a {device.metrics.adapter_kind!r} adapter, not {experiment.adapter!r}; pass the "
                "--adapter-kind the bundle was exported with"
            )
        _check_same_windows(device, windows if exits else None)
        plug_in(emulator, device.weights)
        summary = {key: getattr(device.metrics, key) for key in DEVICE_SUMMARY} | {
            "on_device": True,
            "seconds": device.metrics.wall_seconds,
            "trainable_parameters": sum(p.numel() for p in adapter.values()),
        }
    results["offsite_emulator"] = timed_score(task, emulator, test_examples, batch, exits) | {"train": summary}
    trained = {name: parameter.detach().clone() for name, parameter in adapter.items()}
    if adapter_path is not None:
        save_adapter(trained, adapter_path, {"model": loaded.name, "bottom": split.bottom, "top": split.top})
    with plugged_in(kind, full, trained, split.bottom, split.top):
        results["offsite_plugin"] = timed_score(task, full, test_examples, batch, full_exits)
        if exits:  # what voting adds over reading the last layer alone
            results["offsite_plugin"]["final_exit_only"] = task.score(full, test_examples, batch)
    record = emulator_record(emulator)
    return results | {
        "emulator": {
            "spec": experiment.emulator.label(),
            "layer_map": record.layer_map,
            "build_seconds": build_seconds,
            "parameters": count_parameters(emulator),
            "adapter_parameters": sum(p.numel() for p in adapter.values()),
            "adapter_kind": experiment.adapter,
            **record.details["footprint"],
        }
    }


def _train_keeping_best(
    model: PreTrainedModel,
    parameters: Iterable[nn.Parameter],
    task: Task,
    examples: Sequence[Example],
    config: TrainConfig,
    phases: Sequence[tuple[nn.Module, list[nn.Parameter]]],
    selection: BestCheckpoint | None,
    description: str,
    privacy: DPTarget | None = None,
) -> dict[str, object]:
    """Train; with a `selection`, end on its best checkpoint and add its validation curve to the summary."""
    on_step = selection.on_step if selection else None
    report = train(model, parameters, task, examples, config, description, phases, on_step, privacy)
    summary: dict[str, object] = report.summary()
    if selection is not None:
        selection.finish(report.steps)
        selection.restore()
        summary["selection"] = selection.summary()
    return summary


def _plugged_in_score(
    task: Task,
    full: PreTrainedModel,
    kind: AdapterKind,
    adapter: dict[str, nn.Parameter],
    split: Split,
    examples: Sequence[Example],
    batch: int,
    exits: Sequence[int],
) -> float:
    """The full model's score on `examples` with the emulator's current adapter plugged in; `full` is restored."""
    current = {name: parameter.detach().clone() for name, parameter in adapter.items()}
    with plugged_in(kind, full, current, split.bottom, split.top):
        return task.score(full, examples, batch, exits)


def run_five_settings(
    loaded: LoadedModel,
    task: Task,
    train_examples: Sequence[Example],
    test_examples: Sequence[Example],
    experiment: Experiment,
    adapter_path: Path | None = None,
    device: DeviceResult | None = None,
    validation: Sequence[Example] = (),
) -> dict[str, object]:
    """Measure the five settings; `loaded.model` is left as it was. Returns the JSON-ready results.

    The adapter trained on the emulator is saved to `adapter_path` (safetensors, full-model names) if given.
    With `device`, the adapter a device trained is evaluated instead of training one here. With `validation`
    examples, both the adapter and the full fine-tune keep their best checkpoint by them.
    """
    full, batch = loaded.model, experiment.eval_batch_size
    results: dict[str, object] = {"full_zero_shot": timed_score(task, full, test_examples, batch)}
    results |= measure_offsite(
        loaded, task, train_examples, test_examples, experiment, adapter_path, device, validation
    )
    results["full_finetune"] = full_finetune(task, full, train_examples, test_examples, experiment, validation)
    emulator = results["emulator"]
    split = experiment.emulator.split_for(experiment.split)
    results |= {
        "schema": RESULTS_SCHEMA,
        "tool_version": __version__,
        "metric": task.metric,
        "model": model_summary(loaded),
        "parameters": {
            "full": count_parameters(full),
            "emulator": emulator["parameters"],
            "adapter": emulator["adapter_parameters"],
        },
        "config": {
            "adapter_layers": [split.bottom, split.top],
            "keep": split.keep,
            "emulator_layers": emulator["layer_map"],
            "layer_window": experiment.layer_window,
            "adapter_training": asdict(experiment.adapter_training),
            "full_training": asdict(experiment.full_training),
            "eval_batch_size": batch,
            "train_examples": len(train_examples),
            "validation_examples": len(validation),
            "test_examples": len(test_examples),
            **task_config(task),
        },
    }
    return results


def full_finetune(
    task: Task,
    full: PreTrainedModel,
    train_examples: Sequence[Example],
    test_examples: Sequence[Example],
    experiment: Experiment,
    validation: Sequence[Example] = (),
) -> dict[str, object]:
    """The baseline: every weight of a copy of `full` trained, scored on the test examples (its best checkpoint
    by `validation`, if given, checked as often as the adapter's)."""
    finetuned, batch = copy.deepcopy(full), experiment.eval_batch_size
    selection = None
    if validation:
        parameters = list(finetuned.parameters())

        def scorer() -> float:
            finetuned.eval()  # scored as it will be used; training resumes in train mode
            try:
                return task.score(finetuned, validation, batch)
            finally:
                finetuned.train()

        selection = BestCheckpoint(parameters, scorer, experiment.check_every, higher_is_better(task))
    config = experiment.full_training
    summary = _train_keeping_best(
        finetuned, finetuned.parameters(), task, train_examples, config, (), selection, "full"
    )
    return timed_score(task, finetuned, test_examples, batch) | {"train": summary}


def model_summary(loaded: LoadedModel) -> dict[str, object]:
    """Name, source sha256 and layer count of the model the results are for."""
    return {"name": loaded.name, "sha256": source_sha256(loaded), "layers": loaded.model.config.num_hidden_layers}


def _check_same_emulator(device: DeviceResult, emulator: PreTrainedModel) -> None:
    trained_on = device.metrics.emulator
    built = emulator_record(emulator)
    if trained_on.layer_map != built.layer_map or trained_on.options != built.options:
        raise ConfigError(
            f"the device trained through emulator {trained_on.options} with layers "
            f"{trained_on.layer_map}, but this run builds {built.options} with layers {built.layer_map}; "
            "pass the --adapter-layers, --keep, --emulator and --distill the bundle was exported with"
        )


def _check_same_windows(device: DeviceResult, windows: list[list[int]] | None) -> None:
    trained = device.metrics.layer_windows
    trained_layers = [window.layers for window in trained] if trained else None
    if trained_layers != windows:
        raise ConfigError(
            f"the device trained layer windows {trained_layers}, but this run votes over {windows}; "
            "pass the --layer-window the bundle was exported with (none if it had none)"
        )


def task_config(task: Task) -> dict[str, object]:
    if isinstance(task, ClassificationTask):
        return {"task": "classification", "label_words": task.label_words, "template": task.template}
    return {"task": "language_modelling"}
