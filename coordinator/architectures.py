"""Declarative specs of where each model family keeps its blocks, embeddings, final norm and head."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from coordinator.errors import ArchitectureError


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where a causal-LM family keeps its parts, as dotted module paths from the top model.

    `backbone` maps input ids to the final (normed) hidden states; `head` maps those to logits.
    """

    family: str
    model_types: tuple[str, ...]
    backbone: str
    layers: str
    embeddings: tuple[str, ...]
    final_norm: str
    head: str = "lm_head"
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # the projections `lora` trains by default


ARCHITECTURES: tuple[ArchitectureSpec, ...] = (
    ArchitectureSpec(
        family="llama",
        model_types=("llama", "mistral", "qwen2"),
        backbone="model",
        layers="model.layers",
        embeddings=("model.embed_tokens",),
        final_norm="model.norm",
    ),
    ArchitectureSpec(
        family="gpt2",
        model_types=("gpt2",),
        backbone="transformer",
        layers="transformer.h",
        embeddings=("transformer.wte", "transformer.wpe"),
        final_norm="transformer.ln_f",
        lora_targets=("c_attn",),  # GPT-2 projects query, key and value in one Conv1D
    ),
    ArchitectureSpec(
        family="opt",
        model_types=("opt",),
        backbone="model.decoder",
        layers="model.decoder.layers",
        embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        final_norm="model.decoder.final_layer_norm",
    ),
)


def supported_model_types() -> list[str]:
    """Every `config.model_type` the registry knows, sorted."""
    return sorted(model_type for spec in ARCHITECTURES for model_type in spec.model_types)


def spec_for(model_type: str) -> ArchitectureSpec:
    """The spec for a `config.model_type`; raises ArchitectureError naming the supported types."""
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    raise ArchitectureError(
        f"model type {model_type!r} has no architecture spec; supported: {', '.join(supported_model_types())}. "
        "Add an ArchitectureSpec to coordinator/architectures.py to support it."
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's ModuleList of decoder blocks."""
    return model.get_submodule(spec_for(model.config.model_type).layers)
