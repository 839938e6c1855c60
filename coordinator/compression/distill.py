"""Distillation: train the emulator's middle so that it predicts what the full model predicts, on public text.

Loss = KL(full model ‖ emulator) of the next-token distributions, per token (the distilled form of the LM loss:
it teaches the emulator the full model's whole distribution, not only the observed token), + `hidden_weight` ×
the normalized MSE between the two middle blocks' outputs (‖h_emulator − h_full‖² / ‖h_full‖², per token), with
the first position left out: it is the attention sink, whose massive activations would otherwise be all the MSE
sees. The adapter layers, embeddings, final norm and head stay frozen, so the device later trains its adapter
around a middle that imitates the one it will be plugged into.
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

CURVE_POINTS = 20  # the loss curve kept in the recipe record: this many averages over equal runs of steps


@dataclass(frozen=True)
class DistillConfig:
    """How long and how hard to distill; AdamW with the project's warm-up-then-decay schedule."""

    steps: int
    lr: float = 5e-5
    batch_size: int = 4
    kl_weight: float = 1.0
    hidden_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"distill steps={self.steps} and batch_size={self.batch_size} must be at least 1")
        if not self.lr > 0 or self.kl_weight < 0 or self.hidden_weight < 0:
            raise ConfigError(
                f"distill lr={self.lr} must be positive, kl_weight={self.kl_weight} and "
                f"hidden_weight={self.hidden_weight} not negative"
            )


def middle_output(model: PreTrainedModel, ids: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the hidden states entering the top adapter layers, the logits)."""
    output = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    layers = len(decoder_layers(model))
    return output.hidden_states[layers - top], output.logits


def normalized_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ‖student − teacher‖² / ‖teacher‖²: 0 when equal, 1 when the student outputs zeros."""
    return ((student - teacher).pow(2).sum(-1) / teacher.pow(2).sum(-1).clamp_min(1e-12)).mean()


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) of the next-token distributions, in float32."""
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def _middle_parameters(emulator: PreTrainedModel, split: Split) -> list[torch.nn.Parameter]:
    layers = decoder_layers(emulator)
    held = {id(p): p for i in range(split.bottom, len(layers) - split.top) for p in layers[i].parameters()}
    return list(held.values())  # a layer shared across positions is one set of weights


def _curve(losses: list[tuple[float, float]]) -> list[list[float]]:
    """[step, hidden nMSE, KL] averaged over CURVE_POINTS equal runs of steps (single batches are noisy)."""
    size = max(1, len(losses) // CURVE_POINTS)
    runs = [losses[start : start + size] for start in range(0, len(losses), size)]
    return [
        [start * size + len(run), *(round(sum(values) / len(run), 5) for values in zip(*run, strict=True))]
        for start, run in enumerate(runs)
    ]


def distill(
    emulator: PreTrainedModel, teacher: PreTrainedModel, split: Split, calibration: Calibration, config: DistillConfig
) -> dict[str, object]:
    """Train the emulator's middle layers in place; returns the settings and the loss curve for the manifest."""
    trainable = _middle_parameters(emulator, split)
    chosen = {id(p) for p in trainable}
    for parameter in emulator.parameters():
        parameter.requires_grad_(id(parameter) in chosen)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, config.steps, 0.1))
    batches = calibration.training_batches(config.batch_size, config.seed)
    losses: list[tuple[float, float]] = []
    emulator.train()
    with tqdm(total=config.steps, desc="distill", unit="step", leave=False) as progress:
        for _ in range(config.steps):
            ids = next(batches)
            with torch.no_grad():
                target, target_logits = middle_output(teacher, ids, split.top)
            hidden, logits = middle_output(emulator, ids, split.top)
            mse = normalized_mse(hidden[:, 1:], target[:, 1:])
            kl = token_kl(logits, target_logits)
            loss = config.hidden_weight * mse + config.kl_weight * kl
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append((mse.item(), kl.item()))
            progress.set_postfix(nmse=f"{losses[-1][0]:.4f}", kl=f"{losses[-1][1]:.3f}")
            progress.update()
    emulator.eval()
    for parameter in emulator.parameters():
        parameter.requires_grad_(False)
    curve = _curve(losses)
    return {
        "steps": config.steps,
        "lr": config.lr,
        "batch_size": config.batch_size,
        "kl_weight": config.kl_weight,
        "hidden_weight": config.hidden_weight,
        "first_nmse": curve[0][1],
        "final_nmse": curve[-1][1],
        "first_kl": curve[0][2],
        "final_kl": curve[-1][2],
        "curve": curve,
    }
