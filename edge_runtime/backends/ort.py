"""ONNX Runtime training backend: the bundle's training and optimizer graphs over a checkpoint state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from edge_runtime.backends.ort_api import CheckpointState, Module, Optimizer, SessionOptions
from edge_runtime.bundle import ADAPTER_FILE
from edge_runtime.frozen_inputs import FrozenInputs
from edge_runtime.heap import give_back_free_heap
from edge_runtime.manifest import Manifest
from edge_runtime.memory import runs_from_arena
from edge_runtime.tensor_file import WeightView
from edge_runtime.text import Batch
from edge_runtime.windows import bundle_windows

CHECKPOINT = "ort_checkpoint"
# Adapter weights the open window's graphs do not hold (other windows' layers), with the open window's index.
HELD = "held_weights.safetensors"


class OrtBackend:
    """Trains the bundle's ONNX graphs; gradients accumulate over micro-batches until the optimizer steps.

    With layer windows, one window's graphs are open at a time; switching saves its weights, opens the next
    window's graphs and copies every adapter weight they hold into them (the earlier windows' as frozen inputs).
    """

    name = "ort"

    def __init__(self, bundle: Path, manifest: Manifest, threads: int, resume: Path | None) -> None:
        self.bundle = bundle
        self.windows = bundle_windows(manifest)
        self.options = SessionOptions()
        self.options.intra_op_num_threads = threads
        self.options.inter_op_num_threads = 1
        self.options.log_severity_level = 3
        # The planner's buffer reuse kept dead forward tensors to the end of the backward pass (recomputed layers,
        # 8 x 80 tokens: step transient 368 MiB with it, 58 without), so it is off. A graph that recomputes its
        # layers runs from ONNX Runtime's arena: with glibc's malloc, the holes its short-lived tensors leave between
        # the long-lived layer inputs are never given back (default bundle, int8, 32 rows of up to 65 tokens:
        # 2,675 MiB with malloc, 936 with the arena, and 20 % faster). A plain graph keeps malloc: its tensors live
        # until the backward pass, the heap reuses its own holes, and the arena, which never shrinks, would keep a
        # step's memory through a checkpoint write (float32 default bundle, 8 rows: 2,160 MiB with the arena
        # against 1,709 without). `edge-runtime train` measured both; edge_runtime/memory.py plans for each.
        self.options.enable_cpu_mem_arena = runs_from_arena(manifest.plan.shape, self.name)
        self.options.enable_mem_reuse = False
        self.adapter_names = set(manifest.adapter.parameters)
        self.held: dict[str, np.ndarray] = {}  # adapter weights outside the open window's graphs
        if resume is None:
            self._open(0, None)
            with safe_open(str(bundle / ADAPTER_FILE), framework="numpy") as initial:
                for name, full_name in manifest.adapter.parameters.items():
                    if name not in self.holds:
                        self.held[name] = initial.get_tensor(full_name)
        else:
            with safe_open(str(resume / HELD), framework="numpy") as saved:
                self.held = {name: saved.get_tensor(name) for name in saved.keys()}  # noqa: SIM118
                window = int(saved.metadata()["window"])
            self._open(window, resume / CHECKPOINT)

    def _open(self, window: int, checkpoint: Path | None) -> None:
        """Load window `window`'s graphs from `checkpoint` (or the bundle's), then move in the held weights they use."""
        graphs = self.bundle / self.windows[window].ort
        self.module = self.optimizer = self.state = self.frozen = None  # free the last window's before the next loads
        self.frozen = FrozenInputs(graphs)
        self.state = CheckpointState.load_checkpoint(str(checkpoint or graphs / "checkpoint"))
        # No eval graph: the device only trains, and its session cost 15-18 MiB (SmolLM2 keep 8).
        self.module = Module(str(graphs / "training_model.onnx"), self.state, session_options=self.options)
        self.optimizer = Optimizer(str(graphs / "optimizer_model.onnx"), self.module)
        self.input_names = self.module.input_names()
        self.window = window
        self.holds = {name for name, _ in self.state.parameters if name in self.adapter_names}
        self.load({name: self.held.pop(name) for name in list(self.held) if name in self.holds})

    def select_window(self, window: int) -> None:
        if window != self.window:
            self.held |= self._current()
            self._open(window, None)

    def step(self, micro_batches: list[Batch], learning_rate: float) -> float:
        rows = sum(len(batch) for batch in micro_batches)
        self.module.train()
        total = 0.0
        for batch in micro_batches:
            inputs = {
                "input_ids": batch.input_ids,
                "attention_mask": batch.attention_mask,
                "labels": batch.labels,
                "loss_scale": np.array(len(batch) / rows, dtype=np.float32),
            }
            total += float(self.module(*self.frozen.feeds(self.input_names, inputs)).numpy())
            if not self.options.enable_cpu_mem_arena:  # malloc's heap keeps its holes (edge_runtime/heap.py)
                give_back_free_heap()
        self.optimizer.set_learning_rate(learning_rate)
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return total

    def save(self, directory: Path) -> None:
        CheckpointState.save_checkpoint(self.state, str(directory / CHECKPOINT), include_optimizer_state=True)
        save_file(self.held, str(directory / HELD), metadata={"window": str(self.window)})

    def _current(self) -> dict[str, np.ndarray]:
        return {name: np.array(self.state.parameters[name].data, copy=True) for name in self.holds}

    def adapter(self) -> WeightView:
        return WeightView([*self.held, *self.holds], self._read)

    def _read(self, name: str) -> np.ndarray:
        return self.held[name] if name in self.held else self.state.parameters[name].data

    def load(self, weights: dict[str, np.ndarray]) -> None:
        for name, value in weights.items():
            if name in self.holds:
                self.state.parameters[name] = np.ascontiguousarray(value, dtype=np.float32)
            else:
                self.held[name] = value
