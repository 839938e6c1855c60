"""A split device side's steps on ONNX Runtime in a process of its own (run it with torch blocked): its peak memory
and seconds per step, as JSON on stdout.

    python -m tests.without_torch bench.split_device_run GRAPHS TOKENIZER_JSON TASK_JSON DATA [--steps 6]

Each step is what the device does per exchange: the cut (the eval graph), then the prompt's AdamW step for a
gradient at the cut (the training graph). The gradient is random: its values do not change the cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from edge_runtime.backends.split_ort import OrtCutSide
from edge_runtime.data import load_examples
from edge_runtime.manifest import TaskRecord
from edge_runtime.monitor import peak_rss_bytes
from edge_runtime.records import from_dict
from edge_runtime.text import TaskEncoder, training_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("graphs", "tokenizer", "task", "data"):
        parser.add_argument(name, type=Path)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    task = from_dict(TaskRecord, json.loads(args.task.read_text()), "task")
    encoder = TaskEncoder(args.tokenizer, task)
    batches = training_batches(encoder, encoder.rows(load_examples(args.data)), args.batch_size, seed=0)
    side, rng, seconds, tokens = OrtCutSide(args.graphs), np.random.default_rng(0), [], []
    for _ in range(args.steps):
        batch = next(batches)
        start = time.perf_counter()
        cut = side.cut(batch.input_ids, batch.attention_mask)
        gradient = rng.standard_normal(cut.shape, dtype=np.float32) * 1e-3
        side.step(batch.input_ids, batch.attention_mask, gradient, 1e-3)
        seconds.append(time.perf_counter() - start)
        tokens.append(int(batch.attention_mask.sum()))
    print(json.dumps({"peak_memory_bytes": peak_rss_bytes(), "step_seconds_median": statistics.median(seconds),
                      "tokens_per_step": statistics.mean(tokens), "steps": args.steps}))  # fmt: skip


if __name__ == "__main__":
    main()
