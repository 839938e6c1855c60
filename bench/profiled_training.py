"""Training as a device runs it, timed phase by phase: the full model (every weight trains) or a bundle's adapter.

`python -m bench.profiled_training BUNDLE --train full|adapter --data FILE --steps N --out run.json`, one process
per run so its peak memory is its own. Both modes use the bundle's tokenizer, task, batch stream, loss graph and
AdamW settings, so full fine-tuning and offsite tuning see the same tokens; `full` loads the whole SmolLM2 instead
of the bundle's emulator. Each step is split into forward (emulator or model, then the head), backward, and the
optimizer (clipping and AdamW over every trainable weight).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from edge_runtime.adapter_modules import add_adapter
from edge_runtime.bundle import TOKENIZER_FILE, TORCH_DIRECTORY
from edge_runtime.data import load_examples
from edge_runtime.files import write_json_atomic
from edge_runtime.low_rank import load_causal_lm
from edge_runtime.manifest import Manifest
from edge_runtime.monitor import PeakMemory, peak_rss_bytes
from edge_runtime.schedule import learning_rate_factor
from edge_runtime.text import TaskEncoder, training_batches
from edge_runtime.torch_graph import TrainingGraph, graph_loss


def _model(bundle: Path, manifest: Manifest, what: str) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """The training graph and its trainable parameters: every weight of the full model, or the bundle's adapter."""
    architecture = manifest.architecture
    if what == "full":
        from coordinator.models import load_model

        causal_lm = load_model(manifest.model.name).model
    else:
        causal_lm = load_causal_lm(bundle / TORCH_DIRECTORY)
        add_adapter(causal_lm, manifest.adapter)  # LoRA branches, zero biases: as the device trains them
    causal_lm.eval()  # no dropout, as both device backends train
    graph = TrainingGraph(causal_lm, architecture.backbone, architecture.head, manifest.task.kind)
    names = set(manifest.adapter.parameters) if what == "adapter" else None
    trainable = []
    for name, parameter in graph.named_parameters():
        parameter.requires_grad_(names is None or name in names)
        if parameter.requires_grad:
            trainable.append(parameter)
    return graph, trainable


def profile(bundle: Path, what: str, data: Path, steps: int) -> dict:
    """Train `steps` steps; per-phase median seconds, whole-process peak memory, trainable parameter count."""
    manifest = Manifest.from_json((bundle / "manifest.json").read_bytes())
    training, optimizer_settings = manifest.training, manifest.training.optimizer
    torch.set_num_threads(os.cpu_count() or 1)
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
    with PeakMemory() as monitor:
        graph, trainable = _model(bundle, manifest, what)
        optimizer = torch.optim.AdamW(
            trainable, lr=0.0, eps=optimizer_settings.eps, weight_decay=optimizer_settings.weight_decay
        )
        encoder = TaskEncoder(bundle / TOKENIZER_FILE, manifest.task)
        batches = training_batches(encoder, encoder.rows(load_examples(data)), training.batch_size, training.seed)
        for step in range(steps):
            batch = next(batches)
            start = time.perf_counter()
            logits = graph(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask))
            loss = graph_loss(logits, torch.from_numpy(batch.labels))
            forward = time.perf_counter()
            loss.backward()
            backward = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(trainable, optimizer_settings.max_grad_norm)
            for group in optimizer.param_groups:
                group["lr"] = training.lr * learning_rate_factor(step, steps, training.warmup_ratio)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = time.perf_counter()
            phases["forward"].append(forward - start)
            phases["backward"].append(backward - forward)
            phases["optimizer"].append(done - backward)
    medians = {f"{phase}_seconds": statistics.median(seconds) for phase, seconds in phases.items()}
    steps_seconds = [sum(parts) for parts in zip(*phases.values(), strict=True)]
    return medians | {
        "train": what,
        "step_seconds_median": statistics.median(steps_seconds),
        "peak_memory_bytes": max(monitor.peak, peak_rss_bytes()),
        "trainable_parameters": sum(parameter.numel() for parameter in trainable),
        "logits_shape": list(logits.shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--train", choices=("full", "adapter"), required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    write_json_atomic(args.out, profile(args.bundle, args.train, args.data, args.steps))


if __name__ == "__main__":
    main()
