"""Rank-r linear layers of a low-rank emulator, and loading any emulator folder (dense, low-rank, harmonized,
shared, int8-stored).

Imported by the PyTorch backend and the coordinator; it needs torch and transformers.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from edge_runtime.errors import DataError
from edge_runtime.harmonizers import HARMONIZER_RECORD, attach_harmonizers
from edge_runtime.quantized import QUANTIZED_RECORD, quantized_structure, tie_quantized_head
from edge_runtime.shared_layers import SHARED_RECORD, share_layers, tied_names
from edge_runtime.soft_prompt import PROMPT_RECORD, attach_prompt

# Config attribute of a low-rank emulator: {module path: rank} of every factorized linear layer.
LOW_RANK_RECORD = "offsite_low_rank"


class LowRankLinear(nn.Module):
    """y = left(right(x)): a [out, in] weight stored as [out, r] @ [r, in], with the original bias on `left`."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.right = nn.Linear(in_features, rank, bias=False)
        self.left = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(self.right(x))


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear or a transformers Conv1D (GPT-2 stores its weight as [in, out])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    rows, columns = module.weight.shape
    return rows, columns


def factorize_structure(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace each named linear module by an (uninitialized) LowRankLinear of its rank, in place."""
    for path, rank in ranks.items():
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        original = getattr(parent, child)
        in_features, out_features = in_out_features(original)
        replacement = LowRankLinear(in_features, out_features, rank, original.bias is not None)
        setattr(parent, child, replacement.to(original.weight.dtype))


def load_causal_lm(folder: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A transformers model folder as a causal LM; a low-rank, harmonized or shared emulator, or a model plugged
    with a soft prompt, gets its extra structure (factorized layers, harmonizers, tied layers, the prompt) back
    before its weights load."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    records = (LOW_RANK_RECORD, HARMONIZER_RECORD, SHARED_RECORD, PROMPT_RECORD, QUANTIZED_RECORD)
    ranks, harmonizers, shared, prompt, quantized = (config.get(key) for key in records)
    if not ranks and not harmonizers and not shared and not prompt and not quantized:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    # With int8 storage the float weights are never allocated: the structure is built empty, then assigned.
    if quantized:
        from accelerate import init_empty_weights  # only here: it is an import of its own
    with init_empty_weights(include_buffers=False) if quantized else nullcontext():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    factorize_structure(model, ranks or {})
    if shared:
        share_layers(model, shared["layers"], shared["ties"])
    if harmonizers:
        attach_harmonizers(model, harmonizers["layers"], harmonizers["final_norm"], harmonizers["ranks"])
    if prompt:
        backbone = model.get_submodule(prompt["backbone"])
        attach_prompt(backbone, torch.zeros(prompt["tokens"], backbone.get_input_embeddings().embedding_dim))
    if quantized:
        quantized_structure(model, quantized)
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=bool(quantized))
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if quantized and quantized.get("tied_head"):
        tied |= {f"{quantized['tied_head']}.weight_values", f"{quantized['tied_head']}.weight_scale"}
    tied |= tied_names(shared, missing) if shared else set()
    if unexpected or set(missing) - tied:
        raise DataError(
            f"{folder} does not match its config's structure (missing {missing[:3]}, extra {unexpected[:3]}); "
            "export the emulator again"
        )
    if quantized:
        tie_quantized_head(model, quantized)
    else:
        model.tie_weights()
    return model.eval()
