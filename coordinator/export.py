"""Device bundles: emulator + adapter planned for a profile, exported per backend, sealed and signed, atomically."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.adapter import adapter_parameters, adapter_state, adapter_windows, save_adapter
from coordinator.architectures import spec_for
from coordinator.compression import EmulatorSpec, make_emulator
from coordinator.emulator import Split, emulator_record, layer_map
from coordinator.errors import ConfigError
from coordinator.models import LoadedModel, source_sha256
from coordinator.planner import Plan, check_backends, make_plan, model_shape
from coordinator.tasks import ClassificationTask, LanguageModelTask, pad
from coordinator.train import TrainConfig
from device_profiles import DeviceProfile
from edge_runtime import __version__
from edge_runtime.bundle import ADAPTER_FILE, ORT_DIRECTORY, TOKENIZER_FILE, TORCH_DIRECTORY
from edge_runtime.data import Example
from edge_runtime.files import atomic_directory
from edge_runtime.text import TaskEncoder
from edge_runtime.torch_graph import CLASSIFICATION, truncated
from exporters.bundle import seal_bundle
from exporters.onnx_training import PREFIX, ExportError, OptimizerSettings, export_training_artifacts, onnx_name

SAMPLE_TEXTS = ("a moving, beautifully acted film", "the plot is dull and the jokes fall flat")


def task_record(task: ClassificationTask | LanguageModelTask) -> dict[str, Any]:
    """What the device needs to encode its data exactly as the coordinator would."""
    tokenizer = task.tokenizer
    record: dict[str, Any] = {
        "max_length": task.max_length,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if isinstance(task, ClassificationTask):
        token_ids = dict(zip(task.labels, task.label_token_ids.tolist(), strict=True))
        return record | {
            "kind": CLASSIFICATION,
            "template": task.template,
            "label_words": task.label_words,
            "label_token_ids": token_ids,
        }
    return record | {"kind": "language-model"}


def _sample_batch(task: ClassificationTask | LanguageModelTask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if isinstance(task, ClassificationTask):
        encoded = [task.encode(Example(text, task.labels[i % len(task.labels)])) for i, text in enumerate(SAMPLE_TEXTS)]
        ids, mask = pad([row for row, _ in encoded], task.tokenizer.pad_token_id)
        return ids, mask, task.label_token_ids[[label for _, label in encoded]]
    batch = next(task.batches([Example(text, None) for text in SAMPLE_TEXTS], len(SAMPLE_TEXTS), seed=None))
    labels = batch.input_ids[:, 1:].masked_fill(batch.attention_mask[:, 1:] == 0, -100)
    return batch.input_ids, batch.attention_mask, labels.reshape(-1)


def _check_device_encoding(
    tokenizer_file: Path, record: dict[str, Any], task: ClassificationTask | LanguageModelTask
) -> None:
    """The device's tokenizer (the `tokenizers` library alone) must encode exactly as the coordinator does."""
    if not isinstance(task, ClassificationTask):
        return
    device = TaskEncoder(tokenizer_file, record)
    examples = [Example(text, task.labels[0]) for text in SAMPLE_TEXTS]
    for example, (ids, _) in zip(examples, device.rows(examples), strict=True):
        if ids != task.encode(example)[0]:
            raise ExportError(f"the device tokenizer encodes {example.text!r} differently from the coordinator's")


def _windows(emulator: torch.nn.Module, split: Split, size: int | None) -> list[dict[str, Any]]:
    """The adapter's layer windows (emulator indices), each with its exit, trainable ONNX names and graph folder.

    Without `size`, one window holds every adapter layer and exits at the top, in the bundle's plain `ort/`.
    """
    spec = spec_for(emulator.config.model_type)
    layers = emulator.get_submodule(spec.layers)
    runs = adapter_windows(len(layers), split.bottom, split.top, size)
    sources = layer_map(emulator)
    return [
        {
            "layers": run,
            "exit": len(layers) - 1 if size is None else run[-1],
            "exit_source": sources[-1] if size is None else sources[run[-1]],
            "parameters": [
                onnx_name(f"{spec.layers}.{i}.{name}") for i in run for name, _ in layers[i].named_parameters()
            ],
            "ort": ORT_DIRECTORY if size is None else f"{ORT_DIRECTORY}/window-{index}",
        }
        for index, run in enumerate(runs)
    ]


