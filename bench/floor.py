"""The physical memory floor of a training step: what any runtime must hold, whatever its overheads.

Weights as stored (trainable ones float32, frozen ones float32 or int8 as the bundle holds them), trainable
state (gradient and AdamW's two moments, float32), and the activations that must exist to back-propagate: each
back-propagated layer's input (everything else can be recomputed from it), one layer's full working set while it
is recomputed and differentiated, and the logits with their gradient. No runtime code, no allocator slack, no
checkpoint buffer.
"""

from __future__ import annotations

from edge_runtime.memory import FLOAT_BYTES, HIDDEN_FACTOR, INTERMEDIATE_FACTOR, ModelShape


def memory_floor(shape: ModelShape, micro_batch: int, sequence: int, kind: str = "classification") -> dict[str, int]:
    """Bytes of each part of the floor and their total, for `micro_batch` rows of `sequence` tokens."""
    tokens = micro_batch * sequence
    one_layer = (
        tokens * (HIDDEN_FACTOR["torch"] * shape.hidden + INTERMEDIATE_FACTOR["torch"] * shape.intermediate)
        + micro_batch * shape.heads * sequence * sequence
    )
    logit_rows = micro_batch if kind == "classification" else tokens
    parts = {
        "weights": shape.frozen_bytes + shape.trainable_parameters * FLOAT_BYTES,
        "trainable_state": 3 * shape.trainable_parameters * FLOAT_BYTES,
        "activations": int(
            (shape.backprop_layers * tokens * shape.hidden + one_layer + 2 * logit_rows * shape.vocab) * FLOAT_BYTES
        ),
    }
    return parts | {"total": sum(parts.values())}


def full_model_shape(shape: ModelShape, parameters: int, layers: int) -> ModelShape:
    """The shape of full fine-tuning: every layer back-propagated, every one of `parameters` trainable."""
    return ModelShape(
        hidden=shape.hidden,
        intermediate=shape.intermediate,
        heads=shape.heads,
        vocab=shape.vocab,
        layers=layers,
        backprop_layers=layers,
        frozen_parameters=0,
        trainable_parameters=parameters,
    )
