"""A causal LM cut after layer k: the device's side (embeddings, soft prompt, first k layers) and the server's.

Only the cut crosses between them: the hidden states after layer k, prompt positions included (the server's
layers attend to the prompt's keys), with their attention mask; and back, the loss's gradient at those states.
The device never holds the later layers or the head; the server never sees a token id, only the cut (which,
k layers in, still reveals much of the input: the data owner's risk, see the README). Together the two sides
compute exactly what the full model with that soft prompt attached computes (`PromptAdapter`).

Llama-family models only: their positions enter every layer as rotary embeddings, so the server's backbone can
start from the cut as if it were input embeddings. GPT-2 and OPT add learned positions to the embeddings, which
the server side would add a second time.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel

from coordinator.adapters.prompt import PromptAdapter
from coordinator.architectures import spec_for
from coordinator.emulator import config_with_layers, state_with_layers
from coordinator.errors import ConfigError
from edge_runtime.backends.split_torch import Cut, DeviceSide
from edge_runtime.soft_prompt import SOFT_PROMPT

SPLIT_FAMILIES = ("llama",)


class ServerSide(nn.Module):
    """The layers after the cut, the final norm and the head; frozen, on the model owner's server."""

    def __init__(self, backbone: nn.Module, head: nn.Module, prompt_tokens: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.prompt_tokens = prompt_tokens

    def hidden(self, cut: Cut) -> torch.Tensor:
        return self.backbone(
            inputs_embeds=cut.hidden, attention_mask=cut.attention_mask, use_cache=False
        ).last_hidden_state

    def logits(self, cut: Cut) -> torch.Tensor:
        """Vocabulary logits [B, T, V] at the input's positions (the prompt's cut off), as the full model's."""
        return self.head(self.hidden(cut)[:, self.prompt_tokens :])

    def last_token_logits(self, cut: Cut) -> torch.Tensor:
        """Vocabulary logits [B, V] at each row's last real token (the head runs on B positions, not B * T)."""
        return self.head(Cut(self.hidden(cut), cut.attention_mask).last())


def _backbone_of(model: PreTrainedModel, layers: range, final_norm: bool) -> nn.Module:
    """A copy of `model`'s backbone holding only `layers` (full-model indices), with or without its final norm."""
    spec = spec_for(model.config.model_type)
    backbone = model.get_submodule(spec.backbone)
    kept = list(layers)
    part = type(backbone)(config_with_layers(model.config, kept)).to(model.dtype)
    state = state_with_layers(backbone.state_dict(), spec.layers.removeprefix(spec.backbone + "."), kept)
    part.load_state_dict(state, strict=True)  # copies into the part's own tensors: nothing is shared
    if not final_norm:
        setattr(part, spec.final_norm.removeprefix(spec.backbone + "."), nn.Identity())
    return part.eval().requires_grad_(False)


def split_model(model: PreTrainedModel, cut: int, prompt: PromptAdapter) -> tuple[DeviceSide, ServerSide]:
    """`model` cut after its first `cut` layers; the device side's soft prompt starts as `prompt` would attach it."""
    spec = spec_for(model.config.model_type)
    if spec.family not in SPLIT_FAMILIES:
        raise ConfigError(
            f"split learning supports the {', '.join(SPLIT_FAMILIES)} family (rotary positions), not "
            f"{model.config.model_type!r}: its learned positions are added to the embeddings, before the cut"
        )
    layers = model.config.num_hidden_layers
    if not 1 <= cut < layers:
        raise ConfigError(f"cut={cut} must leave layers on both sides: choose 1..{layers - 1} for this model")
    embeddings = model.get_submodule(spec.backbone).get_input_embeddings().weight
    start = embeddings.detach()[prompt.starting_ids(embeddings.shape[0]).to(embeddings.device)]
    device = DeviceSide(_backbone_of(model, range(cut), final_norm=False), start)
    head = copy.deepcopy(model.get_submodule(spec.head)).requires_grad_(False)
    server = ServerSide(_backbone_of(model, range(cut, layers), final_norm=True), head, prompt.tokens)
    return device, server


def prompt_weights(model: PreTrainedModel, device: DeviceSide) -> dict[str, torch.Tensor]:
    """The device's trained prompt named as a `prompt` adapter's result for `model`: it aggregates and plugs in
    (`PromptAdapter.merge`) as any prompt adapter's does."""
    return {f"{spec_for(model.config.model_type).backbone}.{SOFT_PROMPT}": device.soft_prompt.detach().clone()}
