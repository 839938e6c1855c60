"""Split training of a soft prompt: the device's steps, the server's half of each exchange, the bytes they move.

One exchange, as the wire carries it: the device sends the cut (hidden states and mask); the server answers the
label words' logits [B, C] at each row's last token; the device computes the loss with its labels and sends that
loss's gradient on the logits; the server answers the gradient at the cut, and the device finishes the backward
pass into its prompt. No label is sent as such, but the logits' gradient is (softmax - one-hot) / B, so a server
that knows its own logits reads every label from it: split learning does not hide labels without noise on that
gradient. With `local_steps`, that many steps on the local head's loss follow each exchange (SFPrompt's local-loss
update). With `prune_fraction`, the device first scores its examples through the model it is about to train and
drops the easiest. With `cut_dp`, what crosses for each example is clipped and noised within that (ε, δ)
(`edge_runtime/cut_noise.py`). The setup and report are the device's own (`edge_runtime/split_device.py`, whose
ONNX Runtime loop trains the same prompt without torch).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from coordinator.errors import ConfigError
from coordinator.split.local import LocalHead
from coordinator.split.sides import Cut, DeviceSide, ServerSide
from coordinator.tasks import Batch, ClassificationTask, pad
from coordinator.train import TrainConfig, endless_batches
from edge_runtime.cut_noise import Released
from edge_runtime.data import Example
from edge_runtime.privacy import secret_rng
from edge_runtime.pruning import Pruned, el2n, label_loss, prune
from edge_runtime.schedule import learning_rate_factor
from edge_runtime.split_device import SplitReport, SplitSetup

__all__ = ["Exchange", "ServerExchange", "SplitReport", "SplitSetup", "score_examples", "train_split"]
Release = Callable[[Cut], tuple[torch.Tensor, Released | None]]  # what crosses for a cut, and the way back


class Exchange(Protocol):
    """The device's view of the server: the label logits for a cut, then the cut's gradient for theirs."""

    def logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def gradient(self, logits_gradient: torch.Tensor) -> torch.Tensor: ...


class ServerExchange:
    """The server's half of one exchange; it holds the graph between the two calls."""

    def __init__(self, server: ServerSide, label_token_ids: torch.Tensor) -> None:
        self.server, self.label_token_ids = server, label_token_ids
        self._sent: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None

    def logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The label words' logits [B, C] for a received cut."""
        self._sent = hidden.detach().requires_grad_(True)
        self._logits = self.server.last_token_logits(Cut(self._sent, attention_mask))[:, self.label_token_ids]
        return self._logits.detach()

    def gradient(self, logits_gradient: torch.Tensor) -> torch.Tensor:
        """The gradient at the cut [B, P + T, H] for the device's gradient on the logits."""
        if self._sent is None or self._logits is None:
            raise RuntimeError("a logit gradient arrived before its cut")
        self._logits.backward(logits_gradient)
        gradient, self._sent, self._logits = self._sent.grad, None, None
        return gradient


def _in_order(task: ClassificationTask, examples: Sequence[Example]) -> Batch:
    """One batch of `examples` in their own order (the task's batches sort by length)."""
    encoded = [task.encode(example) for example in examples]
    ids, mask = pad([ids for ids, _ in encoded], task.tokenizer.pad_token_id)
    return Batch(ids, mask, torch.tensor([label for _, label in encoded]))


def _as_is(cut: Cut) -> tuple[torch.Tensor, Released | None]:
    return cut.hidden, None


@torch.no_grad()
def score_examples(
    device: DeviceSide, exchange: Exchange, task: ClassificationTask, examples: Sequence[Example],
    score: str, batch_size: int, report: SplitReport, release: Release = _as_is,
) -> list[float]:  # fmt: skip
    """Each example's pruning score through the current prompt (EL2N or loss over the label words); `release`
    makes what crosses of each cut."""
    measure = el2n if score == "el2n" else label_loss
    scores: list[float] = []
    for start in tqdm(range(0, len(examples), batch_size), desc="pruning scores", unit="batch", leave=False):
        batch = _in_order(task, examples[start : start + batch_size])
        cut = device(batch.input_ids, batch.attention_mask)
        probabilities = exchange.logits(release(cut)[0], cut.attention_mask).softmax(dim=-1)
        report.count(cut.hidden.shape, probabilities.shape[1], scoring=True)
        scores += [measure(row.tolist(), int(label)) for row, label in zip(probabilities, batch.targets, strict=True)]
    return scores


