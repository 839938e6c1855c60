"""What a fleet job that splits the model asks for, checked when it is dispatched (no torch, no exporter)."""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.bundles.request import BundleRequest
from coordinator.errors import ConfigError
from edge_runtime.manifest import CLASSIFICATION, DPTarget
from edge_runtime.split_device import SplitSetup


@dataclass(frozen=True)
class SplitJob:
    """How a fleet job splits the model: the device keeps the first `cut_after` layers, drops the easiest
    `prune_fraction` of its examples first (scored by `prune_score`), and noises its cut to `cut_dp` if given."""

    cut_after: int
    prune_fraction: float = 0.0
    prune_score: str = "el2n"
    cut_dp: DPTarget | None = None

    def __post_init__(self) -> None:
        if self.cut_after < 1:
            raise ConfigError(f"--split-after {self.cut_after} must keep at least one layer on the device")
        self.setup()  # a bad fraction or score fails here, with the device's own message

    def setup(self) -> SplitSetup:
        """What the device's loop runs (no local loss: that head stays in the coordinator's PyTorch loop)."""
        return SplitSetup(0, self.prune_fraction, self.prune_score, self.cut_dp)


def check_split_request(request: BundleRequest) -> None:
    """Refuse a bundle request a split job cannot train: its device side trains a soft prompt for a
    classification task, with no DP-SGD (the cut is noised instead)."""
    kind = request.adapter()
    if kind.name != "prompt":
        raise ConfigError(f"a split job trains a soft prompt on the device, not a {kind.name!r} adapter; pass "
                          "--adapter-kind prompt:tokens=20")  # fmt: skip
    if request.task.kind != CLASSIFICATION:
        raise ConfigError(f"a split job trains a classification task, not {request.task.kind!r}: the server "
                          "answers the label words' logits")  # fmt: skip
    if request.dp is not None:
        raise ConfigError("a split job's device side trains without DP-SGD (--dp); noise what crosses the cut with "
                          "--cut-dp instead")  # fmt: skip
