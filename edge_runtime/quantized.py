"""Frozen weights held as 8-bit integers with one float32 scale per output row, dequantized where they are used.

Imported by the PyTorch backend, the exporter and the coordinator; it needs torch. An emulator's frozen matrices
(the kept middle layers, and the tied token embedding and head) are replaced in place by `QuantizedLinear` and
`QuantizedEmbedding`; the resident form is the int8 one. A linear layer dequantizes its weight in the forward
pass and again in the backward pass (dX = dY·W), so no float copy outlives the matmul that reads it; the
embedding dequantizes only the rows it looks up. Exported to ONNX, a weight is `DequantizeLinear(q, scale,
axis=0)`, which ONNX Runtime training runs in front of the frozen matmul (exporters/onnx_rewrites.py). A
vocabulary-sized head is dequantized in slices of CHUNK_BYTES.

A layer that layerwise compression fake-quantized to b ≤ 8 bits is stored on its own grid (2^(b-1) - 1 levels a
side), which reproduces its compressed values exactly; every other frozen matrix is rounded to 8 bits here.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from edge_runtime.memory import DEQUANTIZE_SLICE_BYTES

# Config attribute of an emulator with quantized storage: {"bits": {module path: bits}, "tied_head": path | None}.
QUANTIZED_RECORD = "offsite_quantized"
STORAGE_KINDS = ("float32", "int8")
STORED_BITS = 8
QUANTIZED_VALUES = "weight_values"  # the int8 buffer of a quantized module (its scales: weight_scale)
# A large matrix (a vocabulary head) is dequantized this many float bytes at a time, so no whole float copy exists.
CHUNK_BYTES = DEQUANTIZE_SLICE_BYTES


def quantize_rows(matrix: torch.Tensor, bits: int = STORED_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest per row: (int8 values in ±(2^(bits-1) - 1), float32 scale per row).

    >>> values, scale = quantize_rows(torch.tensor([[1.0, -0.6, 0.25]]), 4)
    >>> values.tolist(), round(float(scale[0]), 4)
    ([[7, -4, 2]], 0.1429)
    """
    if not 2 <= bits <= STORED_BITS:
        raise ValueError(f"bits = {bits} must be in 2..{STORED_BITS} to be stored in int8")
    levels = 2 ** (bits - 1) - 1
    matrix = matrix.detach().float()
    scale = (matrix.abs().amax(dim=1) / levels).clamp_min(torch.finfo(torch.float32).tiny)
    values = (matrix / scale[:, None]).round().clamp(-levels, levels).to(torch.int8)
    return values, scale


