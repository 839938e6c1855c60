"""A federated job as the registry stores it: the bundle request, the dataset, rounds, devices and test file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.bundles.request import BundleRequest
from coordinator.errors import ConfigError
from coordinator.fleet.robust import AggregationRule
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
        if self.test is not None and not Path(self.test).is_file():
            raise ConfigError(f"--test {self.test} is not a file; give the held-out data the aggregate is scored on")

    @property
    def rule(self) -> AggregationRule:
        return AggregationRule.parse(self.aggregate)

    @property
    def steps(self) -> int:
        return self.bundle.training.steps

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        return from_dict(cls, data, "job spec")
