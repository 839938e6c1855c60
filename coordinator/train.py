"""PyTorch reference training: the adapter through a frozen emulator, or the whole model (the baseline)."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from coordinator.errors import ConfigError
from coordinator.tasks import Batch, Task
from edge_runtime.backends.per_sample import PerSampleGradients, private_gradients, secret_generator
from edge_runtime.data import Example
from edge_runtime.manifest import DPTarget
from edge_runtime.privacy import DPPlan, poisson_draw, secret_rng
from edge_runtime.schedule import learning_rate_factor
from edge_runtime.windows import window_at


@dataclass(frozen=True)
class TrainConfig:
    """AdamW with linear warm-up then linear decay; `max_length` is the token cap per example or block."""

    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 8
    max_length: int = 128
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be positive, e.g. 1e-4")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")


@dataclass
class TrainReport:
    """What a training run did: steps, examples seen, the loss of every step, wall time."""

    steps: int
    samples: int
    seconds: float
    trainable_parameters: int
    losses: list[float] = field(default_factory=list)
    privacy: dict[str, object] | None = None  # the DP-SGD run's privacy record

    def summary(self) -> dict[str, object]:
        """JSON-ready summary with the loss curve."""
        return {
            "steps": self.steps,
            "samples": self.samples,
            "seconds": round(self.seconds, 2),
            "trainable_parameters": self.trainable_parameters,
            "first_loss": self.losses[0],
            "final_loss": self.losses[-1],
            "loss_curve": [round(loss, 5) for loss in self.losses],
            "privacy": self.privacy,
        }


class _PrivateSteps:
    """DP-SGD for `train`, as the device runs it (edge_runtime/privacy.py): Poisson-sampled examples, each one's
    gradient clipped and summed, Gaussian noise, both drawn from the OS's randomness."""

    def __init__(self, model: nn.Module, trainable: list[nn.Parameter], task: Task, examples: Sequence[Example],
                 config: TrainConfig, target: DPTarget) -> None:  # fmt: skip
        if not hasattr(task, "row_losses"):
            raise ConfigError("--dp on evaluate trains classification tasks; a language-model task trains DP on the "
                              "device (export --dp), where the privacy unit is a packed block")  # fmt: skip
        wanted = {id(parameter) for parameter in trainable}
        self.named = {name: p for name, p in model.named_parameters() if id(p) in wanted}
        self.per_sample = PerSampleGradients(model, self.named)
        self.plan = DPPlan.make(target, config.batch_size, len(examples), config.steps)
        self.task, self.examples, self.batch_size = task, examples, config.batch_size
        self.sampler, self.noise = secret_rng(), secret_generator()

    def gradients(self, view: nn.Module) -> tuple[float, int]:
        """Set the trainable window's gradients for one step; its rows' mean loss (NaN if none were drawn)."""
        drawn = [self.examples[i] for i in poisson_draw(self.sampler, len(self.examples), self.plan.sampling_rate)]
        batches = self.task.batches(drawn, self.batch_size, seed=None) if drawn else []
        losses = [lambda batch=batch: self.task.row_losses(view, batch) for batch in batches]  # type: ignore[attr-defined]
        window = {name: p for name, p in self.named.items() if p.requires_grad}
        loss_sum, rows = private_gradients(self.per_sample, window, losses, self.plan, self.noise)
        return (loss_sum / rows if rows else math.nan), rows


def endless_batches(task: Task, examples: Sequence[Example], batch_size: int, seed: int) -> Iterator[Batch]:
    """`task`'s batches of `examples`, epoch after epoch, each epoch shuffled by `seed` plus its number."""
    epoch = 0
    while True:
        yield from task.batches(examples, batch_size, seed=seed + epoch)
        epoch += 1


def train(
    model: PreTrainedModel,
    parameters: Iterable[nn.Parameter],
    task: Task,
    examples: Sequence[Example],
    config: TrainConfig,
    description: str = "train",
    windows: Sequence[tuple[nn.Module, list[nn.Parameter]]] = (),
    on_step: Callable[[int], None] | None = None,
    privacy: DPTarget | None = None,
) -> TrainReport:
    """Train only `parameters` of `model` (everything else frozen) for `config.steps` steps; seeded.

    With `privacy`, DP-SGD as on the device (the data order and noise then come from the OS, not the seed).

    `windows` (adaptive layer tuning): (early-exit view of `model`, its window's parameters) pairs trained in equal
    phases, bottom first, as the device does (edge_runtime/windows.py); by default all parameters train at once.
    `on_step(steps_done)` runs after every step (e.g. to score a learning curve); its time is not counted.
    """
    trainable = list(parameters)
    if not trainable:
        raise ConfigError("nothing to train: the parameter list is empty")
    phases = list(windows) or [(model, trainable)]
    in_phase = [{id(parameter) for parameter in window} for _, window in phases]
    torch.manual_seed(config.seed)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, config.steps, config.warmup_ratio)
    )
    batches = endless_batches(task, examples, config.batch_size, config.seed)
    private = _PrivateSteps(model, trainable, task, examples, config, privacy) if privacy is not None else None
    report = TrainReport(0, 0, 0.0, sum(p.numel() for p in trainable))
    if private is not None:
        report.privacy = dataclasses.asdict(private.plan.record())
    model.train()
    start = time.perf_counter()
    with tqdm(total=config.steps, desc=description, unit="step", leave=False) as progress:
        for _ in range(config.steps):
            phase = window_at(report.steps, config.steps, len(phases))
            view, window = phases[phase]
            for parameter in trainable:  # only the window gets gradients; AdamW leaves gradient-less ones alone
                parameter.requires_grad_(id(parameter) in in_phase[phase])
            if private is None:
                batch = next(batches)
                loss_tensor = task.loss(view, batch)
                loss_tensor.backward()
                torch.nn.utils.clip_grad_norm_(window, config.max_grad_norm)
                loss, rows = loss_tensor.item(), len(batch)
            else:
                loss, rows = private.gradients(view)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            report.steps += 1
            report.samples += rows
            if math.isfinite(loss):  # a DP step may draw no example: noise alone, no loss
                report.losses.append(loss)
            progress.set_postfix(loss=f"{report.losses[-1]:.3f}" if report.losses else "-")
            progress.update()
            if on_step is not None:
                paused = time.perf_counter()
                on_step(report.steps)
                start += time.perf_counter() - paused
    report.seconds = time.perf_counter() - start
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return report