def dequantize(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 matrix an int8 one with per-row scales stands for."""
    return values.to(torch.float32) * scale[:, None]


_scratch = threading.local()


def _dequantized_in_scratch(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`dequantize(values, scale)` written into this thread's one buffer of that shape, valid until the next call
    for a matrix of the same shape.

    A fresh float matrix per use (every frozen matmul, forward, recomputed and backward) is hundreds of MiB-sized
    allocations a step, which glibc's heap cannot give back once longer-lived tensors sit above them: the PyTorch
    backend peaked at 1,249 MiB on the default bundle with int8 weights (micro-batch 1), and at 841 MiB, 27 %
    faster, with these buffers (one per weight shape, about 30 MiB for SmolLM2).
    """
    buffers: dict[tuple[int, ...], torch.Tensor] = _scratch.__dict__.setdefault("buffers", {})
    shape = tuple(values.shape)
    if shape not in buffers:  # a normal tensor even when first made under inference_mode (training reuses it)
        with torch.inference_mode(False):
            buffers[shape] = torch.empty(shape, dtype=torch.float32)
    return buffers[shape].copy_(values).mul_(scale[:, None])  # `mul(values, scale, out=)` would cast a copy first


class _DequantizedMatmul(torch.autograd.Function):
    """x @ Wᵀ with W = dequantize(values, scale), built again in the backward pass instead of being kept."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(values, scale)
        return hidden @ _dequantized_in_scratch(values, scale).t()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        values, scale = ctx.saved_tensors
        return grad @ _dequantized_in_scratch(values, scale), None, None

    @staticmethod
    def symbolic(graph: Any, hidden: Any, values: Any, scale: Any) -> Any:
        weight = graph.op("DequantizeLinear", values, scale, axis_i=0)
        return graph.op("MatMul", hidden, graph.op("Transpose", weight, perm_i=[1, 0]))


class QuantizedLinear(nn.Module):
    """A frozen linear map y = x Wᵀ + b whose [out, in] weight is stored as int8 values and row scales."""

    def __init__(self, values: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = values.shape
        self.register_buffer("weight_values", values)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = max(1, CHUNK_BYTES // (4 * self.in_features))
        values, scale = self.weight_values, self.weight_scale
        if self.out_features <= rows:
            out = _DequantizedMatmul.apply(hidden, values, scale)
        else:
            starts = range(0, self.out_features, rows)
            parts = [_DequantizedMatmul.apply(hidden, values[a : a + rows], scale[a : a + rows]) for a in starts]
            out = torch.cat(parts, dim=-1)
        return out if self.bias is None else out + self.bias


class QuantizedEmbedding(nn.Module):
    """A frozen token embedding [vocab, width] stored as int8 rows with one scale each; looks up, then dequantizes."""

    def __init__(self, values: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = values.shape
        self.register_buffer("weight_values", values)
        self.register_buffer("weight_scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_values[ids].to(torch.float32) * self.weight_scale[ids].unsqueeze(-1)


def _weight_rows(module: nn.Module) -> torch.Tensor:
    """The module's weight as [out, in] (GPT-2's Conv1D stores [in, out])."""
    return module.weight if isinstance(module, nn.Linear | nn.Embedding) else module.weight.t()


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_modules(model: nn.Module, bits: dict[str, int], tied_head: str | None = None) -> None:
    """Replace each module at `bits`' paths (linear maps, or the input embedding) by its quantized form, in place;
    `tied_head`, the output head tied to that embedding, then reads the embedding's int8 rows."""
    embedding = None
    for path, width in bits.items():
        module = model.get_submodule(path)
        values, scale = quantize_rows(_weight_rows(module), width)
        if isinstance(module, nn.Embedding):
            embedding = QuantizedEmbedding(values, scale)
            _set(model, path, embedding)
        else:
            _set(model, path, QuantizedLinear(values, scale, getattr(module, "bias", None)))
    if tied_head is not None:
        if embedding is None:
            raise ValueError(f"the head {tied_head} is tied to an embedding that is not quantized")
        head = QuantizedLinear(embedding.weight_values, embedding.weight_scale)
        _set(model, tied_head, head)


def quantized_structure(model: nn.Module, record: dict[str, Any]) -> None:
    """Give a model built with empty (meta) weights the quantized modules its record names; the saved values are
    assigned after (`load_state_dict(..., assign=True)`), then `tie_quantized_head` shares the head's rows."""
    quantize_modules(model, record["bits"], record.get("tied_head"))


def tie_quantized_head(model: nn.Module, record: dict[str, Any]) -> None:
    """Point a tied quantized head at its embedding's int8 rows again (they are saved once, under the embedding)."""
    head_path = record.get("tied_head")
    if head_path is None:
        return
    embedding = model.get_input_embeddings()
    _set(model, head_path, QuantizedLinear(embedding.weight_values, embedding.weight_scale))


def storage_record(model: nn.Module) -> dict[str, Any] | None:
    """The quantized-storage record of a model, None when its weights are all float."""
    return getattr(model.config, QUANTIZED_RECORD, None)


def stored_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers take as stored (shared tensors once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to save: every parameter and buffer once (a tied head's shared int8 rows are not repeated)."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor.contiguous()
    return state
