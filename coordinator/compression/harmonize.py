"""Fit harmonizers (ScaleOT) on public text: each one stands in for a run of layers the emulator removed.

For each gap, in order, the harmonizer is trained so the hidden state the emulator carries past the gap matches
the one the full model has after the removed layers (normalized MSE per token, AdamW). Its inputs come from the
emulator with the earlier harmonizers already fitted, so errors that pile up across gaps are what it learns to
undo. The teacher's and the emulator's hidden states are captured once per gap, so fitting costs a few forward
passes over the calibration blocks, not a training run through the layers.
"""

from __future__ import annotations

import time
from contextlib import suppress
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from coordinator.architectures import spec_for
from coordinator.compression.calibration import Calibration
from coordinator.compression.distill import normalized_mse
from coordinator.emulator import emulator_record
from coordinator.errors import ConfigError, DataError
from edge_runtime.harmonizers import attach_harmonizers, gap_module
from edge_runtime.schedule import learning_rate_factor


@dataclass(frozen=True)
class HarmonizeConfig:
    """Rank of every harmonizer and how it is fitted: up to `fit_blocks` calibration blocks train, the last
    `held_out_blocks` (at most a quarter of the text, never trained on) measure the error before and after."""

    rank: int
    steps: int = 600
    lr: float = 1e-3
    tokens_per_step: int = 2048
    fit_blocks: int = 192
    held_out_blocks: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"harmonize={self.rank} must be a rank of at least 1, e.g. harmonize=64")
        if min(self.steps, self.tokens_per_step, self.fit_blocks, self.held_out_blocks) < 1 or not self.lr > 0:
            raise ConfigError(f"harmonizer fitting needs positive steps, tokens, blocks and lr, got {self}")


def find_gaps(layer_map: list[int], source_layers: int) -> dict[int, list[int]]:
    """{emulator position: the full-model layers removed just before it} for each run of removed layers;
    position == len(layer_map) is a run after the last kept layer.

    >>> find_gaps([0, 1, 4, 5], 8)
    {2: [2, 3], 4: [6, 7]}
    """
    found: dict[int, list[int]] = {}
    previous = -1
    for position, source in enumerate([*layer_map, source_layers]):
        if source - previous > 1:
            found[position] = list(range(previous + 1, source))
        previous = source
    return found


class _Captured(Exception):
    """Raised by the capture hook once it has what it needs: the rest of the forward pass is skipped."""


@torch.no_grad()
def hidden_inputs(
    model: PreTrainedModel, modules: list[nn.Module], blocks: torch.Tensor, batch_size: int = 8
) -> list[torch.Tensor]:
    """[N, T, hidden] per module: the hidden state entering it (before any other pre-hook) for each block of
    ids. One forward pass per batch serves every module; it stops once the last of them has its input."""
    captured: list[list[torch.Tensor]] = [[] for _ in modules]
    waiting: set[int] = set()

    def capturer(index: int):
        def capture(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured[index].append((args[0] if args else kwargs["hidden_states"]).detach().float())
            waiting.discard(index)
            if not waiting:
                raise _Captured

        return capture

    handles = [
        module.register_forward_pre_hook(capturer(index), with_kwargs=True, prepend=True)
        for index, module in enumerate(modules)
    ]
    try:
        for ids in blocks.split(batch_size):
            waiting.update(range(len(modules)))
            with suppress(_Captured):
                model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(parts) for parts in captured]


def _error(harmonizer: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Normalized MSE of the harmonizer's outputs on token rows against the full model's: the loss it is fitted on."""
    dtype = next(harmonizer.parameters()).dtype
    return normalized_mse(harmonizer(inputs.to(dtype)).float(), targets)


@torch.no_grad()
def _held_out_error(harmonizer: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    return float(_error(harmonizer, inputs, targets))


def _fit(harmonizer: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, config: HarmonizeConfig) -> list[float]:
    """Train one harmonizer on token rows of (inputs, targets), [N, hidden] each; returns the loss curve."""
    parameters = list(harmonizer.parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, config.steps, 0.1))
    generator = torch.Generator().manual_seed(config.seed)
    curve = []
    for _ in range(config.steps):
        rows = torch.randint(0, len(inputs), (min(config.tokens_per_step, len(inputs)),), generator=generator)
        loss = _error(harmonizer, inputs[rows], targets[rows])
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(loss.item())
    for parameter in parameters:
        parameter.requires_grad_(False)
    return curve


def fit_harmonizers(
    emulator: PreTrainedModel, model: PreTrainedModel, calibration: Calibration, config: HarmonizeConfig
) -> dict[str, object]:
    """Attach a rank-`config.rank` harmonizer in place of each run of removed layers of `emulator` and fit it
    toward `model` on the calibration text; returns what the manifest records (per gap: the layers it replaces,
    held-out normalized MSE before and after, loss curve ends; seconds)."""
    record = emulator_record(emulator)
    if record is None:
        raise ConfigError("harmonize needs an emulator built by a recipe (it has no layer map)")
    gaps = find_gaps(record.layer_map, record.source_num_layers)
    available = calibration.blocks
    held_count = min(config.held_out_blocks, len(available) // 4)
    fit_count = min(config.fit_blocks, len(available) - held_count)
    if held_count < 1:
        raise DataError(
            f"calibration text {calibration.source!r} gives {len(available)} blocks; harmonizers need at least 4 "
            f"(three quarters to fit, a quarter held out), {config.fit_blocks + config.held_out_blocks} by default"
        )
    started = time.perf_counter()
    layout = spec_for(model.config.model_type)
    harmonizers = attach_harmonizers(emulator, layout.layers, layout.final_norm, {str(p): config.rank for p in gaps})
    blocks = torch.cat([available[:fit_count], available[-held_count:]])
    tokens = fit_count * blocks.shape[1]  # rows before this are fitted on, the rest held out
    teachers = [gap_module(model, layout.layers, layout.final_norm, removed[-1] + 1) for removed in gaps.values()]
    wanted = [states.flatten(0, 1) for states in hidden_inputs(model, teachers, blocks)] if gaps else []
    report = []
    progress = tqdm(zip(gaps.items(), wanted, strict=True), total=len(gaps), desc="harmonize", leave=False)
    for (position, removed), target in progress:
        student = gap_module(emulator, layout.layers, layout.final_norm, position)
        arriving = hidden_inputs(emulator, [student], blocks)[0].flatten(0, 1)
        inputs, targets = arriving[:tokens], target[:tokens]
        held_inputs, held_targets = arriving[tokens:], target[tokens:]
        harmonizer = harmonizers[str(position)]
        before = _held_out_error(harmonizer, held_inputs, held_targets)
        curve = _fit(harmonizer, inputs, targets, config)
        report.append(
            {
                "position": position,
                "replaces": removed,
                "held_out_nmse_before": round(before, 6),
                "held_out_nmse_after": round(_held_out_error(harmonizer, held_inputs, held_targets), 6),
                "first_loss": round(sum(curve[:10]) / len(curve[:10]), 6),
                "final_loss": round(sum(curve[-10:]) / len(curve[-10:]), 6),
            }
        )
    emulator.eval()
    return {
        "rank": config.rank,
        "steps": config.steps,
        "lr": config.lr,
        "fit_blocks": fit_count,
        "held_out_blocks": held_count,
        "parameters": sum(p.numel() for p in harmonizers.parameters()),
        "gaps": report,
        "seconds": round(time.perf_counter() - started, 1),
    }
