"""A split job on the device: the job's setup and report, the exchange over a split client, and the training loop
of either device side (`backends/split_ort.py`, no torch; `backends/split_torch.py`). numpy between them.

One step: the device computes the cut, releases it (as it is, or clipped and noised: `cut_noise.py`), gets the
label words' logits for it, computes the loss with its own labels and sends that loss's gradient on the logits;
the server answers the gradient at the cut, and the device steps its prompt. With `prune_fraction`, the device
first scores its examples through the prompt it is about to train and drops the easiest (`pruning.py`).
SFPrompt's local loss (`local_steps`) trains a head beside the prompt and runs on the PyTorch side only
(`coordinator/split/train.py`), which shares this setup and report.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from edge_runtime.cut_noise import CutNoise, Released, crossings
from edge_runtime.errors import ConfigError
from edge_runtime.manifest import DPTarget, TrainingRecord
from edge_runtime.privacy import secret_rng
from edge_runtime.pruning import SCORES, el2n, label_loss, prune
from edge_runtime.schedule import learning_rate_factor
from edge_runtime.split_client import SplitClient
from edge_runtime.split_wire import carries, checked_array, cut_body_bytes
from edge_runtime.text import Batch, TaskEncoder, training_batches
from edge_runtime.trainer import latest_checkpoint, save_checkpoint


class CutSide(Protocol):
    """A device side to train: `backends/split_ort.OrtCutSide` or `backends/split_torch.TorchCutSide`."""

    name: str

    def cut(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, gradient: np.ndarray, lr: float) -> None: ...

    def prompt(self) -> np.ndarray: ...

    def save(self, directory: Path) -> None: ...

    def resume(self, directory: Path) -> None: ...


@dataclass(frozen=True)
class SplitSetup:
    """How a split job trains: local-loss steps after each exchange, the share of easiest examples dropped, and
    the (ε, δ) and clip of the noise on what crosses the cut (none by default; `clip` is in the cut's own units,
    an L2 norm over an example's hidden states at its input positions)."""

    local_steps: int = 0
    prune_fraction: float = 0.0
    prune_score: str = "el2n"
    cut_dp: DPTarget | None = None

    def __post_init__(self) -> None:
        if self.local_steps < 0:
            raise ConfigError(f"local_steps={self.local_steps} must be 0 (every step goes to the server) or more")
        if not 0 <= self.prune_fraction < 1:
            raise ConfigError(f"prune_fraction={self.prune_fraction} must be in [0, 1), e.g. 0.3")
        if self.prune_score not in SCORES:
            raise ConfigError(f"prune_score={self.prune_score!r} must be one of {', '.join(SCORES)}")

    def noise(self, steps: int, batch_size: int, examples: int) -> CutNoise | None:
        """The noise for a run of `steps` over `examples` (before pruning), calibrated for how often one example
        crosses; None without `cut_dp`."""
        if self.cut_dp is None:
            return None
        kept = examples - math.floor(self.prune_fraction * examples)
        times = crossings(steps, batch_size, kept, self.local_steps, bool(self.prune_fraction))
        return CutNoise.make(self.cut_dp, times)


@dataclass
class SplitReport:
    """What a split run did: its steps of each kind, the bytes each way, what pruning dropped, the cut's ε."""

    exchanges: int = 0
    local_steps: int = 0
    samples: int = 0
    bytes_up: int = 0  # device to server: cuts, masks, logit gradients
    bytes_down: int = 0  # server to device: label logits, cut gradients
    bytes_scoring: int = 0  # both ways, of the pruning pass (counted in bytes_up and bytes_down too)
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    pruned: dict[str, object] | None = None
    cut_privacy: dict[str, object] | None = None
    asked_again: int = 0  # questions sent again for want of an answer (a broker or server restart), over MQTT

    def count(self, shape: Sequence[int], labels: int, scoring: bool = False) -> None:
        """Add one exchange's bytes for a cut of `shape` [B, P + T, H]: the cut (float32) and its mask (a byte a
        position) up, the label logits down; unless `scoring`, the logits' gradient up and the cut's down."""
        rows, positions, width = shape
        cut, logits = cut_body_bytes(rows, positions, width), 4 * rows * labels
        up, down = (cut, logits) if scoring else (cut + logits, logits + rows * positions * 4 * width)
        self.bytes_up += up
        self.bytes_down += down
        if scoring:
            self.bytes_scoring += up + down


class CutExchange:
    """A split server's answers through `client`, in numpy: logits [B, C] for a cut, then the cut's gradient for
    the logits' gradient (sent again with the cut when the server restarted in between)."""

    def __init__(self, client: SplitClient) -> None:
        self.client = client
        # numbered from a random start: a late answer meant for an earlier process of this job (cut off and
        # resumed) can never match a question of this one
        self.exchange = secrets.randbelow(2**31)
        self._cut: dict[str, np.ndarray] = {}

    def logits(self, hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self.exchange += 1
        self._cut = {"hidden": np.asarray(hidden, np.float32), "mask": np.asarray(attention_mask, np.uint8)}
        answer = self.client.ask(self.exchange, "cut", self._cut)
        carries(answer, {"logits"})
        return checked_array(answer, "logits", "float32", (hidden.shape[0], None))

    def gradient(self, logits_gradient: np.ndarray) -> np.ndarray:
        arrays = {"logits_gradient": np.asarray(logits_gradient, np.float32)}
        answer = self.client.ask(self.exchange, "gradient", arrays)
        if answer.kind == "unknown_cut":  # the server restarted since the cut: send it again, then the gradient
            self.client.ask(self.exchange, "cut", self._cut)
            answer = self.client.ask(self.exchange, "gradient", arrays)
        carries(answer, {"gradient"})
        return checked_array(answer, "gradient", "float32", self._cut["hidden"].shape)


class NumpyExchange(Protocol):
    def logits(self, hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...

    def gradient(self, logits_gradient: np.ndarray) -> np.ndarray: ...


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def label_columns(encoder: TaskEncoder) -> dict[int, int]:
    """Each label word's token id -> its column in the server's logits (labels in sorted order, as the task's)."""
    label_ids = encoder.task.label_token_ids or {}
    return {label_ids[label]: column for column, label in enumerate(sorted(label_ids))}


def with_prompt(attention_mask: np.ndarray, prompt_tokens: int) -> np.ndarray:
    """The cut's mask [B, P + T]: ones for the prompt's positions in front."""
    return np.concatenate([np.ones((attention_mask.shape[0], prompt_tokens), attention_mask.dtype), attention_mask], 1)


class _DeviceSteps:
    """The device's half of each exchange: the cut, what of it crosses, the loss and the prompt's step."""

    def __init__(self, side: CutSide, exchange: NumpyExchange, encoder: TaskEncoder, noise: CutNoise | None,
                 report: SplitReport) -> None:  # fmt: skip
        self.side, self.exchange, self.encoder, self.noise, self.report = side, exchange, encoder, noise, report
        self.columns, self.prompt_tokens, self.rng = label_columns(encoder), side.prompt().shape[0], secret_rng()

    def _logits(self, batch: Batch) -> tuple[np.ndarray, np.ndarray, Released | None]:
        """The cut, the server's label logits for what of it crossed, and the release (None without noise)."""
        hidden = self.side.cut(batch.input_ids, batch.attention_mask)
        mask = with_prompt(batch.attention_mask, self.prompt_tokens)
        released = self.noise.release(hidden, mask, self.prompt_tokens, self.rng) if self.noise else None
        return hidden, self.exchange.logits(released.hidden if released else hidden, mask), released

    def scores(self, rows: list[tuple[list[int], int]], batch_size: int, score: str) -> list[float]:
        """Each row's pruning score (EL2N or loss over the label words) through the current prompt."""
        measure, scores = (el2n if score == "el2n" else label_loss), []
        for start in tqdm(range(0, len(rows), batch_size), desc="pruning scores", unit="batch", leave=False):
            batch = self.encoder.collate(rows[start : start + batch_size])
            hidden, logits, _ = self._logits(batch)
            self.report.count(hidden.shape, logits.shape[1], scoring=True)
            targets = [self.columns[int(label)] for label in batch.labels]
            scores += [measure(row.tolist(), target) for row, target in zip(softmax(logits), targets, strict=True)]
        return scores

    def step(self, batch: Batch, lr: float) -> None:
        """One exchange and the prompt's AdamW step at `lr`."""
        hidden, logits, released = self._logits(batch)
        targets, rows = np.array([self.columns[int(label)] for label in batch.labels]), np.arange(len(batch))
        probabilities = softmax(logits)
        self.report.losses.append(float(-np.log(probabilities[rows, targets]).mean()))
        probabilities[rows, targets] -= 1.0  # the mean cross-entropy's gradient on the logits, times B
        gradient = self.exchange.gradient(probabilities / len(batch))
        self.side.step(batch.input_ids, batch.attention_mask,
                       released.backward(gradient) if released else gradient, lr)  # fmt: skip
        self.report.exchanges += 1
        self.report.samples += len(batch)
        self.report.count(hidden.shape, logits.shape[1])


def train_cut_side(
    side: CutSide, exchange: NumpyExchange, encoder: TaskEncoder, rows: Sequence[tuple[list[int], int]],
    training: TrainingRecord, setup: SplitSetup, on_step: Callable[[int, float], None] | None = None,
    out: Path | None = None, identity: str = "split",
) -> SplitReport:  # fmt: skip
    """Train `side`'s prompt on `rows` (`encoder.rows` of the device's examples) for `training.steps` exchanges
    with the server behind `exchange`; `on_step(n, loss)` runs after the n-th step with its loss. With `out`, a
    checkpoint (the prompt, AdamW's state, the report, what pruning kept) is written there every
    `training.checkpoint_every` steps, atomically, and a run of the same `identity` that finds one continues from
    it: a power cut loses the steps since, never the run."""
    if setup.local_steps:
        raise ConfigError("local_steps trains a head beside the prompt, which a split bundle's device side does not "
                          "have; set local_steps=0 or train with coordinator/split/train.py")  # fmt: skip
    noise = setup.noise(training.steps, training.batch_size, len(rows))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    found = latest_checkpoint(out, identity, side.name) if out is not None else None
    report = SplitReport(**found[1]["report"]) if found else SplitReport(cut_privacy=noise.record() if noise else None)
    device = _DeviceSteps(side, exchange, encoder, noise, report)
    kept: list[int] | None = found[1]["kept"] if found else None
    if found:
        side.resume(found[0])
    elif setup.prune_fraction:
        pruned = prune(device.scores(rows, training.batch_size, setup.prune_score), setup.prune_fraction,
                       setup.prune_score)  # fmt: skip
        report.pruned, kept = pruned.record(), pruned.kept
    rows = list(rows) if kept is None else [rows[i] for i in kept]
    batches = training_batches(encoder, rows, training.batch_size, training.seed)
    done = found[1]["step"] if found else 0
    for _ in range(done):
        next(batches)
    start, spent = time.perf_counter(), report.seconds
    for step in tqdm(range(done, training.steps), desc="split (onnx runtime)", unit="step", leave=False):
        device.step(next(batches), training.lr * learning_rate_factor(step, training.steps, training.warmup_ratio))
        report.seconds = spent + time.perf_counter() - start
        if out is not None and (step + 1) % training.checkpoint_every == 0 and step + 1 < training.steps:
            progress = {"bundle": identity, "backend": side.name, "step": step + 1, "kept": kept,
                        "report": asdict(report)}  # fmt: skip
            save_checkpoint(out, side, progress)
        if on_step is not None:
            on_step(step + 1, report.losses[-1])
    return report
