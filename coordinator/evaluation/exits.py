"""Early exits and voting (Edge-LLM): the final norm and head read after chosen layers; the surest exit answers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel

from coordinator.architectures import spec_for
from edge_runtime.torch_graph import truncated


def exit_views(model: PreTrainedModel, exits: Sequence[int]) -> list[PreTrainedModel]:
    """One view of `model` per exit layer index: its layers up to that one, then its final norm and head."""
    layers = spec_for(model.config.model_type).layers
    return [truncated(model, layers, layer + 1) for layer in exits]


def vote(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [..., C] from exit logits [E, ..., C]: per prediction, those of the exit whose top class
    is the most probable (confidence voting).

    >>> sure, unsure = torch.tensor([[0.0, 4.0]]), torch.tensor([[1.0, 0.0]])
    >>> vote(torch.stack([unsure, sure])).argmax(-1).tolist()
    [1]
    """
    log_probs = logits.float().log_softmax(dim=-1)
    surest = log_probs.amax(dim=-1).argmax(dim=0, keepdim=True)  # [1, ...]
    return log_probs.gather(0, surest.unsqueeze(-1).expand(1, *log_probs.shape[1:])).squeeze(0)


def voted(
    model: PreTrainedModel, exits: Sequence[int] | None, logits_of: Callable[[PreTrainedModel], torch.Tensor]
) -> torch.Tensor:
    """`logits_of(model)` as log-probabilities, voted across `exits` when given."""
    if not exits:
        return logits_of(model).float().log_softmax(dim=-1)
    return vote(torch.stack([logits_of(view) for view in exit_views(model, exits)]))
