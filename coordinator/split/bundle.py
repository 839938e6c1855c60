"""A split job's device bundle: the embeddings, the soft prompt and the first layers, for ONNX Runtime or PyTorch.

It is a bundle as any other (tokenizer, initial adapter, manifest, signature, every file's sha256), whose manifest
carries a `split` record: the device trains it against the job's split server (`edge_runtime/split_job.py`), and
the prompt it returns aggregates and plugs in as a `prompt` adapter's does. Its memory plan counts what the device
holds: k layers and the embeddings, no head and no vocabulary-sized logits.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.adapters.prompt import PromptAdapter
from coordinator.architectures import spec_for
from coordinator.bundles.export import (
    check_device_encoding,
    profile_record,
    sample_batch,
    task_record,
    training_record,
)
from coordinator.bundles.planner import make_plan
from coordinator.bundles.request import BundleRequest
from coordinator.models import LoadedModel, source_sha256
from coordinator.split.job import SplitJob, check_split_request
from coordinator.split.sides import DeviceSide, ServerSide, split_model
from coordinator.tasks import ClassificationTask
from device_profiles import DeviceProfile
from edge_runtime import __version__
from edge_runtime.backends.split_ort import PROMPT
from edge_runtime.bundle import ADAPTER_FILE, ORT_DIRECTORY, TOKENIZER_FILE, TORCH_DIRECTORY, write_adapter_file
from edge_runtime.files import atomic_directory
from edge_runtime.manifest import (
    CLASSIFICATION,
    AdapterRecord,
    ArchitectureRecord,
    EmulatorRecord,
    Manifest,
    ModelRecord,
    PlanRecord,
    SplitRecord,
    TrainingRecord,
)
from edge_runtime.memory import BudgetError, ModelShape
from edge_runtime.records import from_dict
from edge_runtime.soft_prompt import SOFT_PROMPT
from exporters.bundle import seal_bundle
from exporters.onnx_training import OptimizerSettings
from exporters.split_onnx import export_split_side


def split_sides(loaded: LoadedModel, request: BundleRequest, split: SplitJob) -> tuple[DeviceSide, ServerSide]:
    """`loaded`'s model cut as `split` says, its prompt as `request`'s adapter kind starts it."""
    check_split_request(request)
    kind = request.adapter()
    assert isinstance(kind, PromptAdapter)  # check_split_request refused the rest
    return split_model(loaded.model, split.cut_after, kind)


def _shape(device: DeviceSide) -> ModelShape:
    """What the device side holds: embeddings and k layers frozen, the prompt trained; no head, so no logits."""
    config = device.backbone.config
    prompt = device.soft_prompt.numel()
    return ModelShape(
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        heads=config.num_attention_heads,
        vocab=0,
        layers=config.num_hidden_layers,
        backprop_layers=config.num_hidden_layers,
        frozen_parameters=sum(p.numel() for p in device.parameters()) - prompt,
        trainable_parameters=prompt,
        prefix_tokens=device.soft_prompt.shape[0],
    )


def _records(loaded: LoadedModel, request: BundleRequest, split: SplitJob, device: DeviceSide,
             profile: DeviceProfile) -> Manifest:  # fmt: skip
    config, training = loaded.model.config, request.training
    spec, kind = spec_for(config.model_type), request.adapter()
    backends = request.backends_for(profile)
    plans = [make_plan(_shape(device), profile, backend, training.batch_size, training.max_length, CLASSIFICATION)
             for backend in backends]  # fmt: skip
    for plan in plans:
        if plan.micro_batch < training.batch_size:
            raise BudgetError(f"a split step needs its whole batch of {training.batch_size} on {profile.name} "
                              f"({plan.backend}), which holds {plan.micro_batch}: pass a smaller --batch-size or "
                              "cut earlier")  # fmt: skip
    tokens, hidden = device.soft_prompt.shape
    cut, prompt = {"cut_after": split.cut_after}, f"{spec.backbone}.{SOFT_PROMPT}"
    per_backend = {plan.backend: plan.to_dict() for plan in plans}
    return Manifest(
        format="",
        schema=0,  # both stamped when sealed
        tool_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=ModelRecord(loaded.name, source_sha256(loaded), config.num_hidden_layers),
        architecture=ArchitectureRecord(config.model_type, spec.backbone, spec.head, spec.layers),
        emulator=EmulatorRecord("split", config.num_hidden_layers, list(range(split.cut_after)), 0, 0, cut),
        adapter=AdapterRecord(kind.name, 0, 0, tokens * hidden, {PROMPT: prompt}, options=kind.options()),
        task=task_record(request.task.build(loaded.tokenizer, training.max_length)),
        profile=profile_record(profile),
        plan=from_dict(PlanRecord, plans[0].to_dict() | {"per_backend": per_backend}, "plan"),
        training=training_record(request),
        backends=list(backends),
        split=SplitRecord(
            split.cut_after,
            tokens,
            hidden,
            tokens + training.max_length,
            split.prune_fraction,
            split.prune_score,
            split.cut_dp,
            spec.final_norm.removeprefix(spec.backbone + "."),
        ),
    )


def _optimizer(training: TrainingRecord) -> OptimizerSettings:
    optimizer = training.optimizer
    return OptimizerSettings(optimizer.weight_decay, optimizer.max_grad_norm, optimizer.eps)


def export_split_bundle(
    loaded: LoadedModel, request: BundleRequest, split: SplitJob, profile: DeviceProfile, out: Path,
    key: Ed25519PrivateKey,
) -> Manifest:  # fmt: skip
    """Export and sign `split`'s device bundle of `loaded` for `profile` into `out` (whole, or not at all); its
    graphs are checked against PyTorch (the cut, and the prompt's gradient for a gradient at the cut)."""
    device, _ = split_sides(loaded, request, split)
    manifest = _records(loaded, request, split, device, profile)
    task = request.task.build(loaded.tokenizer, request.training.max_length)
    assert isinstance(task, ClassificationTask)  # split_sides refused the rest
    with atomic_directory(out) as staging:
        loaded.tokenizer.save_pretrained(staging / Path(TOKENIZER_FILE).parent)
        check_device_encoding(staging / TOKENIZER_FILE, manifest.task, task)
        (prompt_name,) = manifest.adapter.parameters.values()
        origin = {"model": manifest.model.name, "bottom": 0, "top": 0}
        write_adapter_file(staging / ADAPTER_FILE, {prompt_name: device.soft_prompt.detach().numpy()}, origin)
        check = None
        if "torch" in manifest.backends:  # the first k layers as a transformers backbone, its final norm an identity
            device.backbone.save_pretrained(staging / TORCH_DIRECTORY)
        if "ort" in manifest.backends:
            (staging / ORT_DIRECTORY).mkdir()
            ids, mask, _ = sample_batch(task)
            check = export_split_side(device, (ids, mask), staging / ORT_DIRECTORY, _optimizer(manifest.training))
        return seal_bundle(staging, replace(manifest, export_check=check.to_dict() if check else None), key)
