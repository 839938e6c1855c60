"""Split a causal LM into adapter layers and a middle block, and compress the middle into an emulator."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel

from coordinator.architectures import spec_for
from coordinator.errors import ConfigError
from edge_runtime.manifest import EmulatorRecord

EMULATOR_RECORD = "offsite_emulator"  # config attribute; saved with config.json, so save/load keeps it


@dataclass(frozen=True)
class Split:
    """Adapter = bottom `bottom` and top `top` layers; the middle keeps `keep` layers in the emulator.

    >>> Split(bottom=2, top=2, keep=8).kept_layers(24)
    [0, 1, 2, 5, 7, 10, 13, 16, 18, 21, 22, 23]
    """

    bottom: int
    top: int
    keep: int

    def __post_init__(self) -> None:
        if self.bottom < 0 or self.top < 0 or self.bottom + self.top == 0:
            raise ConfigError(
                f"adapter layers {self.bottom},{self.top} train nothing or are negative; "
                "use at least one bottom or top layer, e.g. --adapter-layers 2,2"
            )
        if self.keep < 1:
            raise ConfigError(f"keep={self.keep} must be at least 1; e.g. --keep 8")

    def middle_size(self, num_layers: int) -> int:
        """How many layers lie between the adapters of a `num_layers`-layer model; raises if none."""
        middle = num_layers - self.bottom - self.top
        if middle < 1:
            raise ConfigError(
                f"adapter layers {self.bottom},{self.top} leave no middle in a {num_layers}-layer model; "
                f"bottom + top must be at most {num_layers - 1}"
            )
        return middle

    def check(self, num_layers: int) -> None:
        """Raise ConfigError naming the valid range unless this split fits a `num_layers`-layer model."""
        middle = self.middle_size(num_layers)
        if self.keep > middle or (self.keep == 1 and middle > 1):
            valid = "1" if middle == 1 else f"2..{middle}"
            raise ConfigError(
                f"keep={self.keep} is out of range: a {num_layers}-layer model with adapter layers "
                f"{self.bottom},{self.top} has {middle} middle layers; choose keep in {valid}"
            )

    def kept_layers(self, num_layers: int, middle: list[int] | None = None) -> list[int]:
        """Full-model indices of the emulator's layers: bottom adapter, kept middle, top adapter.

        `middle` lists the kept middle offsets (0 = first middle layer); default: uniform drop.
        """
        self.check(num_layers)
        size = self.middle_size(num_layers)
        if middle is None:
            middle = uniform_drop(size, self.keep)
        if len(middle) != self.keep or sorted(set(middle)) != middle or not 0 <= middle[0] <= middle[-1] < size:
            raise ConfigError(f"middle offsets {middle} must be {self.keep} increasing offsets in 0..{size - 1}")
        kept = [self.bottom + i for i in middle]
        return [*range(self.bottom), *kept, *range(num_layers - self.top, num_layers)]


def uniform_drop(num_middle: int, keep: int) -> list[int]:
    """Offsets of the middle layers kept by uniform layer drop: `round(i*(n-1)/(k-1))` for i < k.

    The first and the last middle layer are always kept; keeping all layers keeps every offset.
    >>> uniform_drop(20, 8)
    [0, 3, 5, 8, 11, 14, 16, 19]
    """
    if num_middle == keep == 1:
        return [0]
    if not 2 <= keep <= num_middle:
        raise ConfigError(f"keep={keep} must be in 2..{num_middle} for {num_middle} middle layers")
    return [round(i * (num_middle - 1) / (keep - 1)) for i in range(keep)]


def build_emulator(
    model: PreTrainedModel, split: Split, middle: list[int] | None = None, recipe: str = "uniform"
) -> PreTrainedModel:
    """A new, smaller model of the same family: adapter layers plus the kept middle layers (`middle` offsets;
    default uniform drop), copied uncompressed.

    The emulator shares no tensors with `model`; its config records the layer map, so
    `save_pretrained` / `from_pretrained` round-trip it as an ordinary transformers model.
    """
    spec = spec_for(model.config.model_type)
    num_layers = model.config.num_hidden_layers
    kept = split.kept_layers(num_layers, middle)
    config = config_with_layers(model.config, kept)
    record = EmulatorRecord(recipe, num_layers, kept, split.bottom, split.top)
    set_emulator_record(config, record)
    emulator = type(model)(config).to(model.dtype)
    emulator.load_state_dict(state_with_layers(model.state_dict(), spec.layers, kept), strict=True)
    emulator.eval()
    return emulator


def config_with_layers(config: object, kept: list[int]) -> object:
    """A copy of a model config for a model holding only the `kept` layers (full-model indices)."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept]
    return config


def state_with_layers(state: dict[str, torch.Tensor], layers: str, kept: list[int]) -> dict[str, torch.Tensor]:
    """`state` with only the `kept` layers under the `layers` ModuleList, numbered again from 0 in that order."""
    position = {source: target for target, source in enumerate(kept)}
    subset = {}
    for name, tensor in state.items():
        located = split_layer_name(name, layers)
        if located is not None:
            index, rest = located
            if index not in position:
                continue
            name = f"{layers}.{position[index]}.{rest}"
        subset[name] = tensor
    return subset


def split_layer_name(name: str, layers: str) -> tuple[int, str] | None:
    """(layer index, rest of the name) for a parameter under the `layers` ModuleList, else None.

    >>> split_layer_name("model.layers.7.mlp.up_proj.weight", "model.layers")
    (7, 'mlp.up_proj.weight')
    """
    if not name.startswith(layers + "."):
        return None
    index, rest = name[len(layers) + 1 :].split(".", 1)
    return int(index), rest


def emulator_record(model: PreTrainedModel) -> EmulatorRecord | None:
    """The record of an emulator built by `build_emulator`; None for a full model."""
    record = getattr(model.config, EMULATOR_RECORD, None)
    return None if record is None else EmulatorRecord(**record)


def set_emulator_record(config: object, record: EmulatorRecord) -> None:
    """Store `record` in a model config (it travels with config.json)."""
    setattr(config, EMULATOR_RECORD, asdict(record))


def layer_map(model: PreTrainedModel) -> list[int]:
    """For each of the model's layers, the index of the full-model layer it holds."""
    record = emulator_record(model)
    return record.layer_map if record is not None else list(range(model.config.num_hidden_layers))


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(parameter.numel() for parameter in model.parameters())
