"""Peak training memory, predicted from the model's shape; used by the coordinator's planner and by the device.

The prediction adds what stays resident (the runtime itself, frozen weights as stored (float32 or int8),
trainable weights, gradients, AdamW's two moments) to two transients: a step's activations kept for
back-propagation (every layer's, or with recomputation each layer's input and one layer's) plus the logits with
their gradient, and writing a checkpoint (ONNX Runtime serializes its state in memory first; that state is what
training changes, as frozen matrices are fed from their own file: edge_runtime/frozen_inputs.py). Freed memory
goes back to the heap, so the larger transient counts; except that ONNX Runtime runs a recomputing graph from its
arena, which keeps a step's memory, and a checkpoint written after a step adds to it.
The per-token activation factors and the runtimes' own footprint were measured on x86-64 with ONNX Runtime
training 1.19.2 (buffer reuse off, as edge_runtime/backends/ort.py runs it) and torch 2.13;
`python -m bench.device_training` compares predictions with real runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edge_runtime.errors import OffsiteError

FLOAT_BYTES = 4
MIB = 1024**2
# Resident memory of a process that has loaded the backend but no model (measured; see module docstring). ORT's was
# 145 MiB while the device also opened an eval session (15-18 MiB on SmolLM2), which it no longer does.
RUNTIME_BYTES = {"ort": 130 * MIB, "torch": 450 * MIB}
# What a graph run from ONNX Runtime's arena held beyond that throughout, whatever the micro-batch (the arena
# grows in regions; SmolLM2 default bundle with recomputation, 4 to 32 rows).
ARENA_BYTES = 105 * MIB
# Float32 values kept per token per back-propagated layer, in units of hidden and intermediate width.
HIDDEN_FACTOR = {"ort": 10.5, "torch": 8.6}
INTERMEDIATE_FACTOR = {"ort": 4.4, "torch": 3.6}
# Attention-probability-sized tensors kept per back-propagated layer.
ATTENTION_COPIES = {"ort": 2.25, "torch": 1.0}
# Logit tensors alive at once (logits, softmax, gradient).
LOGIT_COPIES = 3.0
# With recomputation: one layer's activations (and their gradients) in units of what a layer keeps otherwise.
# ONNX Runtime then runs from its arena, which packs tensors tighter than glibc's heap (0.56x a layer's kept bytes
# without recomputation, so 1.5 layers are 0.84). PyTorch's is mostly glibc's heap: recomputation's short-lived
# tensors leave holes it cannot give back (with every allocation mapped on its own the same runs needed 1.5;
# default bundle, int8, 8 and 32 rows of up to 57 tokens).
RECOMPUTE_WORKING = {"ort": 0.84, "torch": 8.0}
# An int8 matrix is dequantized at most this many float bytes at a time (edge_runtime/quantized.py slices a head);
# alive at once: one slice for a forward and one for a backward matmul.
DEQUANTIZE_SLICE_BYTES = 16 * MIB
DEQUANTIZED_BYTES = 2 * DEQUANTIZE_SLICE_BYTES
# Writing a checkpoint, in units of the state written (trainable weights and both moments): ONNX Runtime
# serializes it into an in-memory FlatBuffer that grows by half its size at a time, the old and the new buffer
# alive together, so between 1.33x and 2x depending on where the last growth falls (measured 1.46x and 1.94x on
# two bundles when the state still held the frozen weights); the PyTorch backend writes it once.
CHECKPOINT_COPIES = {"ort": 1.8, "torch": 1.0}


class BudgetError(OffsiteError):
    """The smallest configuration still does not fit the memory budget."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide training memory, read from the emulator and the adapter."""

    hidden: int
    intermediate: int
    heads: int
    vocab: int
    layers: int
    backprop_layers: int
    frozen_parameters: int
    trainable_parameters: int
    prefix_tokens: int = 0  # soft-prompt vectors in front of every row: the layers attend over them like tokens
    per_example_gradients: bool = False  # DP-SGD: each row's gradient of every trainable tensor, then clipped
    quantized_parameters: int = 0  # frozen weights stored as int8 (a float32 scale per row beside them)
    recompute_layers: bool = False  # layer activations recomputed in the backward pass: one layer's held at once

    @property
    def frozen_bytes(self) -> int:
        """The frozen weights as stored: float32, except the int8 ones."""
        return (self.frozen_parameters - self.quantized_parameters) * FLOAT_BYTES + self.quantized_parameters

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes of each part of a training step's peak."""

    runtime: int
    frozen_weights: int
    trainable_weights: int
    gradients: int
    optimizer_state: int
    activations: int
    logits: int
    checkpoint: int
    per_example_gradients: int = 0  # DP-SGD's rows' gradients, their clipped sum and the noise (a step's transient)
    keeps_step_memory: bool = False  # the allocator keeps a step's memory: a checkpoint is written on top of it

    @property
    def resident(self) -> int:
        """What stays allocated through training."""
        return self.runtime + self.frozen_weights + self.trainable_weights + self.gradients + self.optimizer_state

    @property
    def total(self) -> int:
        """The predicted peak: resident plus a step's transient and a checkpoint's, both or the larger."""
        step = self.activations + self.logits + self.per_example_gradients
        return self.resident + (step + self.checkpoint if self.keeps_step_memory else max(step, self.checkpoint))

    def to_dict(self) -> dict[str, int]:
        """The parts in bytes, and the total."""
        parts = asdict(self)
        del parts["keeps_step_memory"]
        return parts | {"total": self.total}