def _exchange_step(
    cut: Cut, targets: torch.Tensor, exchange: Exchange, local_head: LocalHead | None, report: SplitReport,
    release: Release,
) -> torch.Tensor:  # fmt: skip
    """One step through the server: the gradients it sets on the device's side, and the step's loss."""
    sent, released = release(cut)
    logits = exchange.logits(sent, cut.attention_mask).requires_grad_(True)
    loss = F.cross_entropy(logits, targets)  # on the device, with its labels
    loss.backward()
    gradient = exchange.gradient(logits.grad)
    cut.hidden.backward(gradient if released is None else torch.from_numpy(released.backward(gradient.numpy())))
    if local_head is not None:  # the head learns to read the cut on the server's steps too
        F.cross_entropy(local_head(Cut(cut.hidden.detach(), cut.attention_mask)), targets).backward()
    report.exchanges += 1
    report.count(cut.hidden.shape, logits.shape[1])
    return loss


def _releaser(
    device: DeviceSide, examples: Sequence[Example], training: TrainConfig, setup: SplitSetup, report: SplitReport
) -> Release:
    """What crosses for a cut: the cut itself, or with `setup.cut_dp` its clipped and noised release (the noise
    calibrated for this run, recorded in `report.cut_privacy`) and the way back through it."""
    noise = setup.noise(training.steps, training.batch_size, len(examples))
    if noise is None:
        return _as_is
    report.cut_privacy = noise.record()
    rng, prompt_tokens = secret_rng(), device.soft_prompt.shape[0]

    def release(cut: Cut) -> tuple[torch.Tensor, Released]:
        hidden, mask = cut.hidden.detach().numpy(), cut.attention_mask.numpy()
        released = noise.release(hidden, mask, prompt_tokens, rng)
        return torch.from_numpy(released.hidden), released

    return release


def train_split(
    device: DeviceSide, server: ServerSide | Exchange, task: ClassificationTask, examples: Sequence[Example],
    training: TrainConfig, setup: SplitSetup, local_head: LocalHead | None = None, description: str = "split",
    on_step: Callable[[int], None] | None = None,
) -> SplitReport:  # fmt: skip
    """Train `device`'s soft prompt for `training.steps` steps (exchanges and local steps together); seeded.
    `server` is the server's side in this process, or an exchange with it elsewhere (`RemoteExchange`).
    `on_step(n)` runs after the n-th step (1-based), e.g. `BestCheckpoint.on_step`."""
    if setup.local_steps and local_head is None:
        raise ConfigError("local_steps needs a local head on the device (LocalHead)")
    torch.manual_seed(training.seed)
    report = SplitReport()
    exchange = ServerExchange(server, task.label_token_ids) if isinstance(server, ServerSide) else server
    release = _releaser(device, examples, training, setup, report)
    if setup.prune_fraction:
        batch_size = training.batch_size
        scores = score_examples(device, exchange, task, examples, setup.prune_score, batch_size, report, release)
        pruned: Pruned = prune(scores, setup.prune_fraction, setup.prune_score)
        report.pruned = pruned.record()
        examples = [examples[i] for i in pruned.kept]
    head_parameters = list(local_head.parameters()) if local_head is not None else []
    optimizer = torch.optim.AdamW(
        [device.soft_prompt, *head_parameters], lr=training.lr, weight_decay=training.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, training.steps, training.warmup_ratio)
    )
    batches = endless_batches(task, examples, training.batch_size, training.seed)
    start = time.perf_counter()
    with tqdm(total=training.steps, desc=description, unit="step", leave=False) as progress:
        for step in range(training.steps):
            batch = next(batches)
            cut = device(batch.input_ids, batch.attention_mask)
            if step % (setup.local_steps + 1) == 0:
                loss = _exchange_step(cut, batch.targets, exchange, local_head, report, release)
            else:
                loss = F.cross_entropy(local_head(cut), batch.targets)  # type: ignore[misc]
                loss.backward()
                report.local_steps += 1
            nn.utils.clip_grad_norm_([device.soft_prompt, *head_parameters], training.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            report.samples += len(batch)
            report.losses.append(float(loss.detach()))
            progress.set_postfix(loss=f"{report.losses[-1]:.3f}")
            progress.update()
            if on_step is not None:
                on_step(step + 1)
    report.seconds = time.perf_counter() - start
    return report
