"""A federated job as the registry stores it: the bundle request, the dataset, rounds, devices and test file."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from coordinator.bundles.request import BundleRequest
from coordinator.errors import ConfigError
from coordinator.fleet.robust import AggregationRule
from coordinator.split.job import SplitJob, check_split_request
from edge_runtime.records import from_dict, to_dict


@dataclass(frozen=True)
class JobSpec:
    """One federated job: every device trains `bundle`'s adapter on its dataset `dataset`, `rounds` times.

    Each round runs `bundle.training.steps` steps per device; the aggregate (by `aggregate`, each device's
    update first clipped to `clip_norm` when given) is scored on `test` after each round. A round waits at most
    `deadline_s` seconds for its devices (default: as long as it takes), then goes on with those that answered,
    if they are at least `quorum`.
    """

    dataset: str
    bundle: BundleRequest = field(default_factory=BundleRequest)
    rounds: int = 2
    devices: list[str] | None = None  # default: every online device that has the dataset
    test: str | None = None
    limit_test: int | None = None
    aggregate: str = "fedavg"  # coordinator/fleet/robust.py: fedavg, median, trimmed-mean:BETA, krum:f=F
    clip_norm: float | None = None
    deadline_s: float | None = None
    quorum: int = 1
    per_device: bool = False  # choose each device's emulator, adapter rank and steps (coordinator/fleet/configure.py)
    candidate_emulators: tuple[str, ...] = ()  # with per_device: recipes to consider beside the bundle's own
    lora_ranks: tuple[int, ...] = ()  # with per_device and a LoRA adapter: ranks to consider (default r, r/2, r/4)
    min_steps: int | None = None  # with per_device: a device that cannot run this many steps is left out
    split: SplitJob | None = None  # split learning: devices train a prompt through the first layers, we run the rest

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds={self.rounds} must be at least 1")
        if self.limit_test is not None and self.limit_test < 1:
            raise ConfigError(f"--limit-test {self.limit_test} must be at least 1")
        AggregationRule.parse(self.aggregate)
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"--clip-norm {self.clip_norm} must be a positive L2 norm")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ConfigError(f"--deadline {self.deadline_s} must be a positive number of seconds per round")
        if self.quorum < 1 or (self.devices is not None and self.quorum > len(self.devices)):
            most = f" and at most the {len(self.devices)} devices named" if self.devices is not None else ""
            raise ConfigError(f"--quorum {self.quorum} must be at least 1{most}")
        if (self.candidate_emulators or self.lora_ranks or self.min_steps is not None) and not self.per_device:
            raise ConfigError("--candidate-emulator, --lora-ranks and --min-steps choose per device; add --per-device")
        for recipe in self.candidate_emulators:
            replace(self.bundle, emulator=recipe)  # a bad recipe fails here, with its own message
        if self.lora_ranks and (self.bundle.adapter().name != "lora" or min(self.lora_ranks) < 1):
            raise ConfigError(f"--lora-ranks {list(self.lora_ranks)} are ranks of at least 1 for --adapter-kind lora")
        if self.min_steps is not None and not 1 <= self.min_steps <= self.steps:
            raise ConfigError(f"--min-steps {self.min_steps} must be between 1 and the job's {self.steps} steps")
        if self.split is not None:
            check_split_request(self.bundle)
            if self.per_device:
                raise ConfigError("--split-after and --per-device do not go together: every device of a split "
                                  "job holds the same first layers")  # fmt: skip
        if self.test is not None and not Path(self.test).is_file():
            raise ConfigError(f"--test {self.test} is not a file; give the held-out data the aggregate is scored on")

    @property
    def rule(self) -> AggregationRule:
        return AggregationRule.parse(self.aggregate)

    @property
    def steps(self) -> int:
        return self.bundle.training.steps

    @property
    def fewest_steps(self) -> int:
        """The fewest steps a device may be given (per-device jobs): --min-steps, else a quarter of the job's."""
        return self.min_steps if self.min_steps is not None else math.ceil(self.steps / 4)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        return from_dict(cls, data, "job spec")
