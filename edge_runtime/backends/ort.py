"""ONNX Runtime training backend: the bundle's training, eval and optimizer graphs over a checkpoint state."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime

from edge_runtime.bundle import ORT_DIRECTORY
from edge_runtime.text import Batch


def _without_training_package_init() -> None:
    """Let `onnxruntime.training.api` load without `onnxruntime.training/__init__.py`.

    In onnxruntime-training 1.19.2 that `__init__` imports torch (through `training.optim`), which a device
    installing `.[runtime]` does not have, and which would cost this process ~1.5 s and hundreds of MB where it
    does. The on-device API (`training.api`) needs only ONNX Runtime's C bindings, so the package is registered
    as a bare namespace pointing at its folder. Nothing is stubbed if the package was already imported.
    """
    if "onnxruntime.training" not in sys.modules:
        package = types.ModuleType("onnxruntime.training")
        package.__path__ = [str(Path(onnxruntime.__file__).parent / "training")]
        sys.modules["onnxruntime.training"] = package


_without_training_package_init()
from onnxruntime.training.api import CheckpointState, Module, Optimizer  # noqa: E402

CHECKPOINT = "ort_checkpoint"


class OrtBackend:
    """Trains the bundle's ONNX graphs; gradients accumulate over micro-batches until the optimizer steps."""

    name = "ort"

    def __init__(self, bundle: Path, threads: int, resume: Path | None) -> None:
        graphs = bundle / ORT_DIRECTORY
        source = resume / CHECKPOINT if resume is not None else graphs / "checkpoint"
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Batches vary in length; the arena keeps every size it ever served and grew the process by 25 % over 24
        # steps (bench/device_training.py). Without it memory stays where the planner predicts, ~5-10 % slower.
        options.enable_cpu_mem_arena = False
        self.state = CheckpointState.load_checkpoint(str(source))
        self.module = Module(
            str(graphs / "training_model.onnx"), self.state, str(graphs / "eval_model.onnx"), session_options=options
        )
        self.optimizer = Optimizer(str(graphs / "optimizer_model.onnx"), self.module)
        self.trainable = [name for name, parameter in self.state.parameters if parameter.requires_grad]

    def step(self, micro_batches: list[Batch], learning_rate: float) -> float:
        rows = sum(len(batch) for batch in micro_batches)
        self.module.train()
        total = 0.0
        for batch in micro_batches:
            scale = np.array(len(batch) / rows, dtype=np.float32)
            total += float(self.module(batch.input_ids, batch.attention_mask, batch.labels, scale))
        self.optimizer.set_learning_rate(learning_rate)
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return total

    def save(self, directory: Path) -> None:
        CheckpointState.save_checkpoint(self.state, str(directory / CHECKPOINT), include_optimizer_state=True)

    def adapter(self) -> dict[str, np.ndarray]:
        return {name: np.array(self.state.parameters[name].data, copy=True) for name in self.trainable}

    def load(self, weights: dict[str, np.ndarray]) -> None:
        for name in self.trainable:
            self.state.parameters[name] = np.ascontiguousarray(weights[name], dtype=np.float32)
