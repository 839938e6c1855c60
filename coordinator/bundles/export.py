"""Device bundles: the emulator and adapter a request names, planned for a profile, as typed manifest records."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.adapters.layers import adapter_windows
from coordinator.architectures import spec_for
from coordinator.bundles.planner import Plan, check_backends, make_plan, model_shape
from coordinator.bundles.request import BundleRequest
from coordinator.compression import make_emulator
from coordinator.emulator import Split, emulator_record, layer_map
from coordinator.models import LoadedModel, source_sha256
from coordinator.tasks import ClassificationTask, LanguageModelTask, pad
from device_profiles import DeviceProfile
from edge_runtime import __version__
from edge_runtime.bundle import ORT_DIRECTORY
from edge_runtime.data import Example
from edge_runtime.manifest import (
    CLASSIFICATION,
    LANGUAGE_MODEL,
    AdapterRecord,
    ArchitectureRecord,
    Manifest,
    ModelRecord,
    OptimizerRecord,
    PlanRecord,
    ProfileRecord,
    TaskRecord,
    TrainingRecord,
    WindowRecord,
)
from edge_runtime.records import from_dict
from edge_runtime.text import TaskEncoder
from exporters.device_bundle import BundleContents, write_bundle
from exporters.onnx_training import ExportError, OptimizerSettings, onnx_name

SAMPLE_TEXTS = ("a moving, beautifully acted film", "the plot is dull and the jokes fall flat")


def task_record(task: ClassificationTask | LanguageModelTask) -> TaskRecord:
    """What the device needs to encode its data exactly as the coordinator would."""
    tokenizer = task.tokenizer
    common = {"max_length": task.max_length, "pad_token_id": tokenizer.pad_token_id}
    if isinstance(task, ClassificationTask):
        token_ids = dict(zip(task.labels, task.label_token_ids.tolist(), strict=True))
        return TaskRecord(
            CLASSIFICATION,
            **common,
            eos_token_id=tokenizer.eos_token_id,
            template=task.template,
            label_words=task.label_words,
            label_token_ids=token_ids,
        )
    return TaskRecord(LANGUAGE_MODEL, **common, eos_token_id=tokenizer.eos_token_id)


def profile_record(profile: DeviceProfile) -> ProfileRecord:
    """The profile as the manifest records it, with its budget in bytes."""
    return from_dict(ProfileRecord, profile.to_dict() | {"budget_bytes": profile.budget_bytes}, "profile")


def sample_batch(task: ClassificationTask | LanguageModelTask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if isinstance(task, ClassificationTask):
        encoded = [task.encode(Example(text, task.labels[i % len(task.labels)])) for i, text in enumerate(SAMPLE_TEXTS)]
        ids, mask = pad([row for row, _ in encoded], task.tokenizer.pad_token_id)
        return ids, mask, task.label_token_ids[[label for _, label in encoded]]
    batch = next(task.batches([Example(text, None) for text in SAMPLE_TEXTS], len(SAMPLE_TEXTS), seed=None))
    labels = batch.input_ids[:, 1:].masked_fill(batch.attention_mask[:, 1:] == 0, -100)
    return batch.input_ids, batch.attention_mask, labels.reshape(-1)


def check_device_encoding(
    tokenizer_file: Path, record: TaskRecord, task: ClassificationTask | LanguageModelTask
) -> None:
    """The device's tokenizer (the `tokenizers` library alone) must encode exactly as the coordinator does."""
    if not isinstance(task, ClassificationTask):
        return
    device = TaskEncoder(tokenizer_file, record)
    examples = [Example(text, task.labels[0]) for text in SAMPLE_TEXTS]
    for example, (ids, _) in zip(examples, device.rows(examples), strict=True):
        if ids != task.encode(example)[0]:
            raise ExportError(f"the device tokenizer encodes {example.text!r} differently from the coordinator's")


