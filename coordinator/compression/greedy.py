"""Greedy layer selection: remove, one at a time, the middle layer whose removal moves the predictions least."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from coordinator.architectures import decoder_layers
from coordinator.compression.calibration import Calibration, divergence, log_probs, prediction_fingerprint
from coordinator.compression.importance import layer_skipped
from coordinator.emulator import Split
from edge_runtime.files import write_json_atomic


def _divergence_without(
    model: PreTrainedModel, removed: set[int], batches: list[torch.Tensor], reference: list[torch.Tensor]
) -> float:
    layers = decoder_layers(model)
    with ExitStack() as stack:
        for index in removed:
            stack.enter_context(layer_skipped(layers[index]))
        return divergence(model, batches, reference)


def _load_path(file: Path | None) -> list[dict[str, object]]:
    if file is None or not file.is_file():
        return []
    try:
        return list(json.loads(file.read_text())["path"])
    except (ValueError, KeyError, TypeError):
        return []  # a damaged cache is measured again, not trusted


@torch.no_grad()
def select_greedy(
    model: PreTrainedModel, split: Split, calibration: Calibration, cache: Path | None = None
) -> tuple[list[int], dict]:
    """The kept middle offsets by backward elimination on output KL, and the removal path for the manifest.

    One-shot importance scores each layer with all others present; on models with a few load-bearing layers
    (SmolLM2's layer 11 makes the massive activations later layers depend on) that misjudges which layers can
    go together. Removing greedily, each round re-scored with the layers already removed, keeps the layers the
    rest depend on and tends to remove whole contiguous runs. Cost: (middle + keep + 1)(middle − keep) / 2
    forward passes over the calibration's measure blocks; the path is saved under `cache`, so a later build of
    the same model, split and calibration reuses it for any keep and continues it for a smaller one.
    """
    layers = decoder_layers(model)
    middle = list(range(split.bottom, len(layers) - split.top))
    batches = calibration.measure_batches()
    reference = log_probs(model, batches)
    name = f"greedy-{prediction_fingerprint(batches, reference, split.bottom, split.top)}.json"
    file = None if cache is None else cache / name
    known = _load_path(file)
    rounds = len(middle) - split.keep
    path = known[:rounds]
    removed = {int(step["removed"]) for step in path}
    todo = sum(len(middle) - done for done in range(len(path), rounds))
    with tqdm(total=todo, desc="greedy", unit="pass", leave=False) as bar:
        while len(path) < rounds:
            scores = {}
            for index in (i for i in middle if i not in removed):
                scores[index] = _divergence_without(model, removed | {index}, batches, reference)
                bar.update()
            cheapest = min(scores, key=lambda index: (scores[index], index))
            removed.add(cheapest)
            path.append({"removed": cheapest, "kl": round(scores[cheapest], 6)})
    if file is not None and len(path) > len(known):
        file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(file, {"path": path})
    kept = [index - split.bottom for index in middle if index not in removed]
    return kept, {"greedy_path": path}
