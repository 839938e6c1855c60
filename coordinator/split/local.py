"""SFPrompt's local loss: a small head on the device's cut, so the device can take steps without the server.

The head reads each row's last real hidden state at the cut through a copy of the model's final norm and the
label words' rows of the model's own output head ([labels, hidden]: 2 x 576 weights for SmolLM2's two labels,
not the 49,152-row head), the "logit lens" at layer k. It trains beside the soft prompt: on the server's steps on
the cut alone (it learns to read the cut as the server's layers would answer), on local steps together with the
prompt.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel

from coordinator.architectures import spec_for
from coordinator.split.sides import Cut


class LocalHead(nn.Module):
    """Label logits [B, C] from a cut: final norm, then the label words' rows of the output head."""

    def __init__(self, model: PreTrainedModel, label_token_ids: torch.Tensor) -> None:
        super().__init__()
        spec = spec_for(model.config.model_type)
        self.norm = copy.deepcopy(model.get_submodule(spec.final_norm)).requires_grad_(True)
        rows = model.get_submodule(spec.head).weight.detach()[label_token_ids].clone()
        self.rows = nn.Parameter(rows)

    def forward(self, cut: Cut) -> torch.Tensor:
        return self.norm(cut.last()) @ self.rows.T
