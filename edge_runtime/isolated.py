"""Train one job in a child process: its memory is returned when it ends, and the daemon keeps serving meanwhile."""

from __future__ import annotations

import ctypes
import multiprocessing
import queue
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_runtime.errors import OffsiteError
from edge_runtime.trainer import TrainOptions, train_bundle

PR_SET_PDEATHSIG = 1


class TrainingInterrupted(OffsiteError):
    """The daemon was asked to stop mid-training; the job resumes from its last checkpoint on the next start."""


def _die_with_parent() -> None:
    """On Linux, a killed daemon takes its training child with it (no orphan writing into the job's folder)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _child(arguments: tuple[Any, ...], events: multiprocessing.Queue) -> None:
    _die_with_parent()
    try:
        train_bundle(*arguments, on_step=events.put)
        events.put({"finished": True})
    except OffsiteError as error:
        events.put({"error": str(error)})


def train_isolated(
    bundle: Path,
    data: Path,
    out: Path,
    trusted_key: Path,
    options: TrainOptions,
    start_adapter: Path | None,
    on_step: Callable[[dict[str, Any]], None],
    serve: Callable[[], None],
    stop: threading.Event,
) -> None:
    """Run `train_bundle` in a fresh process; `serve()` runs between its progress reports, `on_step` with each.

    Raises OffsiteError with the child's message if training failed, TrainingInterrupted if `stop` was set.
    """
    context = multiprocessing.get_context("spawn")  # never fork a process that runs MQTT and ORT threads
    events = context.Queue()
    arguments = (bundle, data, out, trusted_key, options, start_adapter)
    child = context.Process(target=_child, args=(arguments, events), name="edge-train", daemon=True)
    child.start()
    try:
        while True:
            if stop.is_set():
                raise TrainingInterrupted(f"stopped while training {out}; it resumes from its last checkpoint")
            try:
                event = events.get(timeout=0.1)
            except queue.Empty:
                if not child.is_alive() and events.empty():
                    raise OffsiteError(f"the training process exited with code {child.exitcode}") from None
                serve()
                continue
            if "error" in event:
                raise OffsiteError(event["error"])
            if event.get("finished"):
                return
            on_step(event)
    finally:
        if child.is_alive():
            child.terminate()
        child.join(timeout=30)
        events.close()
