"""How a round's device adapters combine: FedAvg, or a rule one poisoned device cannot steer (median, trimmed
mean, Krum), after clipping each device's update and refusing non-finite ones.

`--aggregate fedavg|median|trimmed-mean:0.2|krum:f=1`, `--clip-norm C`. FedAvg weighs each device by its
examples (McMahan et al., 2017), so one device claiming many examples, or sending a scaled update, sets the
aggregate alone. The coordinate-wise median and β-trimmed mean (Yin et al., 2018) take, per weight, the middle
device values, unweighted; Krum (Blanchard et al., 2017) keeps the one device whose update is closest to its
n − f − 2 nearest others. All three shift with the updates (the same if every weight moves by the same
amount), so they work on the weights directly; clipping needs the round's starting adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from coordinator.errors import ConfigError, DataError

RULES = ("fedavg", "median", "trimmed-mean", "krum")
Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AggregationRule:
    """One rule and its setting: `trim` (the fraction cut at each end) for trimmed-mean, `faulty` (f) for Krum."""

    name: str = "fedavg"
    trim: float = 0.2
    faulty: int = 1

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise ConfigError(f"--aggregate {self.name!r} is not one of {', '.join(RULES)} (e.g. trimmed-mean:0.2)")
        if not 0 < self.trim < 0.5:
            raise ConfigError(f"trimmed-mean:{self.trim} must cut a fraction between 0 and 0.5 at each end")
        if self.faulty < 0:
            raise ConfigError(f"krum:f={self.faulty} must be a number of faulty devices, 0 or more")

    @classmethod
    def parse(cls, text: str) -> AggregationRule:
        """`fedavg`, `median`, `trimmed-mean[:BETA]` or `krum[:f=F]`."""
        name, _, setting = text.strip().partition(":")
        try:
            if name == "trimmed-mean" and setting:
                return cls(name, trim=float(setting))
            if name == "krum" and setting:
                key, _, value = setting.partition("=")
                if key != "f":
                    raise ValueError
                return cls(name, faulty=int(value))
        except ValueError:
            raise ConfigError(f"--aggregate {text!r}: write trimmed-mean:0.2 or krum:f=1") from None
        if setting:
            raise ConfigError(f"--aggregate {name} takes no setting (got {setting!r})")
        return cls(name)

    def label(self) -> str:
        settings = {"trimmed-mean": f"trimmed-mean:{self.trim:g}", "krum": f"krum:f={self.faulty}"}
        return settings.get(self.name, self.name)

    def combine(
        self, results: list[dict[str, torch.Tensor]], shares: list[float], average: Callable[..., Weights]
    ) -> Weights:
        """The rule applied to device adapters (same tensor names): FedAvg is the adapter kind's own `average`
        weighted by `shares`; the robust rules ignore the shares (a device's claimed examples cannot steer them)."""
        if self.name == "fedavg":
            return average(results, shares)
        names = sorted(results[0])
        if self.name == "krum":
            return dict(results[krum_choice(results, self.faulty)])
        cut = int(self.trim * len(results)) if self.name == "trimmed-mean" else 0
        if len(results) - 2 * cut < 1:
            raise DataError(f"{self.label()} cuts {cut} of {len(results)} results at each end: none would be left")
        combined = {}
        for name in names:  # one tensor at a time: a stack of every device's copy is the largest thing held
            ordered = torch.stack([result[name].double() for result in results]).sort(dim=0).values
            if self.name == "median":  # the middle value, or the mean of the two middle ones
                middle = (ordered[(len(results) - 1) // 2] + ordered[len(results) // 2]) / 2
            else:
                middle = ordered[cut : len(results) - cut].mean(dim=0)
            combined[name] = middle.float()
        return combined


def krum_choice(results: list[dict[str, torch.Tensor]], faulty: int) -> int:
    """Index of the result whose summed squared distance to its n − f − 2 nearest others is smallest."""
    count = len(results)
    if count < 2 * faulty + 3:
        raise DataError(f"krum:f={faulty} needs at least {2 * faulty + 3} device results; this round has {count}")
    distances = torch.zeros(count, count, dtype=torch.float64)
    for name in sorted(results[0]):  # squared distances add up over tensors: one tensor's stack at a time
        flat = torch.stack([result[name].double().flatten() for result in results])
        distances += torch.cdist(flat, flat).pow(2)
    nearest = count - faulty - 2
    scores = [float(row[torch.arange(count) != i].sort().values[:nearest].sum()) for i, row in enumerate(distances)]
    return min(range(count), key=scores.__getitem__)


def clip_updates(
    results: list[dict[str, torch.Tensor]], start: dict[str, torch.Tensor], norm: float
) -> list[dict[str, torch.Tensor]]:
    """Each result moved back towards `start` so that its update (result − start, all tensors) has L2 norm ≤ `norm`."""
    clipped = []
    for result in results:
        update = {name: result[name].double() - start[name].double() for name in result}
        length = float(torch.sqrt(sum(u.pow(2).sum() for u in update.values())))
        scale = min(1.0, norm / length) if length > 0 else 1.0
        clipped.append({name: (start[name].double() + scale * u).float() for name, u in update.items()})
    return clipped


def finite(result: dict[str, torch.Tensor]) -> bool:
    """Whether every value of an adapter is a finite number."""
    return all(bool(torch.isfinite(tensor).all()) for tensor in result.values())
