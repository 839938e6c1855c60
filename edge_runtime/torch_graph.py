"""The trainable forward both backends run: logits at each row's last token, or at every shifted LM position.

Imported by the PyTorch backend and by the ONNX exporter (so both run the same math); it needs torch.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from edge_runtime.manifest import CLASSIFICATION, TASK_KINDS

IGNORE_INDEX = -100
PREFIX = "causal_lm."  # a TrainingGraph's parameter names: the model's own, under its `causal_lm` attribute
_RECOMPUTED = "_offsite_recomputed"


def additive_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] float mask: 0 where a query may attend (causal, real key), the dtype's minimum elsewhere.

    A ready 4D mask makes transformers skip its own mask builder, which the ONNX exporter cannot trace.
    """
    width = attention_mask.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
    blocked = torch.zeros(allowed.shape, dtype=torch.float32, device=attention_mask.device)
    return blocked.masked_fill(~allowed, torch.finfo(torch.float32).min)


class TrainingGraph(nn.Module):
    """Wraps a causal LM: (input_ids [B,T], attention_mask [B,T]) -> logits the loss compares with labels.

    classification: vocabulary logits [B, V] at each row's last real token (labels: the label word's token id).
    language-model: logits [B*(T-1), V] for every next-token position (labels: the next ids, -100 on padding).
    Inputs are right-padded; the model is used under its own parameter names, prefixed `causal_lm.`.
    """

    def __init__(self, causal_lm: nn.Module, backbone: str, head: str, kind: str) -> None:
        super().__init__()
        if kind not in TASK_KINDS:
            raise ValueError(f"task kind {kind!r} is not one of {TASK_KINDS}")
        self.causal_lm = causal_lm
        self.backbone_path = backbone
        self.head_path = head
        self.kind = kind

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rows, width = input_ids.shape
        positions = torch.arange(width, device=input_ids.device)[None].expand(rows, width)
        hidden = self.causal_lm.get_submodule(self.backbone_path)(
            input_ids=input_ids,
            attention_mask=additive_causal_mask(attention_mask),
            position_ids=positions,
            use_cache=False,
        ).last_hidden_state
        head = self.causal_lm.get_submodule(self.head_path)
        if self.kind == CLASSIFICATION:
            last = attention_mask.sum(dim=1) - 1
            return head(hidden[torch.arange(rows), last])
        logits = head(hidden[:, :-1])
        return logits.reshape(-1, logits.shape[-1])


def _shallow_copy(module: nn.Module) -> nn.Module:
    duplicate = copy.copy(module)
    duplicate._modules = dict(module._modules)  # children can be swapped in the copy without touching the original
    return duplicate


def truncated(causal_lm: nn.Module, layers_path: str, depth: int) -> nn.Module:
    """A view of `causal_lm` that runs only its first `depth` layers, then its final norm and head: an early exit.

    Every parameter is shared (same tensors, same names), so training the view trains the model.
    """
    *parents, name = layers_path.split(".")
    root = node = _shallow_copy(causal_lm)
    for part in parents:
        child = _shallow_copy(node._modules[part])
        node._modules[part] = child
        node = child
    layers = node._modules[name]
    if not 1 <= depth <= len(layers):
        raise ValueError(f"exit depth {depth} must be between 1 and the model's {len(layers)} layers")
    node._modules[name] = nn.ModuleList(list(layers)[:depth])
    return root


def recompute_layers(causal_lm: nn.Module, layers_path: str) -> None:
    """Checkpoint every decoder layer, in place: its activations are recomputed in the backward pass from its input
    (torch.utils.checkpoint), as the ONNX training graph of a `--recompute` bundle does."""
    for layer in causal_lm.get_submodule(layers_path):
        if not getattr(layer, _RECOMPUTED, False):  # a shared layer sits at several positions: wrap it once
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
            setattr(layer, _RECOMPUTED, True)


def graph_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled rows: the loss the ONNX training graph appends."""
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
