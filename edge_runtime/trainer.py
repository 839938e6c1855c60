"""On-device training of a verified bundle: fits the memory budget, checkpoints atomically, resumes after a crash."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from safetensors.numpy import load_file
from tqdm.auto import tqdm

from edge_runtime import __version__
from edge_runtime.backends import open_backend
from edge_runtime.bundle import MANIFEST, TOKENIZER_FILE, verify_bundle, write_adapter_file
from edge_runtime.data import load_examples
from edge_runtime.errors import ConfigError, DataError
from edge_runtime.files import atomic_directory, write_json_atomic
from edge_runtime.manifest import (
    RESULT_FORMAT,
    RESULT_SCHEMA,
    Manifest,
    PrivacyRecord,
    ResultMetrics,
    TrainedWindow,
)
from edge_runtime.memory import MIB, BudgetError, MemoryEstimate, choose_micro_batch
from edge_runtime.monitor import PeakMemory
from edge_runtime.privacy import ORT_REFUSAL, DPPlan
from edge_runtime.schedule import learning_rate_factor
from edge_runtime.split_client import SplitLink
from edge_runtime.tensor_file import WeightView
from edge_runtime.text import TaskEncoder, poisson_batches, training_batches
from edge_runtime.transfer import sha256_file
from edge_runtime.windows import bundle_windows, window_at

ADAPTER = "adapter.safetensors"
METRICS = "metrics.json"
CHECKPOINT_PREFIX = "checkpoint-"
# Headroom kept between the predicted peak and the budget.
PLAN_MARGIN = 0.10


@dataclass(frozen=True)
class TrainOptions:
    """What the device owner may override; None takes the bundle's default."""

    steps: int | None = None
    backend: str | None = None
    threads: int | None = None
    checkpoint_every: int | None = None
    budget_bytes: int | None = None
    progress: bool = True
    split_link: SplitLink | None = None  # a split bundle's server (the daemon names it from the job)


def bundle_id(bundle: Path) -> str:
    """sha256 of the signed manifest: names the exact bundle a result or checkpoint came from."""
    return hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()


def device_budget(profile_budget: int, override: int | None) -> int:
    """Bytes this process may use: the override, else the profile's budget capped by what is free right now."""
    if override is not None:
        return override
    free_now = psutil.Process().memory_info().rss + int(psutil.virtual_memory().available * 0.9)
    return min(profile_budget, free_now)


def latest_checkpoint(out: Path, bundle: str, backend: str) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint of this bundle and backend in `out` (complete ones are renamed in whole)."""
    for path in sorted(out.glob(f"{CHECKPOINT_PREFIX}*"), reverse=True):
        progress_file = path / "progress.json"
        if path.is_dir() and progress_file.is_file():
            progress = json.loads(progress_file.read_text(encoding="utf-8"))
            if progress["bundle"] == bundle and progress["backend"] == backend:
                return path, progress
    return None


def save_checkpoint(out: Path, backend: Any, progress: dict[str, Any]) -> None:
    target = out / f"{CHECKPOINT_PREFIX}{progress['step']:08d}"
    with atomic_directory(target) as staging:
        backend.save(staging)
        write_json_atomic(staging / "progress.json", progress)
    for older in out.glob(f"{CHECKPOINT_PREFIX}*"):
        if older != target:
            shutil.rmtree(older, ignore_errors=True)


def _save_adapter(path: Path, weights: WeightView, manifest: Manifest) -> None:
    full_names = manifest.adapter.parameters  # the emulator's names -> the full model's
    local_names = {full_names[name]: name for name in weights}
    origin = {"model": manifest.model.name, "bottom": manifest.adapter.bottom, "top": manifest.adapter.top}
    write_adapter_file(path, WeightView(local_names, lambda name: weights[local_names[name]]), origin)


@dataclass(frozen=True)
class TrainingPlan:
    """A verified bundle and the device's data, planned to fit this device's memory (or refused before training)."""

    manifest: Manifest
    encoder: TaskEncoder
    rows: list[tuple[list[int], int]]
    backend: str
    steps: int
    checkpoint_every: int
    budget: int
    sequence: int
    micro_batch: int
    predicted: MemoryEstimate
    privacy: DPPlan | None = None  # DP-SGD's noise and sampling rate for this device's example count


def plan_training(bundle: Path, data: Path, trusted_key: Path, options: TrainOptions) -> TrainingPlan:
    """Verify `bundle`, encode `data`, choose the micro-batch; raise BudgetError if even micro-batch 1 won't fit."""
    manifest = verify_bundle(bundle, trusted_key)
    training = manifest.training
    steps = options.steps if options.steps is not None else training.steps
    every = options.checkpoint_every if options.checkpoint_every is not None else training.checkpoint_every
    if steps < 1 or every < 1:
        raise ConfigError(f"--steps {steps} and --checkpoint-every {every} must be at least 1")
    backend = options.backend or manifest.backends[0]
    encoder = TaskEncoder(bundle / TOKENIZER_FILE, manifest.task)
    rows = encoder.rows(load_examples(data))
    if not rows:
        raise DataError(f"{data} holds no example long enough to train on; give it at least one")
    budget = device_budget(manifest.profile.budget_bytes, options.budget_bytes)
    sequence = max(len(ids) for ids, _ in rows)  # the longest row decides the peak; rows are already capped
    micro_batch, predicted = choose_micro_batch(
        manifest.plan.shape,
        training.batch_size,
        sequence,
        manifest.task.kind,
        backend,
        budget,
        PLAN_MARGIN,
    )
    if manifest.split is not None and micro_batch < training.batch_size:  # the server answers whole batches
        raise BudgetError(f"a split step needs its whole batch of {training.batch_size} at once, and only "
                          f"{micro_batch} rows fit {budget / MIB:,.0f} MiB: raise the budget or export the job with "
                          "a smaller --batch-size")  # fmt: skip
    privacy = None
    if manifest.privacy is not None:
        if backend != "torch":
            raise ConfigError(ORT_REFUSAL)
        privacy = DPPlan.make(manifest.privacy, training.batch_size, len(rows), steps)
    return TrainingPlan(
        manifest, encoder, rows, backend, steps, every, budget, sequence, micro_batch, predicted, privacy
    )