def export_bundle(
    loaded: LoadedModel,
    split: Split,
    task: ClassificationTask | LanguageModelTask,
    profile: DeviceProfile,
    backends: tuple[str, ...],
    training: TrainConfig,
    checkpoint_every: int,
    out: Path,
    key: Ed25519PrivateKey,
    recipe: EmulatorSpec | None = None,
    layer_window: int | None = None,
) -> dict[str, Any]:
    """Build, plan, export and sign the bundle for `profile` into `out` (written whole or not at all).

    `recipe` builds the emulator (default: uniform drop of `split.keep` middle layers). `training` gives the
    device's default steps, learning rate, batch, schedule, optimizer and seed (its
    `max_length` is the task's); the device checkpoints every `checkpoint_every` steps. `layer_window` turns on
    adaptive layer tuning: the adapter trains `layer_window` layers at a time, each window through its own exit
    (edge_runtime/windows.py), with one set of ONNX graphs per window.
    """
    if checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every={checkpoint_every} must be at least 1, e.g. 10")
    check_backends(profile, backends)
    recipe = recipe or EmulatorSpec(keep=split.keep)
    split = recipe.split_for(split)
    split.check(loaded.model.config.num_hidden_layers)
    spec = spec_for(loaded.model.config.model_type)
    emulator = make_emulator(loaded.model, split, recipe, loaded.tokenizer).eval()
    adapter = adapter_parameters(emulator, split.bottom, split.top)
    record = task_record(task)
    plans: list[Plan] = [
        make_plan(
            model_shape(emulator, adapter), profile, backend, training.batch_size, task.max_length, record["kind"]
        )
        for backend in backends
    ]
    local = {id(parameter): name for name, parameter in emulator.named_parameters()}
    names = {onnx_name(local[id(parameter)]): full for full, parameter in adapter.items()}
    optimizer = OptimizerSettings(training.weight_decay, training.max_grad_norm)
    with atomic_directory(out) as staging:
        loaded.tokenizer.save_pretrained(staging / Path(TOKENIZER_FILE).parent)
        _check_device_encoding(staging / TOKENIZER_FILE, record, task)
        save_adapter(
            adapter_state(emulator, split.bottom, split.top),
            staging / ADAPTER_FILE,
            {"model": loaded.name, "bottom": split.bottom, "top": split.top},
        )
        windows = _windows(emulator, split, layer_window)
        check = None
        if "ort" in backends:
            for window in windows:
                (staging / window["ort"]).mkdir(parents=True)
                check = export_training_artifacts(
                    truncated(emulator, spec.layers, window["exit"] + 1),
                    spec.backbone,
                    spec.head,
                    record["kind"],
                    [name.removeprefix(PREFIX) for name in window["parameters"]],
                    _sample_batch(task),
                    staging / window["ort"],
                    optimizer,
                )
        if "torch" in backends:
            emulator.save_pretrained(staging / TORCH_DIRECTORY)
        manifest = {
            "tool_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": {
                "name": loaded.name,
                "sha256": source_sha256(loaded),
                "num_layers": loaded.model.config.num_hidden_layers,
            },
            "architecture": {
                "model_type": loaded.model.config.model_type,
                "backbone": spec.backbone,
                "head": spec.head,
                "layers": spec.layers,
            },
            "emulator": asdict(emulator_record(emulator)),
            "adapter": {
                "kind": "layers",
                "bottom": split.bottom,
                "top": split.top,
                "count": sum(p.numel() for p in adapter.values()),
                "parameters": names,
            }
            | ({"windows": windows} if layer_window is not None else {}),
            "task": record,
            "profile": profile.to_dict() | {"budget_bytes": profile.budget_bytes},
            "plan": plans[0].to_dict() | {"per_backend": {plan.backend: plan.to_dict() for plan in plans}},
            "training": {
                "steps": training.steps,
                "lr": training.lr,
                "batch_size": training.batch_size,
                "warmup_ratio": training.warmup_ratio,
                "seed": training.seed,
                "checkpoint_every": checkpoint_every,
                "optimizer": {
                    "name": "adamw",
                    "eps": optimizer.eps,
                    "weight_decay": optimizer.weight_decay,
                    "max_grad_norm": optimizer.max_grad_norm,
                },
            },
            "backends": list(backends),
            "export_check": check.to_dict() if check else None,
        }
        sealed = seal_bundle(staging, manifest, key)
    return sealed
