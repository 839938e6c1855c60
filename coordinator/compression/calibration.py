"""Calibration text and the measurements recipes share: output divergence, input scales of linear layers."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from coordinator.errors import ConfigError, DataError
from coordinator.tasks import LanguageModelTask
from edge_runtime.data import Example, load_examples

CALIBRATION_DATASET = "wikipedia"


@dataclass
class Calibration:
    """Public text cut into token blocks: the first `measure_blocks` score layers; all of them distill."""

    tokenizer: PreTrainedTokenizerBase
    texts: Sequence[str]
    source: str
    length: int = 128
    measure_blocks: int = 4

    @cached_property
    def blocks(self) -> torch.Tensor:
        """[N, length] token ids: the texts joined with EOS and cut into full blocks, in a fixed shuffled order."""
        task = LanguageModelTask(self.tokenizer, self.length)
        blocks = [block for block in task.blocks([Example(text) for text in self.texts]) if len(block) == self.length]
        if len(blocks) < self.measure_blocks:
            raise DataError(
                f"calibration text {self.source!r} gives {len(blocks)} blocks of {self.length} tokens; "
                f"it needs at least {self.measure_blocks}: give more text"
            )
        random.Random(0).shuffle(blocks)
        return torch.tensor(blocks)

    def measure_batches(self, batch_size: int = 4) -> list[torch.Tensor]:
        """The blocks every measurement uses, in batches."""
        return list(self.blocks[: self.measure_blocks].split(batch_size))

    def training_batches(self, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        """Endless shuffled batches over every block (for distillation)."""
        generator = torch.Generator().manual_seed(seed)
        while True:
            yield from self.blocks[torch.randperm(len(self.blocks), generator=generator)].split(batch_size)

    def describe(self) -> dict[str, object]:
        return {"source": self.source, "blocks": len(self.blocks), "length": self.length}


def load_calibration(tokenizer: PreTrainedTokenizerBase, path: str | None = None, length: int = 128) -> Calibration:
    """Calibration text from `path` (.jsonl, .csv or .txt, as training data), by default the prepared Wikipedia
    training split: public text the model owner holds, never a device's data."""
    from coordinator.datasets import dataset_path

    if path is None:
        default = dataset_path(CALIBRATION_DATASET, "train")
        if not default.is_file():
            raise ConfigError(f"calibration text {default} is missing; run `coordinator prepare` once")
        return Calibration(tokenizer, [e.text for e in load_examples(default)], f"{CALIBRATION_DATASET} train", length)
    return Calibration(tokenizer, [example.text for example in load_examples(Path(path))], Path(path).name, length)


@torch.inference_mode()
def log_probs(model: PreTrainedModel, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Next-token log-probabilities of every calibration position (float32, one tensor per batch)."""
    return [F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1) for ids in batches]


def prediction_fingerprint(batches: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], *parts: object) -> str:
    """Names what a cached result belongs to by the calibration tokens, what the model predicts on them (rounded,
    so thread-count jitter does not matter: a different model or text misses) and `parts` (the settings)."""
    digest = hashlib.sha256(repr(parts).encode())
    for ids, want in zip(batches, reference, strict=True):
        digest.update(ids.numpy().tobytes())
        digest.update(torch.round(want[..., :64] * 100).to(torch.int32).numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.inference_mode()
def divergence(model: PreTrainedModel, batches: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """Mean per-token KL(reference ‖ model): how far the model's predictions moved from the reference's."""
    total, count = 0.0, 0
    for ids, want in zip(batches, reference, strict=True):
        got = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        total += float(F.kl_div(got, want, log_target=True, reduction="sum"))
        count += want.shape[0] * want.shape[1]
    return total / count


def linear_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """The weight matrices of one decoder layer: nn.Linear and transformers' Conv1D (GPT-2), by relative path."""
    return {
        name: module
        for name, module in layer.named_modules()
        if name and (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D")
    }


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as [out, in] (a Conv1D's [in, out] weight transposed; a view, not a copy)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


@torch.inference_mode()
def input_scales(model: PreTrainedModel, modules: dict[str, nn.Module], batches: Sequence[torch.Tensor]) -> dict:
    """Root-mean-square of each input feature of each module over the calibration tokens: {name: [in]}."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def recorder(name: str):
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            flat = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + flat.pow(2).sum(dim=0)
            counts[name] = counts.get(name, 0) + flat.shape[0]

        return record

    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in modules.items()]
    try:
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).sqrt() for name in modules}
