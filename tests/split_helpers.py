"""What the split-learning tests share: the tiny task and model, the device side exported for ONNX Runtime, the
server's half in this process as the wire carries it (numpy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

from coordinator.adapters.prompt import PromptAdapter
from coordinator.bundles.export import task_record
from coordinator.split.sides import split_model
from coordinator.split.train import ServerExchange
from coordinator.tasks import ClassificationTask
from coordinator.train import TrainConfig
from edge_runtime.manifest import OptimizerRecord, TrainingRecord
from edge_runtime.text import TaskEncoder
from exporters.onnx_training import OptimizerSettings
from exporters.split_onnx import export_split_side
from tests.conftest import make_tokenizer, sentiment_examples

PROMPT = PromptAdapter(tokens=3)


def sentiment_task() -> ClassificationTask:
    return ClassificationTask(make_tokenizer(), {"negative": " negative", "positive": " positive"})


def training_record(training: TrainConfig) -> TrainingRecord:
    """`training` as a bundle's record tells the device (a checkpoint every 4 steps)."""
    optimizer = OptimizerRecord("adamw", 1e-8, training.weight_decay, training.max_grad_norm)
    return TrainingRecord(training.steps, training.lr, training.batch_size, training.warmup_ratio, training.seed, 4,
                          optimizer)  # fmt: skip


def export_device_side(
    root: Path, task: ClassificationTask, model: PreTrainedModel, training: TrainConfig
) -> tuple[Path, TaskEncoder]:
    """`model`'s side up to its layer 2 as ONNX Runtime graphs under `root/graphs` (AdamW as `training` sets it),
    and the device's encoder of `task` from the saved tokenizer."""
    device, _ = split_model(model, 2, PROMPT)
    batch = next(task.batches(sentiment_examples(8), 8, seed=0))
    (root / "graphs").mkdir(parents=True)
    settings = OptimizerSettings(training.weight_decay, training.max_grad_norm, 1e-8)
    export_split_side(device, (batch.input_ids, batch.attention_mask), root / "graphs", settings)
    task.tokenizer.save_pretrained(root / "tokenizer")
    return root / "graphs", TaskEncoder(root / "tokenizer" / "tokenizer.json", task_record(task))


class InProcess:
    """The server's half in this process, in numpy: what a `CutExchange` gets over the wire; keeps the cuts."""

    def __init__(self, exchange: ServerExchange) -> None:
        self.exchange = exchange
        self.cuts: list[np.ndarray] = []

    def logits(self, hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self.cuts.append(hidden.copy())
        return self.exchange.logits(torch.from_numpy(hidden), torch.from_numpy(attention_mask).long()).numpy()

    def gradient(self, logits_gradient: np.ndarray) -> np.ndarray:
        return self.exchange.gradient(torch.from_numpy(logits_gradient)).numpy()
