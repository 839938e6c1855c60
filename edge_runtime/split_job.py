"""A split bundle trained on the device: its prompt against the job's split server, written as any result is.

`train_bundle` hands a bundle whose manifest has a `split` record here. The device side runs on ONNX Runtime
(`backends/split_ort.py`, no torch) or PyTorch (`backends/split_torch.py`); the server is reached over the
fleet's broker through the link the daemon names (`SplitLink`), signed with this device's key. The result is
the trained prompt under the full model's names, so it aggregates and plugs in as a `prompt` adapter's does,
and its metrics carry the split report (exchanges, bytes each way, what pruning dropped, the cut's ε).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.numpy import load_file

from edge_runtime import __version__
from edge_runtime.bundle import ADAPTER_FILE, ORT_DIRECTORY, TORCH_DIRECTORY, load_public_key, write_adapter_file
from edge_runtime.errors import ConfigError, DataError
from edge_runtime.identity import device_key
from edge_runtime.manifest import RESULT_FORMAT, RESULT_SCHEMA, PrivacyRecord, ResultMetrics
from edge_runtime.monitor import PeakMemory
from edge_runtime.split_client import SplitClient
from edge_runtime.split_device import CutExchange, SplitSetup, train_cut_side
from edge_runtime.trainer import ADAPTER, TrainingPlan, TrainOptions, finish_result, start_result
from edge_runtime.transfer import sha256_file

if TYPE_CHECKING:  # each side imports its own runtime: ONNX Runtime or torch, never both
    from edge_runtime.backends.split_ort import OrtCutSide
    from edge_runtime.backends.split_torch import TorchCutSide


def _prompt_name(plan: TrainingPlan) -> str:
    (full,) = plan.manifest.adapter.parameters.values()  # a split bundle trains its soft prompt only
    return full


def _open_side(bundle: Path, plan: TrainingPlan, threads: int) -> OrtCutSide | TorchCutSide:
    """The device side on the plan's backend, from the bundle's initial prompt."""
    manifest = plan.manifest
    if plan.backend not in manifest.backends:
        raise ConfigError(f"this split bundle was exported for {', '.join(manifest.backends)}, not --backend "
                          f"{plan.backend}; leave --backend out")  # fmt: skip
    if plan.backend == "ort":
        from edge_runtime.backends.split_ort import OrtCutSide

        return OrtCutSide(bundle / ORT_DIRECTORY, threads)
    from edge_runtime.backends.split_torch import TorchCutSide

    assert manifest.split is not None
    initial = load_file(str(bundle / ADAPTER_FILE))[_prompt_name(plan)]
    return TorchCutSide(bundle / TORCH_DIRECTORY, manifest.split.final_norm, initial, manifest.training.optimizer,
                        threads)  # fmt: skip


def _start_prompt(path: Path, plan: TrainingPlan, shape: tuple[int, ...]) -> np.ndarray:
    """The prompt a round starts from (the last round's aggregate), checked against this bundle's."""
    start = load_file(str(path))
    name = _prompt_name(plan)
    if set(start) != {name} or start[name].shape != shape:
        raise DataError(f"starting adapter {path} holds {sorted(start)[:2]}, not this bundle's {name} of shape "
                        f"{list(shape)}: it was trained for another job")  # fmt: skip
    return start[name]


def train_split_bundle(
    bundle: Path,
    plan: TrainingPlan,
    out: Path,
    trusted_key: Path,
    options: TrainOptions,
    start_adapter: Path | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the split bundle `plan` verified (on the rows it encoded) against its server; write
    `out`/adapter.safetensors and metrics.json, checkpointing every `checkpoint_every` steps (a cut-off run
    resumes where it was)."""
    manifest, split, training = plan.manifest, plan.manifest.split, plan.manifest.training
    assert split is not None
    link = options.split_link
    if link is None:
        raise ConfigError("a split bundle trains against its job's server: run it from `edge-runtime run`, whose "
                          "job names the server, not from `edge-runtime train`")  # fmt: skip
    started = time.perf_counter()
    identity = start_result(out, bundle, start_adapter)
    steps = dataclasses.replace(training, steps=plan.steps, checkpoint_every=plan.checkpoint_every)
    setup = SplitSetup(0, split.prune_fraction, split.prune_score, split.cut_dp)
    threads = options.threads or os.cpu_count() or 1
    client = SplitClient(link.address, link.device, link.job, device_key(link.state), load_public_key(trusted_key),
                         split.max_bytes(training.batch_size), link.topics)  # fmt: skip
    monitor, seconds = PeakMemory(), []
    with monitor:
        side = _open_side(bundle, plan, threads)
        if start_adapter is not None:
            side.load_prompt(_start_prompt(start_adapter, plan, side.prompt().shape))
        tick = time.perf_counter()

        def stepped(step: int, loss: float) -> None:
            nonlocal tick
            seconds.append(time.perf_counter() - tick)
            tick = time.perf_counter()
            if on_step is not None:
                on_step({"step": step, "steps": plan.steps, "loss": loss, "peak_memory_bytes": monitor.peak})

        client.start()
        try:
            report = train_cut_side(side, CutExchange(client), plan.encoder, plan.rows, steps, setup, stepped, out,
                                    identity)  # fmt: skip
        finally:
            client.close()
        report.asked_again = client.asked_again
        write_adapter_file(out / ADAPTER, {_prompt_name(plan): side.prompt()},
                           {"model": manifest.model.name, "bottom": 0, "top": 0})  # fmt: skip
    metrics = ResultMetrics(
        format=RESULT_FORMAT,
        schema=RESULT_SCHEMA,
        tool_version=__version__,
        bundle=identity,
        model=manifest.model,
        emulator=manifest.emulator,
        backend=plan.backend,
        adapter_kind=manifest.adapter.kind,
        adapter_options=manifest.adapter.options,
        threads=threads,
        steps=plan.steps,
        samples=report.samples,
        examples=len(plan.rows),
        start_adapter=sha256_file(start_adapter) if start_adapter is not None else None,
        loss_curve=[round(value, 6) for value in report.losses],
        first_loss=report.losses[0],
        final_loss=report.losses[-1],
        step_seconds_median=statistics.median(seconds) if seconds else None,
        wall_seconds=round(time.perf_counter() - started, 2),
        batch_size=training.batch_size,
        sequence=plan.sequence,
        micro_batch=training.batch_size,
        budget_bytes=plan.budget,
        predicted_peak_bytes=plan.predicted.total,
        peak_memory_bytes=monitor.peak,
        peak_memory_sampled_bytes=monitor.sampled_peak,
        privacy=PrivacyRecord(),
        split=dataclasses.asdict(report),
    ).to_dict()
    finish_result(out, metrics)
    return metrics
