"""Emulator + adapter -> ONNX Runtime training artifacts (training and optimizer graphs, checkpoint, frozen weights).

Exported at opset 15 with the TorchScript exporter: at opset >= 17 LayerNormalization becomes one node whose
gradient ONNX Runtime training 1.19 cannot build. The graphs are then rewritten for memory
(exporters/onnx_rewrites.py). Every export runs in ONNX Runtime and is compared with PyTorch: forward logits,
the eval graph's loss (that graph is then removed), and every trainable tensor's gradient from the training graph.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnxruntime.training import artifacts, onnxblock
from onnxruntime.training.api import CheckpointState, Module

from edge_runtime.errors import OffsiteError
from edge_runtime.frozen_inputs import FROZEN_FILE, FrozenInputs
from edge_runtime.tensor_file import write_safetensors
from edge_runtime.torch_graph import IGNORE_INDEX, PREFIX, TrainingGraph, graph_loss
from exporters.onnx_rewrites import (
    dequantize_again_for_backward,
    dequantize_at_use,
    recompute_layers,
    weights_read_in_place,
)

OPSET = 15
# Forward logits may differ from PyTorch by at most this much, relative to the largest |logit| (float32 kernels
# sum in a different order; measured ~1e-6 relative on SmolLM2).
LOGITS_TOLERANCE = 1e-4
LOSS_TOLERANCE = 1e-4
# A trainable entry's gradient may differ by this much of the largest |gradient| (float32 sums in another order).
GRADIENT_TOLERANCE = 1e-3
LOSS_SCALE = "loss_scale"


class ExportError(OffsiteError):
    """The exported graph is missing a parameter or does not reproduce PyTorch."""


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW as the optimizer graph runs it (transformers-style AdamW; gradient clipping by global norm)."""

    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eps: float = 1e-8

    def adamw(self) -> onnxblock.optim.AdamW:
        """The optimizer graph's block: AdamW with these settings, the gradient clipped by its global norm."""
        clip = onnxblock.optim.ClipGradNorm(self.max_grad_norm)
        return onnxblock.optim.AdamW(eps=self.eps, weight_decay=self.weight_decay, clip_grad=clip)


@dataclass(frozen=True)
class ExportCheck:
    """How closely ONNX Runtime reproduced PyTorch on the sample batch."""

    logits_max_abs_diff: float
    logits_max_abs: float
    loss_onnx: float
    loss_torch: float
    gradient_relative_diff: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "logits_max_abs_diff": self.logits_max_abs_diff,
            "logits_max_abs": self.logits_max_abs,
            "loss_onnx": self.loss_onnx,
            "loss_torch": self.loss_torch,
            "gradient_relative_diff": self.gradient_relative_diff,
            "logits_tolerance": LOGITS_TOLERANCE,
            "loss_tolerance": LOSS_TOLERANCE,
            "gradient_tolerance": GRADIENT_TOLERANCE,
        }


class ScaledCrossEntropy(onnxblock.Block):
    """Mean cross-entropy times a `loss_scale` input: micro-batches pass their share of the batch, so the
    gradients ONNX Runtime accumulates over them add up to the whole batch's mean gradient."""

    def __init__(self) -> None:
        super().__init__()
        self._cross_entropy = onnxblock.loss.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        self._scale = onnxblock.blocks.Mul()

    def build(self, logits_name: str) -> str:
        loss = self._cross_entropy(logits_name, "labels")
        self.base.graph.input.append(onnx.helper.make_tensor_value_info(LOSS_SCALE, onnx.TensorProto.FLOAT, []))
        return self._scale(loss, LOSS_SCALE)


def onnx_name(parameter: str) -> str:
    """The ONNX initializer name of a model parameter."""
    return PREFIX + parameter


def _trace(
    graph: torch.nn.Module, sample: tuple[torch.Tensor, torch.Tensor], path: Path, output: str, output_axes: dict
) -> None:
    torch.onnx.export(
        graph,
        sample,
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=[output],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            output: output_axes,
        },
        opset_version=OPSET,
        do_constant_folding=False,
        keep_initializers_as_inputs=True,  # stops equal-valued parameters (e.g. fresh norms) being merged into one
        dynamo=False,
    )


