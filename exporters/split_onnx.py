"""A split job's device side -> ONNX Runtime training artifacts: the cut out, the soft prompt's AdamW step in.

The forward graph is the device side (`coordinator/split/sides.py`): embeddings, the soft prompt in front, the
first k layers, the cut out. The training graph adds an input, the server's gradient at the cut, and the loss
sum(cut × gradient), whose gradient on the prompt is exactly the backward pass from the cut (a vector-Jacobian
product); the eval graph gives the cut (`edge_runtime/backends/split_ort.py` runs both). Frozen matrices are fed
from a file beside the graphs, as in `onnx_training.py`. Checked at export against PyTorch: the cut, and the
prompt's gradient for a random gradient at the cut.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnxruntime.training import artifacts, onnxblock
from torch import nn

from coordinator.split.sides import DeviceSide
from edge_runtime.backends.split_ort import CUT, CUT_GRADIENT, PROMPT, OrtCutSide
from edge_runtime.frozen_inputs import FROZEN_FILE
from edge_runtime.tensor_file import write_safetensors
from edge_runtime.torch_graph import additive_causal_mask
from exporters.onnx_rewrites import weights_read_in_place
from exporters.onnx_training import (
    GRADIENT_TOLERANCE,
    LOGITS_TOLERANCE,
    ExportError,
    OptimizerSettings,
    alias_repeated_frozen,
    export_forward,
    feed_frozen,
    native_log_captured,
    quiet_options,
)


class CutGraph(nn.Module):
    """The device side as the exporter traces it: a ready 4D mask and explicit positions (the tracer cannot follow
    transformers' own mask builder); the prompt's name in the graph is `PROMPT`."""

    def __init__(self, side: DeviceSide) -> None:
        super().__init__()
        self.side = side

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rows = input_ids.shape[0]
        prompt = self.side.soft_prompt
        embeds = self.side.backbone.get_input_embeddings()(input_ids)
        mask = torch.cat([attention_mask.new_ones(rows, prompt.shape[0]), attention_mask], dim=1)
        positions = torch.arange(mask.shape[1], device=input_ids.device)[None].expand(rows, -1)
        return self.side.backbone(
            inputs_embeds=torch.cat([prompt[None].expand(rows, -1, -1).to(embeds.dtype), embeds], dim=1),
            attention_mask=additive_causal_mask(mask),
            position_ids=positions,
            use_cache=False,
        ).last_hidden_state


class CutVectorJacobian(onnxblock.Block):
    """sum(cut × cut_gradient): backpropagating it gives every weight the gradient the server's answer asks for."""

    def __init__(self) -> None:
        super().__init__()
        self._product = onnxblock.blocks.Mul()
        self._sum = onnxblock.blocks.ReduceSum(keepdims=False)

    def build(self, cut_name: str) -> str:
        shape = ["batch", "positions", None]
        self.base.graph.input.append(onnx.helper.make_tensor_value_info(CUT_GRADIENT, onnx.TensorProto.FLOAT, shape))
        return self._sum(self._product(cut_name, CUT_GRADIENT))


@dataclass(frozen=True)
class SplitExportCheck:
    """How closely ONNX Runtime reproduced PyTorch on the sample batch: the cut, and the prompt's gradient."""

    cut_max_abs_diff: float
    cut_max_abs: float
    gradient_relative_diff: float

    def to_dict(self) -> dict[str, float]:
        return {
            "cut_max_abs_diff": self.cut_max_abs_diff,
            "cut_max_abs": self.cut_max_abs,
            "gradient_relative_diff": self.gradient_relative_diff,
            "cut_tolerance": LOGITS_TOLERANCE,
            "gradient_tolerance": GRADIENT_TOLERANCE,
        }


def _check_cut(path: Path, graph: CutGraph, sample: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    session = onnxruntime.InferenceSession(str(path), quiet_options(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": sample[0].numpy(), "attention_mask": sample[1].numpy()})[0]
    with torch.no_grad():
        want = graph(*sample).numpy()
    return float(np.abs(got - want).max()), float(np.abs(want).max())


def _check_gradient(directory: Path, graph: CutGraph, sample: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The largest difference between ONNX Runtime's and PyTorch's prompt gradient for a random gradient at the
    cut, relative to the largest |gradient|."""
    ids, mask = sample
    side = OrtCutSide(directory)
    cut = side.cut(ids.numpy(), mask.numpy())
    gradient = torch.randn(cut.shape, generator=torch.Generator().manual_seed(0))
    side.accumulate(ids.numpy(), mask.numpy(), gradient.numpy())
    prompt = graph.side.soft_prompt
    flag = prompt.requires_grad
    try:
        prompt.requires_grad_(True)
        with torch.enable_grad():
            (want,) = torch.autograd.grad(graph(ids, mask), prompt, gradient)
    finally:
        prompt.requires_grad_(flag)
    return float(np.abs(side.prompt_gradient() - want.numpy()).max()) / max(float(want.abs().max()), 1e-12)


def export_split_side(
    side: DeviceSide, sample: tuple[torch.Tensor, torch.Tensor], directory: Path, optimizer: OptimizerSettings
) -> SplitExportCheck:
    """Write the device side's training, eval and optimizer graphs, checkpoint and frozen weights into `directory`
    (which must exist); only the soft prompt trains. `sample` = (input_ids, attention_mask), a real batch."""
    graph = CutGraph(side).eval()
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "forward.onnx"
        forward = export_forward(graph, sample, path, CUT, {0: "batch", 1: "positions"})
        names = [initializer.name for initializer in forward.graph.initializer]
        if PROMPT not in names:
            raise ExportError(f"the exported device side lost its soft prompt ({PROMPT!r}); export it unfolded")
        weights_read_in_place(forward)
        onnx.save(forward, str(path))
        diff, scale = _check_cut(path, graph, sample)
        if diff > LOGITS_TOLERANCE * max(1.0, scale):
            raise ExportError(f"the ONNX cut differs from PyTorch's by {diff:.3g} (largest |value| {scale:.3g})")
        frozen = {name for name in names if name != PROMPT}
        alias_repeated_frozen(forward, frozen)
        write_safetensors(directory / FROZEN_FILE, feed_frozen(forward, frozen), {})
        with native_log_captured():
            artifacts.generate_artifacts(
                forward,
                requires_grad=[PROMPT],
                loss=CutVectorJacobian(),
                optimizer=optimizer.adamw(),
                artifact_directory=str(directory),
                additional_output_names=[CUT],
            )
    gradient_error = _check_gradient(directory, graph, sample)
    if gradient_error > GRADIENT_TOLERANCE:
        raise ExportError(f"ONNX Runtime's prompt gradient differs from PyTorch's by {gradient_error:.3g} of its scale")
    return SplitExportCheck(diff, scale, gradient_error)