def runs_from_arena(shape: ModelShape, backend: str) -> bool:
    """Whether `backend` trains this model from its own memory arena: ONNX Runtime does for a recomputing graph,
    whose tensors glibc's heap would scatter (edge_runtime/backends/ort.py has the measurements)."""
    return backend == "ort" and shape.recompute_layers


def estimate(shape: ModelShape, micro_batch: int, sequence: int, kind: str, backend: str) -> MemoryEstimate:
    """Predicted peak memory of one training step with `micro_batch` rows of `sequence` tokens (plus the prefix)."""
    if backend not in RUNTIME_BYTES:
        raise OffsiteError(f"backend {backend!r} is not one of {sorted(RUNTIME_BYTES)}")
    logit_rows = micro_batch if kind == "classification" else micro_batch * sequence
    sequence += shape.prefix_tokens
    tokens = micro_batch * sequence
    per_token = HIDDEN_FACTOR[backend] * shape.hidden + INTERMEDIATE_FACTOR[backend] * shape.intermediate
    layer = tokens * per_token + ATTENTION_COPIES[backend] * micro_batch * shape.heads * sequence * sequence
    if shape.recompute_layers:  # each layer's input, then one layer at a time
        kept = shape.backprop_layers * tokens * shape.hidden + RECOMPUTE_WORKING[backend] * layer
    else:
        kept = shape.backprop_layers * layer
    trainable = shape.trainable_parameters * FLOAT_BYTES
    frozen = shape.frozen_bytes
    arena = runs_from_arena(shape, backend)
    return MemoryEstimate(
        runtime=RUNTIME_BYTES[backend] + (ARENA_BYTES if arena else 0),
        frozen_weights=frozen,
        trainable_weights=trainable,
        gradients=trainable,
        optimizer_state=2 * trainable,
        activations=int(kept * FLOAT_BYTES) + (DEQUANTIZED_BYTES if shape.quantized_parameters else 0),
        logits=int(LOGIT_COPIES * logit_rows * shape.vocab * FLOAT_BYTES),
        checkpoint=int(CHECKPOINT_COPIES[backend] * 3 * trainable),
        per_example_gradients=(micro_batch + 2) * trainable if shape.per_example_gradients else 0,
        keeps_step_memory=arena,
    )


def choose_micro_batch(
    shape: ModelShape, batch_size: int, sequence: int, kind: str, backend: str, budget: int, margin: float
) -> tuple[int, MemoryEstimate]:
    """The largest micro-batch dividing `batch_size` whose prediction, plus `margin` of it, fits `budget` bytes."""
    for micro_batch in sorted((m for m in range(1, batch_size + 1) if batch_size % m == 0), reverse=True):
        predicted = estimate(shape, micro_batch, sequence, kind, backend)
        if predicted.total * (1 + margin) <= budget:
            return micro_batch, predicted
    needed = estimate(shape, 1, sequence, kind, backend).total * (1 + margin)
    raise BudgetError(
        f"training needs at least {needed / MIB:,.0f} MiB ({backend}, micro-batch 1, {sequence} tokens, "
        f"{margin:.0%} margin) but the budget is {budget / MIB:,.0f} MiB; raise the budget, keep fewer emulator "
        "layers, or shorten --max-length"
    )
