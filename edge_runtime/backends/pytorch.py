"""PyTorch backend: the bundle's emulator as a transformers model, AdamW and clipping set as in the ONNX graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from edge_runtime.adapter_modules import add_adapter
from edge_runtime.backends.per_sample import PerSampleGradients, private_gradients, secret_generator
from edge_runtime.bundle import ADAPTER_FILE, TORCH_DIRECTORY
from edge_runtime.errors import ConfigError
from edge_runtime.heap import give_back_free_heap
from edge_runtime.low_rank import load_causal_lm
from edge_runtime.manifest import CLASSIFICATION, Manifest
from edge_runtime.privacy import DPPlan
from edge_runtime.tensor_file import WeightView
from edge_runtime.text import Batch
from edge_runtime.torch_graph import IGNORE_INDEX, TrainingGraph, graph_loss, recompute_layers, truncated
from edge_runtime.windows import bundle_windows

CHECKPOINT = "torch_state.safetensors"


def save_trainable(path: Path, trainable: dict[str, torch.nn.Parameter], optimizer: torch.optim.AdamW) -> None:
    """The trainable tensors and, once AdamW has stepped, its moments and step count, as one safetensors file."""
    tensors = {}
    for name, parameter in trainable.items():
        tensors[f"param/{name}"] = parameter.detach().contiguous()
        state = optimizer.state.get(parameter, {})
        if state:
            tensors[f"exp_avg/{name}"] = state["exp_avg"].contiguous()
            tensors[f"exp_avg_sq/{name}"] = state["exp_avg_sq"].contiguous()
            tensors[f"step/{name}"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1)
    save_file(tensors, str(path))


def restore_trainable(path: Path, trainable: dict[str, torch.nn.Parameter], optimizer: torch.optim.AdamW) -> None:
    """Continue from what `save_trainable` wrote: the tensors' values and AdamW's state."""
    tensors = load_file(str(path))
    with torch.no_grad():
        for name, parameter in trainable.items():
            parameter.copy_(tensors[f"param/{name}"])
            if f"exp_avg/{name}" in tensors:
                optimizer.state[parameter] = {
                    "step": tensors[f"step/{name}"].reshape(()).clone(),
                    "exp_avg": tensors[f"exp_avg/{name}"].clone(),
                    "exp_avg_sq": tensors[f"exp_avg_sq/{name}"].clone(),
                }


class TorchBackend:
    """Trains the adapter parameters of the bundle's emulator; everything else stays frozen."""

    name = "torch"

    def __init__(self, bundle: Path, manifest: Manifest, threads: int, resume: Path | None) -> None:
        torch.set_num_threads(threads)
        model = load_causal_lm(bundle / TORCH_DIRECTORY)
        model.eval()  # no dropout: both backends train the same deterministic graph
        adapter = manifest.adapter
        add_adapter(model, adapter)  # LoRA branches, zero biases: as exported
        if manifest.plan.shape.recompute_layers:
            recompute_layers(model, manifest.architecture.layers)
        self.model, self.architecture, self.kind = model, manifest.architecture, manifest.task.kind
        self.windows = bundle_windows(manifest)
        names = set(manifest.adapter.parameters)
        self.whole = TrainingGraph(model, self.architecture.backbone, self.architecture.head, self.kind)
        self.trainable = {name: p for name, p in self.whole.named_parameters() if name in names}
        self.per_sample = PerSampleGradients(self.whole, self.trainable) if manifest.privacy is not None else None
        self.noise = secret_generator() if manifest.privacy is not None else None
        self.window: int | None = None
        self.select_window(0)
        optimizer = manifest.training.optimizer
        self.max_grad_norm = optimizer.max_grad_norm
        self.optimizer = torch.optim.AdamW(
            self.trainable.values(), lr=0.0, eps=optimizer.eps, weight_decay=optimizer.weight_decay
        )
        if resume is not None:
            self._restore(resume / CHECKPOINT)
        else:  # the bundle's initial adapter, as the ONNX checkpoint holds it (LoRA's A is drawn once, there)
            with safe_open(str(bundle / ADAPTER_FILE), framework="numpy") as initial:
                self.load({name: initial.get_tensor(full) for name, full in adapter.parameters.items()})

    def select_window(self, window: int) -> None:
        """Forward through the window's exit; only its layers get gradients (AdamW skips the others, gradient-less)."""
        if window == self.window:
            return
        chosen, layers = self.windows[window], self.architecture.layers
        depth = len(self.model.get_submodule(layers)) if chosen.exit is None else chosen.exit + 1
        view = truncated(self.model, layers, depth)
        self.graph = TrainingGraph(view, self.architecture.backbone, self.architecture.head, self.kind)
        names = set(chosen.parameters)
        for name, parameter in self.whole.named_parameters():  # the view holds the same parameters, same names
            parameter.requires_grad_(name in names)
        self.window_parameters = [self.trainable[name] for name in chosen.parameters]
        self.window = window

    def step(self, micro_batches: list[Batch], learning_rate: float) -> float:
        rows = sum(len(batch) for batch in micro_batches)
        total = 0.0
        for batch in micro_batches:
            logits = self.graph(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask))
            loss = graph_loss(logits, torch.from_numpy(batch.labels)) * (len(batch) / rows)
            loss.backward()
            total += float(loss.detach())
            give_back_free_heap()
        torch.nn.utils.clip_grad_norm_(self.window_parameters, self.max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _row_losses(self, batch: Batch) -> torch.Tensor:
        """Each row's own loss ([rows]): the cross-entropy of its label word, or the mean over its next tokens."""
        logits = self.graph(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask))
        labels = torch.from_numpy(batch.labels)
        losses = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
        if self.kind == CLASSIFICATION:
            return losses
        per_row, counted = losses.reshape(len(batch), -1), (labels != IGNORE_INDEX).reshape(len(batch), -1)
        return per_row.sum(dim=1) / counted.sum(dim=1).clamp(min=1)

    def private_step(self, micro_batches: list[Batch], learning_rate: float, privacy: DPPlan) -> float:
        """One DP-SGD step over the rows Poisson sampling drew (possibly none): each row's gradient clipped to C,
        summed, Gaussian noise of std σ·C added, divided by the expected batch q·N, then AdamW. Mean row loss,
        or NaN for an empty draw. The noise comes from torch's generator, seeded from the OS, never from the job."""
        if self.per_sample is None or self.noise is None:
            raise ConfigError("this bundle is not differentially private: export it with --dp to train with DP-SGD")
        window = {name: p for name, p in self.trainable.items() if p.requires_grad}
        losses = [lambda batch=batch: self._row_losses(batch) for batch in micro_batches]
        loss_sum, rows = private_gradients(self.per_sample, window, losses, privacy, self.noise)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / rows if rows else float("nan")

    def save(self, directory: Path) -> None:
        save_trainable(directory / CHECKPOINT, self.trainable, self.optimizer)

    def _restore(self, path: Path) -> None:
        restore_trainable(path, self.trainable, self.optimizer)

    def adapter(self) -> WeightView:
        return WeightView(self.trainable, lambda name: self.trainable[name].detach().numpy())

    def load(self, weights: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name, parameter in self.trainable.items():
                parameter.copy_(torch.from_numpy(np.asarray(weights[name], dtype=np.float32)))
