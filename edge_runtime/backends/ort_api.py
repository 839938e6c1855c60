"""ONNX Runtime's on-device training API (`onnxruntime.training.api`), loaded without torch."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import onnxruntime

__all__ = ["CheckpointState", "Module", "Optimizer"]


def _without_training_package_init() -> None:
    """Let `onnxruntime.training.api` load without `onnxruntime.training/__init__.py`.

    In onnxruntime-training 1.19.2 that `__init__` imports torch (through `training.optim`), which a device
    installing `.[runtime]` does not have, and which would cost this process ~1.5 s and hundreds of MB where it
    does. The on-device API (`training.api`) needs only ONNX Runtime's C bindings, so the package is registered
    as a bare namespace pointing at its folder. Nothing is stubbed if the package was already imported.
    """
    if "onnxruntime.training" not in sys.modules:
        package = types.ModuleType("onnxruntime.training")
        package.__path__ = [str(Path(onnxruntime.__file__).parent / "training")]
        sys.modules["onnxruntime.training"] = package


_without_training_package_init()
from onnxruntime.training.api import CheckpointState, Module, Optimizer  # noqa: E402