def export_forward(
    graph: torch.nn.Module,
    sample: tuple[torch.Tensor, torch.Tensor],
    path: Path,
    output: str = "logits",
    output_axes: dict | None = None,
) -> onnx.ModelProto:
    """`graph` (input_ids, attention_mask -> `output`) traced into `path` at opset 15, its weights initializers
    only (not also inputs); the model."""
    with warnings.catch_warnings():  # the tracer warns about Python-level shape checks it freezes; harmless here
        warnings.simplefilter("ignore")
        _trace(graph, sample, path, output, output_axes or {0: "rows"})
    model = onnx.load(str(path))
    initializers = {initializer.name for initializer in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    onnx.save(model, str(path))
    return model


def alias_repeated_frozen(model: onnx.ModelProto, frozen: set[str]) -> None:
    """Give each further use of a frozen initializer its own Identity alias, in place.

    A shared layer (the `share` recipe) uses each of its weights once per position. ONNX Runtime's gradient
    builder names a weight's gradient after the weight at every use on the loss path, frozen or not, and refuses
    the graph with "Duplicate definition of name (W_grad)"; an alias per use keeps one stored copy of W.
    """
    uses: dict[str, int] = {}
    aliases = []
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            if name in frozen:
                uses[name] = uses.get(name, 0) + 1
                if uses[name] > 1:
                    alias = f"{name}/use{uses[name]}"
                    aliases.append(onnx.helper.make_node("Identity", [name], [alias], name=f"{alias}/Identity"))
                    node.input[slot] = alias
    if aliases:
        nodes = [*aliases, *model.graph.node]  # initializers exist from the start, so the aliases can go first
        del model.graph.node[:]
        model.graph.node.extend(nodes)


def feed_frozen(model: onnx.ModelProto, frozen: set[str]) -> dict[str, np.ndarray]:
    """Make each `frozen` matrix an input of the graph, in place; their values by name (edge_runtime/frozen_inputs.py
    says why)."""
    fed = [
        initializer
        for initializer in model.graph.initializer
        if initializer.name in frozen and len(initializer.dims) >= 2
    ]
    for initializer in fed:
        model.graph.initializer.remove(initializer)
        shape = list(initializer.dims)
        model.graph.input.append(onnx.helper.make_tensor_value_info(initializer.name, initializer.data_type, shape))
    return {initializer.name: onnx.numpy_helper.to_array(initializer) for initializer in fed}


def _rewrite(path: Path, rewrite: Callable[[onnx.ModelProto], int]) -> int:
    """Apply a rewrite to the model file in place; how many places it changed."""
    model = onnx.load(str(path))
    changed = rewrite(model)
    onnx.save(model, str(path))
    return changed


@contextmanager
def native_log_captured() -> Iterator[None]:
    """Hold back the INFO lines ONNX Runtime's C++ gradient builder writes to stderr; replay them on failure."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def quiet_options() -> onnxruntime.SessionOptions:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return options


def _check_forward(path: Path, graph: TrainingGraph, sample: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    session = onnxruntime.InferenceSession(str(path), quiet_options(), providers=["CPUExecutionProvider"])
    ids, mask = sample[0], sample[1]
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = graph(ids, mask).numpy()
    return float(np.abs(got - want).max()), float(np.abs(want).max())


def _sample_loss(
    directory: Path, sample: tuple[torch.Tensor, ...], train: bool
) -> tuple[Module, CheckpointState, float]:
    """One step of the exported graphs on `sample` (training, or the eval graph): the module, its state, the loss."""
    state = CheckpointState.load_checkpoint(str(directory / "checkpoint"))
    eval_model = None if train else str(directory / "eval_model.onnx")
    module = Module(str(directory / "training_model.onnx"), state, eval_model, session_options=quiet_options())
    module.train(train)
    ids, mask, labels = (tensor.numpy() for tensor in sample)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, LOSS_SCALE: np.array(1.0, np.float32)}
    loss = module(*FrozenInputs(directory).feeds(module.input_names(), batch))
    return module, state, float(loss.numpy())


def _check_eval_loss(directory: Path, graph: TrainingGraph, sample: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    _, _, got = _sample_loss(directory, sample, train=False)
    with torch.no_grad():
        want = float(graph_loss(graph(*sample[:2]), sample[2]))
    return got, want


def _check_gradients(
    directory: Path, graph: TrainingGraph, sample: tuple[torch.Tensor, ...], trainable: list[str]
) -> float:
    """The largest difference between ONNX Runtime's and PyTorch's gradient of any trainable entry on `sample`,
    relative to the largest |gradient| of all (a gradient that is zero in exact arithmetic, like a key bias's,
    is float noise on both sides): the training graph, rewrites included, differentiates right."""
    _module, state, _ = _sample_loss(directory, sample, train=True)  # the module lives while its gradients are read
    ids, mask, labels = sample
    named = dict(graph.named_parameters())
    wanted = [named[onnx_name(name)] for name in trainable]
    # The model may come with every flag off (training and distillation switch them off when they finish): ask for
    # the trainable entries' gradients whatever their flags, and leave the flags as they came.
    flags = [parameter.requires_grad for parameter in wanted]
    try:
        for parameter in wanted:
            parameter.requires_grad_(True)
        with torch.enable_grad():
            expected = torch.autograd.grad(graph_loss(graph(ids, mask), labels), wanted)
    finally:
        for parameter, flag in zip(wanted, flags, strict=True):
            parameter.requires_grad_(flag)
    worst = max(
        float(np.abs(np.asarray(state.parameters[onnx_name(name)].grad) - want.numpy()).max())
        for name, want in zip(trainable, expected, strict=True)
    )
    return worst / max(max(float(want.abs().max()) for want in expected), 1e-12)


def export_training_artifacts(
    model: torch.nn.Module,
    backbone: str,
    head: str,
    kind: str,
    trainable: list[str],
    sample: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    directory: Path,
    optimizer: OptimizerSettings,
    recompute: str | None = None,
    replaced: Collection[str] = (),
) -> ExportCheck:
    """Write ONNX Runtime's training artifacts of `model` into `directory` (which must exist): the training and
    optimizer graphs and the checkpoint (the eval graph is made for the export's check, then removed: the device
    only trains).

    `trainable` are parameter names of `model` (e.g. 'model.layers.0.mlp.up_proj.weight'); every other parameter
    is frozen. Frozen tensors are fed to the graph from `FROZEN_FILE`, outside the checkpoint, except those in
    `replaced` (weights the device sets at run time, like an earlier layer window's adapter), so that writing a
    checkpoint copies only what training changes. `sample` = (input_ids, attention_mask, labels) is a real batch
    used to check the export.
    `recompute`: the module path of the decoder layers (e.g. 'model.layers') whose activations the training graph
    recomputes in the backward pass instead of keeping (exporters/onnx_rewrites.py); None keeps them.
    """
    graph = TrainingGraph(model, backbone, head, kind).eval()
    with tempfile.TemporaryDirectory() as scratch:
        forward_path = Path(scratch) / "forward.onnx"
        forward = export_forward(graph, sample[:2], forward_path)
        names = [initializer.name for initializer in forward.graph.initializer]
        wanted = [onnx_name(name) for name in trainable]
        missing = sorted(set(wanted) - set(names))
        if missing:
            raise ExportError(f"the exported graph lost trainable parameters {missing[:3]}...; export them unfolded")
        weights_read_in_place(forward)
        quantized = dequantize_at_use(forward)
        onnx.save(forward, str(forward_path))
        diff, scale = _check_forward(forward_path, graph, sample)
        if diff > LOGITS_TOLERANCE * max(1.0, scale):
            raise ExportError(f"ONNX logits differ from PyTorch by {diff:.3g} (largest |logit| {scale:.3g})")
        frozen = [name for name in names if name not in set(wanted)]
        in_checkpoint = sorted({onnx_name(name) for name in replaced} & set(frozen))
        alias_repeated_frozen(forward, set(frozen))
        write_safetensors(directory / FROZEN_FILE, feed_frozen(forward, set(frozen) - set(in_checkpoint)), {})
        with native_log_captured():
            artifacts.generate_artifacts(
                forward,
                requires_grad=wanted,
                frozen_params=in_checkpoint,
                loss=ScaledCrossEntropy(),
                optimizer=optimizer.adamw(),
                artifact_directory=str(directory),
            )
        training_model = directory / "training_model.onnx"
        if recompute is not None:
            scope = "/" + recompute.replace(".", "/") + "."
            if not _rewrite(training_model, lambda graph: recompute_layers(graph, scope)):
                raise ExportError(f"no decoder layer under {recompute!r} to recompute in the training graph")
        if quantized:
            _rewrite(training_model, dequantize_again_for_backward)
    loss_onnx, loss_torch = _check_eval_loss(directory, graph, sample)
    if abs(loss_onnx - loss_torch) > LOSS_TOLERANCE * max(1.0, abs(loss_torch)):
        raise ExportError(f"the ONNX eval loss {loss_onnx:.6f} differs from PyTorch's {loss_torch:.6f}")
    (directory / "eval_model.onnx").unlink()
    gradient_error = _check_gradients(directory, graph, sample, trainable)
    if gradient_error > GRADIENT_TOLERANCE:
        raise ExportError(f"ONNX Runtime's gradients differ from PyTorch's by {gradient_error:.3g} of their scale")
    return ExportCheck(diff, scale, loss_onnx, loss_torch, gradient_error)