def _windows(emulator: torch.nn.Module, split: Split, size: int | None) -> list[WindowRecord] | None:
    """The adapter's layer windows (emulator indices), each with its exit, trainable ONNX names and graph folder."""
    if size is None:
        return None
    spec = spec_for(emulator.config.model_type)
    layers = emulator.get_submodule(spec.layers)
    sources = layer_map(emulator)
    return [
        WindowRecord(
            layers=run,
            exit=run[-1],
            exit_source=sources[run[-1]],
            parameters=[
                onnx_name(f"{spec.layers}.{i}.{name}") for i in run for name, _ in layers[i].named_parameters()
            ],
            ort=f"{ORT_DIRECTORY}/window-{index}",
        )
        for index, run in enumerate(adapter_windows(len(layers), split.bottom, split.top, size))
    ]


def training_record(request: BundleRequest) -> TrainingRecord:
    training = request.training
    optimizer = OptimizerSettings(training.weight_decay, training.max_grad_norm)
    return TrainingRecord(
        steps=training.steps,
        lr=training.lr,
        batch_size=training.batch_size,
        warmup_ratio=training.warmup_ratio,
        seed=training.seed,
        checkpoint_every=request.checkpoint_every,
        optimizer=OptimizerRecord("adamw", optimizer.eps, optimizer.weight_decay, optimizer.max_grad_norm),
    )


def export_bundle(
    loaded: LoadedModel, request: BundleRequest, profile: DeviceProfile, out: Path, key: Ed25519PrivateKey
) -> Manifest:
    """Build the emulator `request` names, plan it for `profile`, export and sign the bundle into `out`.

    The bundle is written whole or not at all (exporters/device_bundle.py). With `request.layer_window` the
    adapter trains that many layers at a time, each window through its own exit (edge_runtime/windows.py), with one
    set of ONNX graphs per window.
    """
    backends = request.backends_for(profile)
    check_backends(profile, backends)
    split = request.split()
    split.check(loaded.model.config.num_hidden_layers)
    spec = spec_for(loaded.model.config.model_type)
    emulator = make_emulator(loaded.model, split, request.recipe(), loaded.tokenizer).eval()
    kind = request.adapter()
    adapter = kind.attach(emulator, split.bottom, split.top)
    task = request.task.build(loaded.tokenizer, request.training.max_length)
    record = task_record(task)
    shape = model_shape(emulator, adapter, private=request.dp is not None, recompute=request.recompute)
    plans: list[Plan] = [
        make_plan(shape, profile, backend, request.training.batch_size, task.max_length, record.kind)
        for backend in backends
    ]
    local = {id(parameter): name for name, parameter in emulator.named_parameters()}
    initial = {name: parameter.detach().clone() for name, parameter in adapter.items()}
    # The bundle holds the plain emulator; the exporter and the device add the kind again from its names. (Not a
    # deep copy with the kind attached: harmonizers run as forward pre-hooks whose closures keep the originals.)
    kind.detach(emulator)
    manifest = Manifest(
        format="",
        schema=0,  # both stamped when sealed
        tool_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=ModelRecord(loaded.name, source_sha256(loaded), loaded.model.config.num_hidden_layers),
        architecture=ArchitectureRecord(loaded.model.config.model_type, spec.backbone, spec.head, spec.layers),
        emulator=emulator_record(emulator),
        adapter=AdapterRecord(
            kind=kind.name,
            bottom=split.bottom,
            top=split.top,
            count=sum(p.numel() for p in adapter.values()),
            parameters={onnx_name(local[id(parameter)]): full for full, parameter in adapter.items()},
            windows=_windows(emulator, split, request.layer_window),
            options=kind.options(),
        ),
        task=record,
        profile=profile_record(profile),
        plan=from_dict(
            PlanRecord, plans[0].to_dict() | {"per_backend": {plan.backend: plan.to_dict() for plan in plans}}, "plan"
        ),
        training=training_record(request),
        backends=list(backends),
        privacy=request.dp,
    )
    contents = BundleContents(
        manifest,
        emulator,
        loaded.tokenizer,
        initial,
        sample_batch(task),
        lambda tokenizer_file: check_device_encoding(tokenizer_file, record, task),
    )
    return write_bundle(contents, out, key)