def _starting_weights(path: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """A starting adapter (full-model names, e.g. last round's aggregate) under the bundle's parameter names."""
    tensors = load_file(str(path))
    names = manifest.adapter.parameters
    missing = sorted(set(names.values()) - set(tensors))
    if missing or len(tensors) != len(names):
        raise DataError(
            f"starting adapter {path} does not match this bundle's adapter ({len(tensors)} tensors for "
            f"{len(names)}; missing e.g. {missing[:2]}): it was trained for another split"
        )
    return {local: tensors[full] for local, full in names.items()}


def start_result(out: Path, bundle: Path, start_adapter: Path | None) -> str:
    """Ready the result folder `out` for a run of `bundle` from `start_adapter`, and return the run's identity
    (the bundle's id, and the start's sha256): a checkpoint of another run is never resumed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS).unlink(missing_ok=True)  # a result folder with metrics.json is a finished result, never stale
    for leftover in out.glob(f".{CHECKPOINT_PREFIX}*.tmp"):  # a checkpoint cut off mid-write
        shutil.rmtree(leftover, ignore_errors=True)
    return bundle_id(bundle) + (f"+{sha256_file(start_adapter)}" if start_adapter is not None else "")


def finish_result(out: Path, metrics: dict[str, Any]) -> None:
    """Mark the result in `out` finished (its metrics.json, written atomically) and drop its checkpoints."""
    write_json_atomic(out / METRICS, metrics)
    for checkpoint in out.glob(f"{CHECKPOINT_PREFIX}*"):
        shutil.rmtree(checkpoint, ignore_errors=True)


def train_bundle(
    bundle: Path,
    data: Path,
    out: Path,
    trusted_key: Path,
    options: TrainOptions,
    start_adapter: Path | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Verify `bundle`, train its adapter on `data`, write `out`/adapter.safetensors and metrics.json.

    `start_adapter` (safetensors, full-model names) replaces the bundle's initial adapter; `on_step` is called
    after every step with the step, steps, loss and peak memory so far.
    """
    started = time.perf_counter()
    plan = plan_training(bundle, data, trusted_key, options)
    if plan.manifest.split is not None:
        from edge_runtime.split_job import train_split_bundle  # imports this module

        return train_split_bundle(bundle, plan, out, trusted_key, options, start_adapter, on_step)
    manifest, training, backend_name, steps = plan.manifest, plan.manifest.training, plan.backend, plan.steps
    budget, micro_batch, batch_size = plan.budget, plan.micro_batch, training.batch_size
    start = _starting_weights(start_adapter, manifest) if start_adapter is not None else None
    windows = bundle_windows(manifest)

    identity = start_result(out, bundle, start_adapter)
    found = latest_checkpoint(out, identity, backend_name)
    progress: dict[str, Any] = {
        "bundle": identity,
        "backend": backend_name,
        "step": 0,
        "samples": 0,
        "losses": [],
        "step_seconds": [],
        "micro_batch_changes": [],
    }
    if found is not None:
        progress = found[1]
    threads = options.threads or os.cpu_count() or 1
    monitor = PeakMemory()
    with monitor:
        backend = open_backend(backend_name, bundle, manifest, threads, found[0] if found else None)
        if start is not None and found is None:
            backend.load(start)
        if plan.privacy is None:
            batches = training_batches(plan.encoder, plan.rows, batch_size, training.seed)
            for _ in range(progress["step"]):
                next(batches)
        else:  # each step draws each row with probability q, from the OS's randomness (the analysis needs it secret)
            batches = poisson_batches(plan.encoder, plan.rows, plan.privacy.sampling_rate)
        resumed_from = progress["step"]
        with tqdm(
            total=steps, initial=resumed_from, desc=f"train ({backend_name})", unit="step", disable=not options.progress
        ) as bar:
            for step in range(resumed_from, steps):
                batch = next(batches)
                monitor.new_window()
                tick = time.perf_counter()
                lr = training.lr * learning_rate_factor(step, steps, training.warmup_ratio)
                backend.select_window(window_at(step, steps, len(windows)))
                if plan.privacy is None:
                    loss = backend.step(batch.split(micro_batch), lr)
                else:
                    loss = backend.private_step(batch.split(micro_batch) if len(batch) else [], lr, plan.privacy)
                progress["step_seconds"].append(round(time.perf_counter() - tick, 4))
                if math.isfinite(loss):  # a DP step may draw no row: it only adds noise, and has no loss
                    progress["losses"].append(loss)
                progress["samples"] += len(batch)
                progress["step"] = step + 1
                if monitor.window_peak > budget and micro_batch > 1:  # this step went over: halve, never exceed again
                    micro_batch = max(m for m in range(1, micro_batch // 2 + 1) if batch_size % m == 0)
                    progress["micro_batch_changes"].append({"step": step + 1, "micro_batch": micro_batch})
                if progress["step"] % plan.checkpoint_every == 0 and progress["step"] < steps:
                    save_checkpoint(out, backend, progress)
                bar.set_postfix(loss=f"{loss:.3f}", rss=f"{monitor.current / MIB:,.0f}MiB")
                bar.update()
                if on_step is not None:
                    on_step({"step": step + 1, "steps": steps, "loss": loss, "peak_memory_bytes": monitor.peak})
        # Written from the live weights one tensor at a time, inside the measured window: a recomputing ONNX Runtime
        # graph's arena still holds a step's memory here, and a copy of the whole adapter on top of it was that
        # run's peak (SmolLM2 keep 8, int8 + recompute: 549 MiB training, 601 with the 54 MiB copy).
        _save_adapter(out / ADAPTER, backend.adapter(), manifest)
    metrics = ResultMetrics(
        format=RESULT_FORMAT,
        schema=RESULT_SCHEMA,
        tool_version=__version__,
        bundle=identity,
        model=manifest.model,
        emulator=manifest.emulator,
        backend=backend_name,
        adapter_kind=manifest.adapter.kind,
        adapter_options=manifest.adapter.options,
        threads=threads,
        steps=progress["step"],
        samples=progress["samples"],
        examples=len(plan.rows),
        start_adapter=sha256_file(start_adapter) if start_adapter is not None else None,
        resumed_from_step=resumed_from,
        loss_curve=[round(value, 6) for value in progress["losses"]],
        first_loss=progress["losses"][0],
        final_loss=progress["losses"][-1],
        step_seconds_median=statistics.median(progress["step_seconds"]),
        wall_seconds=round(time.perf_counter() - started, 2),
        batch_size=batch_size,
        sequence=plan.sequence,
        micro_batch=micro_batch,
        micro_batch_changes=progress["micro_batch_changes"],
        budget_bytes=budget,
        predicted_peak_bytes=plan.predicted.total,
        peak_memory_bytes=monitor.peak,
        peak_memory_sampled_bytes=monitor.sampled_peak,
        privacy=plan.privacy.record() if plan.privacy is not None else PrivacyRecord(),
        layer_windows=(
            [TrainedWindow(w.layers, w.exit) for w in manifest.adapter.windows] if manifest.adapter.windows else None
        ),
    ).to_dict()
    finish_result(out, metrics)
    return metrics
