"""A split job's device side on PyTorch, for devices without ONNX Runtime training: the same cut and prompt step
as `split_ort.py`, from the bundle's `torch/` folder (the first k layers as a transformers backbone).

`DeviceSide` is the module itself (the coordinator's split learning builds it too); `TorchCutSide` trains its
prompt with AdamW and clipping as the bundle's optimizer record sets them, numpy in and out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_runtime.backends.pytorch import restore_trainable, save_trainable
from edge_runtime.bundle import BundleError
from edge_runtime.manifest import OptimizerRecord

CHECKPOINT = "torch_split.safetensors"


@dataclass(frozen=True)
class Cut:
    """What the device sends: hidden states [B, P + T, H] after its last layer and their attention mask
    [B, P + T] (ones for the P prompt positions in front, then the input's)."""

    hidden: torch.Tensor
    attention_mask: torch.Tensor

    def last(self) -> torch.Tensor:
        """Each row's hidden state [B, H] at its last real token (inputs are right-padded)."""
        return self.hidden[torch.arange(self.hidden.shape[0]), self.attention_mask.sum(dim=1) - 1]


class DeviceSide(nn.Module):
    """The embeddings, a trainable soft prompt and the first k layers; `forward` gives the cut."""

    def __init__(self, backbone: nn.Module, prompt: torch.Tensor) -> None:
        super().__init__()
        self.backbone = backbone
        self.soft_prompt = nn.Parameter(prompt.detach().clone())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Cut:
        embeds = self.backbone.get_input_embeddings()(input_ids)
        front = self.soft_prompt[None].expand(input_ids.shape[0], -1, -1).to(embeds.dtype)
        mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], self.soft_prompt.shape[0]), attention_mask], 1)
        hidden = self.backbone(
            inputs_embeds=torch.cat([front, embeds], dim=1), attention_mask=mask, use_cache=False
        ).last_hidden_state
        return Cut(hidden, mask)


def load_backbone(folder: Path, final_norm: str) -> nn.Module:
    """The first k layers saved in `folder` (a transformers backbone), frozen, with its final norm (attribute
    `final_norm`) an identity: the cut is taken before it, as the server's layers expect."""
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the final norm's weights are missing on purpose: no warning
    try:
        backbone, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    finally:
        transformers_logging.set_verbosity(verbosity)
    missing = set(info["missing_keys"]) - {f"{final_norm}.weight", f"{final_norm}.bias"}
    if missing or info["unexpected_keys"]:
        unexpected = sorted(info["unexpected_keys"])[:3]
        raise BundleError(f"{folder} does not hold the device side's layers (missing {sorted(missing)[:3]}, "
                          f"unexpected {unexpected}); export the bundle again")  # fmt: skip
    setattr(backbone, final_norm, nn.Identity())
    return backbone.float().eval().requires_grad_(False)


class TorchCutSide:
    """`DeviceSide` with AdamW on its prompt: the cut for a batch, then the prompt's step for the server's
    gradient at it (the forward runs again, as on ONNX Runtime: nothing is held while the device waits)."""

    name = "torch-split"

    def __init__(self, folder: Path, final_norm: str, prompt: np.ndarray, optimizer: OptimizerRecord,
                 threads: int | None = None) -> None:  # fmt: skip
        if threads is not None:
            torch.set_num_threads(threads)
        self.side = DeviceSide(load_backbone(folder, final_norm), torch.from_numpy(prompt))
        self.trainable = {"soft_prompt": self.side.soft_prompt}
        self.max_grad_norm = optimizer.max_grad_norm
        self.optimizer = torch.optim.AdamW(self.trainable.values(), lr=0.0, eps=optimizer.eps,
                                           weight_decay=optimizer.weight_decay)  # fmt: skip

    def cut(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.side(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).hidden.numpy()

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, gradient: np.ndarray, lr: float) -> None:
        """The prompt's AdamW step (its gradient clipped by norm) for the server's gradient at the cut."""
        cut = self.side(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).hidden
        cut.backward(torch.from_numpy(np.ascontiguousarray(gradient, np.float32)))
        nn.utils.clip_grad_norm_(self.trainable.values(), self.max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def prompt(self) -> np.ndarray:
        return self.side.soft_prompt.detach().numpy().copy()

    def load_prompt(self, prompt: np.ndarray) -> None:
        with torch.no_grad():
            self.side.soft_prompt.copy_(torch.from_numpy(np.asarray(prompt, np.float32)))

    def save(self, directory: Path) -> None:
        save_trainable(directory / CHECKPOINT, self.trainable, self.optimizer)

    def resume(self, directory: Path) -> None:
        restore_trainable(directory / CHECKPOINT, self.trainable, self.optimizer)
