"""Will an adapter transfer? The cosine between its gradient through the emulator and through the full model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from coordinator.adapters.layers import adapter_parameters
from coordinator.architectures import spec_for
from coordinator.emulator import Split, split_layer_name
from coordinator.errors import ConfigError
from coordinator.tasks import Task
from edge_runtime.data import Example


def _gradients(model: PreTrainedModel, split: Split, task: Task, batches: list) -> dict[str, list[torch.Tensor]]:
    """Per batch, the flattened task-loss gradient of the bottom and of the top adapter layers."""
    parameters = adapter_parameters(model, split.bottom, split.top)  # full-model names, so both models agree
    prefix = spec_for(model.config.model_type).layers
    bottom = {name for name in parameters if split_layer_name(name, prefix)[0] < split.bottom}
    groups = {"bottom": sorted(bottom), "top": sorted(set(parameters) - bottom)}
    wanted = [parameters[name] for names in groups.values() for name in names]
    before = [parameter.requires_grad for parameter in wanted]
    for parameter in wanted:
        parameter.requires_grad_(True)
    gradients: dict[str, list[torch.Tensor]] = {group: [] for group in groups}
    try:
        for batch in batches:
            grads = torch.autograd.grad(task.loss(model, batch), wanted)
            flat = dict(zip(groups["bottom"] + groups["top"], grads, strict=True))
            for group, names in groups.items():
                gradients[group].append(torch.cat([flat[name].flatten() for name in names]) if names else None)
    finally:
        for parameter, state in zip(wanted, before, strict=True):
            parameter.requires_grad_(state)
    return gradients


def gradient_alignment(
    full: PreTrainedModel,
    emulator: PreTrainedModel,
    split: Split,
    task: Task,
    examples: Sequence[Example],
    batch_size: int = 8,
    batches: int = 4,
) -> dict[str, float]:
    """Mean cosine, over `batches` batches of `examples`, between the adapter's gradient through `emulator` and
    through `full` (same batch, same untrained adapter), for the bottom and the top adapter layers.

    1 means the emulator steers the adapter as the full model would; near 0 means training on the emulator
    moves the adapter in a direction that does nothing for the full model (it learns to repair the emulator).
    The top layers' gradient depends only on the hidden state the emulator hands them; the bottom layers' is
    back-propagated through the whole emulator, so it is the first to go.
    """
    if batches < 1:
        raise ConfigError(f"gradient alignment needs at least 1 batch, not {batches}")
    chosen = list(task.batches(list(examples), batch_size, seed=1))[:batches]
    through_emulator = _gradients(emulator, split, task, chosen)
    through_full = _gradients(full, split, task, chosen)
    result = {}
    for group in ("bottom", "top"):
        pairs = zip(through_emulator[group], through_full[group], strict=True)
        cosines = [float(F.cosine_similarity(a, b, dim=0)) for a, b in pairs if a is not None]
        if cosines:
            result[group] = round(sum(cosines) / len(cosines), 4)
    return result
