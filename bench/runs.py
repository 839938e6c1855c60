"""What the benchmarks run in processes of their own: exporting a bundle, training it as a device, full fine-tuning.

Every training run is its own process, so its peak memory (the kernel's high-water mark) is its own, as on a device.
ORT runs with torch blocked, as where `.[runtime]` alone is installed.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_runtime.bundle import TOKENIZER_FILE
from edge_runtime.data import load_examples
from edge_runtime.manifest import Manifest
from edge_runtime.text import TaskEncoder, training_batches

REPO = Path(__file__).resolve().parent.parent
COORDINATOR = [sys.executable, "-m", "coordinator.cli"]


def make_keys(root: Path) -> tuple[Path, Path]:
    """A fresh signing key pair under `root`/keys: (coordinator.key, coordinator.pub)."""
    keys = root / "keys"
    if not keys.exists():
        subprocess.run([*COORDINATOR, "keys", "init", "--out", str(keys)], check=True, capture_output=True)
    return keys / "coordinator.key", keys / "coordinator.pub"


def export_bundle(root: Path, name: str, options: Sequence[str], backends: str = "ort,torch") -> Path:
    """`coordinator export` of SmolLM2-135M for the laptop profile with `options`; returns the bundle folder."""
    key, _ = make_keys(root)
    bundle = root / name
    export = ["export", "--model", "smollm2-135m", "--profile", "laptop-16gb", "--backends", backends, *options]
    finished = subprocess.run(
        [*COORDINATOR, *export, "--key", str(key), "--out", str(bundle)], capture_output=True, text=True
    )
    if finished.returncode != 0:
        raise RuntimeError(f"export {name} failed:\n{finished.stderr}")
    return bundle


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def device_train(bundle: Path, data: Path, backend: str, steps: int, out: Path, budget_gb: float | None = 8) -> dict:
    """`edge-runtime train` in its own process: its metrics.json, or {"refused": reason} when the device refuses
    the budget before training."""
    _, trust = make_keys(bundle.parent)
    device = [sys.executable, "-m", "tests.without_torch"] if backend == "ort" else [sys.executable, "-m"]
    options = ["--steps", str(steps), "--backend", backend, "--quiet"]
    options += ["--budget-gb", str(budget_gb)] if budget_gb is not None else []
    command = [*device, "edge_runtime.cli", "train", str(bundle), "--data", str(data), "--out", str(out)]
    finished = subprocess.run([*command, "--trust", str(trust), *options], cwd=REPO, stderr=subprocess.PIPE, text=True)
    if finished.returncode == 2 and "training needs at least" in finished.stderr:
        return {"refused": finished.stderr.strip().splitlines()[-1].split("error: ")[-1]}
    if finished.returncode != 0:
        raise RuntimeError(f"training failed:\n{finished.stderr}")
    return json.loads((out / "metrics.json").read_text())


def profiled_train(bundle: Path, data: Path, what: str, steps: int, out: Path) -> dict:
    """bench.profiled_training in its own process (`what`: full or adapter): step phases and peak memory."""
    command = [sys.executable, "-m", "bench.profiled_training", str(bundle), "--train", what]
    command += ["--data", str(data), "--steps", str(steps), "--out", str(out)]
    finished = subprocess.run(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    if finished.returncode != 0:
        raise RuntimeError(f"profiled training failed:\n{finished.stderr}")
    return json.loads(out.read_text())


def repeated(runs: Sequence[dict], keys: Sequence[str] = ("step_seconds_median", "peak_memory_bytes")) -> dict:
    """Medians over repeated runs of each of `keys`, and every run's values beside them."""
    return {key: statistics.median(run[key] for run in runs) for key in keys} | {
        f"{key}_runs": [run[key] for run in runs] for key in keys
    }


def batch_tokens(bundle: Path, data: Path, steps: int) -> dict[str, float]:
    """Real (unpadded) tokens and padded width of the first `steps` batches the device trains on (same stream for
    every bundle exported with the same batch size, seed and length cap)."""
    manifest = Manifest.from_json((bundle / "manifest.json").read_bytes())
    encoder, training = TaskEncoder(bundle / TOKENIZER_FILE, manifest.task), manifest.training
    batches = training_batches(encoder, encoder.rows(load_examples(data)), training.batch_size, training.seed)
    taken = [next(batches) for _ in range(steps)]
    return {
        "tokens_per_step": statistics.mean(int(batch.attention_mask.sum()) for batch in taken),
        "widest": max(batch.input_ids.shape[1] for batch in taken),
    }
