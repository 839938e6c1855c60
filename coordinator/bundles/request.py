"""One bundle request: everything but the model's weights and the device profile that decides a bundle's bytes.

`coordinator export` and `plan`, `fleet dispatch` (inside its JobSpec) and the fleet's bundle cache all take a
`BundleRequest`; the cache key is a hash of its sorted JSON with the model's sha256 and the profile.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from coordinator.adapters import AdapterKind, adapter_kind, check_layer_window
from coordinator.defaults import DEFAULT_EMULATOR, DEFAULT_KEEP, DEFAULT_LR
from coordinator.emulator import Split
from coordinator.errors import ConfigError
from coordinator.tasks import DEFAULT_LABEL_WORDS, DEFAULT_TEMPLATE, ClassificationTask, LanguageModelTask
from coordinator.train import TrainConfig
from device_profiles import DeviceProfile
from edge_runtime.backends import BACKENDS
from edge_runtime.manifest import CLASSIFICATION, LANGUAGE_MODEL, TASK_KINDS, DPTarget
from edge_runtime.records import from_dict, to_dict


@dataclass(frozen=True)
class TaskSpec:
    """The task the adapter trains for: classification by label words in a template, or language modelling."""

    kind: str = CLASSIFICATION
    label_words: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_LABEL_WORDS))
    template: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ConfigError(f"task {self.kind!r} is not one of {', '.join(TASK_KINDS)}")
        if self.kind == CLASSIFICATION:
            if "{text}" not in self.template:
                raise ConfigError(f"template {self.template!r} has no {{text}} to put the example in")
            if len(self.label_words) < 2:
                raise ConfigError(f"label words {self.label_words} name fewer than two labels")

    def build(self, tokenizer: Any, max_length: int) -> ClassificationTask | LanguageModelTask:
        if self.kind == LANGUAGE_MODEL:
            return LanguageModelTask(tokenizer, max_length)
        return ClassificationTask(tokenizer, self.label_words, self.template, max_length)


DP_KINDS = ("bias", "lora")  # the adapter kinds DP-SGD trains (edge_runtime/backends/per_sample.py)


@dataclass(frozen=True)
class BundleRequest:
    """A bundle to export: model, adapter split, emulator recipe, adapter kind, task, device training defaults.

    >>> BundleRequest(adapter_layers=(1, 1), keep=2, emulator="uniform").split()
    Split(bottom=1, top=1, keep=2)
    """

    model: str = "smollm2-135m"
    adapter_layers: tuple[int, int] = (2, 2)
    keep: int = DEFAULT_KEEP
    emulator: str = DEFAULT_EMULATOR  # recipe spec, e.g. "greedy:harmonize=64" (see `coordinator export --help`)
    distill: int = 0
    calibration: str | None = None
    adapter_kind: str = "layers"
    task: TaskSpec = field(default_factory=TaskSpec)
    training: TrainConfig = field(default_factory=lambda: TrainConfig(lr=DEFAULT_LR))
    checkpoint_every: int = 10
    layer_window: int | None = None  # adaptive layer tuning: train this many adapter layers at a time
    backends: tuple[str, ...] = ()  # empty: the profile's preferred backend (with `dp`: torch)
    dp: DPTarget | None = None  # differentially private training on the device (DP-SGD)
    recompute: bool = False  # recompute layer activations in the backward pass (one layer's held, not all)

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every={self.checkpoint_every} must be at least 1, e.g. 10")
        unknown = [name for name in self.backends if name not in BACKENDS]
        if unknown:
            raise ConfigError(f"backends {unknown} are not among {', '.join(BACKENDS)}")
        check_layer_window(self.layer_window, self.adapter())  # a bad adapter kind fails here, with its own message
        self.recipe()  # and a bad recipe spec
        if self.dp is not None and self.adapter().name not in DP_KINDS:
            raise ConfigError(
                f"--dp trains {' or '.join(DP_KINDS)} adapters (per-example gradients without a backward per "
                f"example), not {self.adapter().name!r}; pass --adapter-kind bias or --adapter-kind lora"
            )
        if self.dp is not None and self.recompute:
            raise ConfigError("--dp and --recompute do not go together: per-example gradients are taken in one "
                              "backward pass over kept activations; drop --recompute")  # fmt: skip
        if self.dp is not None and self.backends and self.backends != ("torch",):
            raise ConfigError(f"--dp runs on the PyTorch backend only (ONNX Runtime's graphs give no per-example "
                              f"gradients); pass --backends torch, not {','.join(self.backends)}")  # fmt: skip

    def adapter(self) -> AdapterKind:
        """The adapter kind (coordinator/adapters/) this request names."""
        return adapter_kind(self.adapter_kind)

    def recipe(self) -> Any:
        """The emulator recipe (an EmulatorSpec) this request names."""
        from coordinator.compression import EmulatorSpec  # heavy: compression imports the recipes

        return EmulatorSpec.parse(self.emulator, self.keep, self.distill, self.calibration)

    def split(self) -> Split:
        """Adapter layers and kept middle, with the recipe's keep (if it names one) in place of `keep`."""
        return self.recipe().split_for(Split(*self.adapter_layers, keep=self.keep))

    def backends_for(self, profile: DeviceProfile) -> tuple[str, ...]:
        """The backends to export for `profile`: the requested ones, else the profile's preferred one (with `dp`,
        PyTorch: the only backend with per-example gradients)."""
        return self.backends or (("torch",) if self.dp is not None else profile.backends[:1])

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BundleRequest:
        return from_dict(cls, data, "bundle request")

    def cache_key(self, model_sha256: str, profile: DeviceProfile) -> str:
        """16 hex digits naming the bundle this request makes from that model for that profile."""
        identity = {"request": self.to_dict(), "model": model_sha256, "profile": profile.to_dict()}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
