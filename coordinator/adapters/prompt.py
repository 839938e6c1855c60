"""Soft prompts (prompt tuning, SFPrompt): `tokens` trainable vectors before every input; the model stays frozen.

The prompt belongs to no layer: its gradient comes back through the whole emulator, and the adapter layers stay
exact but frozen. It starts as the embeddings of `tokens` vocabulary entries drawn from the first 5,000 ids (the
sampled-vocabulary start Lester et al. found to work; byte-pair vocabularies list their earliest merges, the most
common pieces, first), so an untrained prompt computes exactly what that text in front of the input would, not
nothing: no prompt is a no-op, since every attention row also weighs the prompt's keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from coordinator.adapters.layers import plug_in, weighted_mean
from coordinator.architectures import spec_for
from coordinator.errors import ConfigError
from edge_runtime.soft_prompt import PROMPT_RECORD, SOFT_PROMPT, attach_prompt, detach_prompt, prompt_tokens

COMMON_IDS = 5000  # the starting vectors are drawn from this many first vocabulary ids


@dataclass(frozen=True)
class PromptAdapter:
    """`prompt:tokens=20`: a soft prompt of `tokens` vectors, drawn from the vocabulary's embeddings by `seed`."""

    tokens: int = 20
    seed: int = 0

    name = "prompt"

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ConfigError(f"prompt tokens={self.tokens} must be at least 1, e.g. prompt:tokens=20")

    @classmethod
    def from_options(cls, options: dict[str, str]) -> PromptAdapter:
        unknown = sorted(set(options) - {"tokens", "seed"})
        if unknown:
            raise ConfigError(f"adapter kind 'prompt' takes tokens and seed, not {', '.join(unknown)}")
        try:
            return cls(int(options.get("tokens", 20)), int(options.get("seed", 0)))
        except ValueError:
            raise ConfigError(f"prompt tokens and seed must be whole numbers (got {options})") from None

    def options(self) -> dict[str, object]:
        return {"tokens": self.tokens, "seed": self.seed}

    def starting_ids(self, vocab_size: int) -> torch.Tensor:
        """The vocabulary ids [tokens] whose embeddings the prompt starts as."""
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randint(0, min(COMMON_IDS, vocab_size), (self.tokens,), generator=generator)

    def attach(self, model: PreTrainedModel, bottom: int, top: int) -> dict[str, nn.Parameter]:
        path = spec_for(model.config.model_type).backbone
        backbone = model.get_submodule(path)
        if prompt_tokens(backbone) == 0:
            embeddings = backbone.get_input_embeddings().weight
            ids = self.starting_ids(embeddings.shape[0]).to(embeddings.device)
            attach_prompt(backbone, embeddings.detach()[ids])
        return {f"{path}.{SOFT_PROMPT}": getattr(backbone, SOFT_PROMPT)}

    def detach(self, model: PreTrainedModel) -> None:
        detach_prompt(model.get_submodule(spec_for(model.config.model_type).backbone))

    def merge(self, model: PreTrainedModel, weights: dict[str, torch.Tensor], bottom: int, top: int) -> None:
        """Keep the trained prompt on `model`, recorded in its config: this project's loader attaches it again."""
        self.attach(model, bottom, top)
        plug_in(model, weights)
        backbone = spec_for(model.config.model_type).backbone
        setattr(model.config, PROMPT_RECORD, {"backbone": backbone, "tokens": self.tokens})

    def average(self, results: list[dict[str, torch.Tensor]], shares: list[float]) -> dict[str, torch.Tensor]:
        """Prompt vectors average position by position, like any weights: every device starts a round from the
        same prompt, so vector i is the same slot everywhere."""
        return weighted_mean(results, shares)
