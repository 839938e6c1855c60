"""Soft prompts (prompt tuning, Lester et al., 2021): trainable vectors the backbone reads before every input.

The vectors are a parameter of the backbone module itself (`<backbone>.soft_prompt`, e.g. `model.soft_prompt`),
and two forward hooks on that module do the rest, so every caller of the backbone or of the whole model (the
training graph, scoring, the ONNX trace, `generate`) gets the prompt without knowing of it. Before the backbone
runs, the input ids become embeddings with the prompt in front and the attention mask, positions and cache
positions grow by the prompt's length; after it runs, the prompt's positions are cut from the hidden states, so
position t still holds input token t. With a key-value cache the prompt goes in front on the first call only (the
cache holds it afterwards). A saved model records the prompt in its config (`offsite_soft_prompt`) and
`load_causal_lm` attaches it again; plain transformers would drop the weight.

Needs torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SOFT_PROMPT = "soft_prompt"
# Config attribute of a model saved with a soft prompt: {"backbone": module path, "tokens": prompt length}.
PROMPT_RECORD = "offsite_soft_prompt"
_HOOKS = "_offsite_prompt_hooks"
_IN_FRONT = "_offsite_prompt_in_front"  # whether this call put the prompt in front (the after-hook cuts it off)


def prompt_tokens(backbone: nn.Module) -> int:
    """The length of `backbone`'s soft prompt; 0 without one."""
    prompt = getattr(backbone, SOFT_PROMPT, None)
    return 0 if prompt is None else prompt.shape[0]


def attach_prompt(backbone: nn.Module, initial: torch.Tensor) -> nn.Parameter:
    """Give `backbone` (a transformers base model) a trainable soft prompt that starts at `initial` [tokens, width],
    width that of its input embeddings; return the prompt's parameter."""
    width = backbone.get_input_embeddings().embedding_dim
    if initial.dim() != 2 or initial.shape[0] < 1 or initial.shape[1] != width:
        raise ValueError(f"a soft prompt is [tokens >= 1, {width}] for this model, not {list(initial.shape)}")
    if hasattr(backbone, _HOOKS):
        raise ValueError(f"{type(backbone).__name__} already has a soft prompt; detach it first")
    like = next(backbone.parameters())  # the backbone's dtype and device (its embedding may be stored as int8)
    backbone.register_parameter(SOFT_PROMPT, nn.Parameter(initial.detach().clone().to(like)))
    hooks = (backbone.register_forward_pre_hook(_before, with_kwargs=True), backbone.register_forward_hook(_after))
    setattr(backbone, _HOOKS, hooks)
    return getattr(backbone, SOFT_PROMPT)


def detach_prompt(backbone: nn.Module) -> None:
    """Take `backbone`'s soft prompt and its hooks away (nothing happens without one)."""
    for hook in getattr(backbone, _HOOKS, ()):
        hook.remove()
    for name in (_HOOKS, _IN_FRONT, SOFT_PROMPT):
        if hasattr(backbone, name):
            delattr(backbone, name)


def _extended_mask(mask: torch.Tensor, tokens: int, in_front: bool) -> torch.Tensor:
    """A 2D [B, K] keep-mask or a 4D [B, 1, Q, K] additive mask with the prompt's keys (always visible) in front;
    on the call that puts the prompt in front, also its own rows: causal among the prompt, blind to the input."""
    if mask.dim() == 2:
        return torch.cat([torch.ones_like(mask[:, :1]).expand(-1, tokens), mask], dim=1)
    if not mask.is_floating_point():
        raise TypeError(f"a 4D attention mask must be additive (float), not {mask.dtype}")
    rows = torch.cat([torch.zeros_like(mask[..., :1]).expand(-1, -1, -1, tokens), mask], dim=-1)
    if not in_front:
        return rows
    blocked = torch.finfo(mask.dtype).min
    own = torch.full((tokens, tokens), blocked, dtype=mask.dtype, device=mask.device).triu(1)
    own = own[None, None].expand(mask.shape[0], -1, -1, -1)
    blind = torch.full_like(mask[:, :, :1, :], blocked).expand(-1, -1, tokens, -1)
    return torch.cat([torch.cat([own, blind], dim=-1), rows], dim=2)


def _shifted(positions: torch.Tensor, tokens: int, in_front: bool) -> torch.Tensor:
    """Positions [B, T] or cache positions [T] moved past the prompt, with the prompt's own 0..tokens-1 in front."""
    moved = positions + tokens
    if not in_front:
        return moved
    own = torch.arange(tokens, dtype=positions.dtype, device=positions.device)
    if positions.dim() == 2:
        own = own[None].expand(positions.shape[0], -1)
    return torch.cat([own, moved], dim=-1)


def _before(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    if len(args) > 1:
        raise TypeError("a soft-prompted backbone takes its inputs by keyword (input_ids=..., attention_mask=...)")
    if args:
        kwargs = {**kwargs, "input_ids": args[0]}
    prompt = getattr(module, SOFT_PROMPT)
    tokens = prompt.shape[0]
    cache = kwargs.get("past_key_values")
    in_front = cache is None or cache.get_seq_length() == 0
    setattr(module, _IN_FRONT, in_front)
    if in_front:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = module.get_input_embeddings()(kwargs["input_ids"])
        front = prompt[None].expand(embeds.shape[0], -1, -1).to(embeds.dtype)
        kwargs["inputs_embeds"], kwargs["input_ids"] = torch.cat([front, embeds], dim=1), None
    for name, grow in (("attention_mask", _extended_mask), ("position_ids", _shifted), ("cache_position", _shifted)):
        if kwargs.get(name) is not None:
            kwargs[name] = grow(kwargs[name], tokens, in_front)
    return (), kwargs


def _after(module: nn.Module, args: tuple, output: Any) -> Any:
    if not getattr(module, _IN_FRONT, False):
        return output
    tokens = prompt_tokens(module)
    if isinstance(output, tuple):
        return (output[0][:, tokens:], *output[1:])
    output.last_hidden_state = output.last_hidden_state[:, tokens:]
    if getattr(output, "hidden_states", None) is not None:
        output.hidden_states = tuple(hidden[:, tokens:] for hidden in output.hidden_states)
    return output
