"""Distillation: train the emulator's middle toward the full model's middle block on public text.

Loss = normalized MSE between the two middle blocks' outputs (‖h_emulator − h_full‖² / ‖h_full‖², per token)
+ `lm_weight` × the emulator's own next-token loss. The adapter layers, embeddings, final norm and head stay
frozen, so the device later trains its adapter around a middle that imitates the one it will be plugged into.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from coordinator.architectures import decoder_layers
from coordinator.compression.calibration import Calibration
from coordinator.emulator import Split
from coordinator.errors import ConfigError
from edge_runtime.schedule import learning_rate_factor


@dataclass(frozen=True)
class DistillConfig:
    """How long and how hard to distill; AdamW with the project's warm-up-then-decay schedule."""

    steps: int
    lr: float = 1e-4
    batch_size: int = 4
    lm_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"distill steps={self.steps} and batch_size={self.batch_size} must be at least 1")
        if not self.lr > 0 or self.lm_weight < 0:
            raise ConfigError(f"distill lr={self.lr} must be positive and lm_weight={self.lm_weight} not negative")


def middle_output(model: PreTrainedModel, ids: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the hidden states entering the top adapter layers, the logits)."""
    output = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    layers = len(decoder_layers(model))
    return output.hidden_states[layers - top], output.logits


def normalized_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ‖student − teacher‖² / ‖teacher‖²: 0 when equal, 1 when the student outputs zeros."""
    return ((student - teacher).pow(2).sum(-1) / teacher.pow(2).sum(-1).clamp_min(1e-12)).mean()


def distill(
    emulator: PreTrainedModel, teacher: PreTrainedModel, split: Split, calibration: Calibration, config: DistillConfig
) -> dict[str, object]:
    """Train the emulator's middle layers in place; returns the loss curve's ends for the manifest."""
    layers = decoder_layers(emulator)
    trainable = [p for i in range(split.bottom, len(layers) - split.top) for p in layers[i].parameters()]
    chosen = {id(p) for p in trainable}
    for parameter in emulator.parameters():
        parameter.requires_grad_(id(parameter) in chosen)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, config.steps, 0.1))
    batches = calibration.training_batches(config.batch_size, config.seed)
    curve: list[tuple[float, float]] = []
    emulator.train()
    with tqdm(total=config.steps, desc="distill", unit="step", leave=False) as progress:
        for _ in range(config.steps):
            ids = next(batches)
            with torch.no_grad():
                target, _ = middle_output(teacher, ids, split.top)
            hidden, logits = middle_output(emulator, ids, split.top)
            mse = normalized_mse(hidden, target)
            lm = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss = mse + config.lm_weight * lm
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            curve.append((mse.item(), lm.item()))
            progress.set_postfix(nmse=f"{curve[-1][0]:.4f}", lm=f"{curve[-1][1]:.3f}")
            progress.update()
    emulator.eval()
    for parameter in emulator.parameters():
        parameter.requires_grad_(False)
    ends = max(1, min(10, len(curve) // 2))  # single batches are noisy: average the first and last few steps
    first = [sum(values) / ends for values in zip(*curve[:ends], strict=True)]
    final = [sum(values) / ends for values in zip(*curve[-ends:], strict=True)]
    return {
        "steps": config.steps,
        "lr": config.lr,
        "batch_size": config.batch_size,
        "lm_weight": config.lm_weight,
        "first_nmse": round(first[0], 6),
        "final_nmse": round(final[0], 6),
        "first_lm_loss": round(first[1], 5),
        "final_lm_loss": round(final[1], 5),
    }
