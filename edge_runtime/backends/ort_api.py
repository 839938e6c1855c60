"""ONNX Runtime and its on-device training API (`onnxruntime.training.api`), loaded without torch: the device's
code imports ONNX Runtime from here only."""

from __future__ import annotations

import importlib.abc
import sys
import types
from pathlib import Path

__all__ = ["CheckpointState", "Module", "Optimizer", "OrtValue", "SessionOptions"]


class _TorchBlocked(importlib.abc.MetaPathFinder):
    """Makes `import torch` fail, as on a device without it."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.split(".")[0] == "torch":
            raise ImportError("torch is not loaded while ONNX Runtime's training API loads")
        return None


def _load_training_api() -> types.ModuleType:
    """`onnxruntime.training.api`, without torch.

    In onnxruntime-training 1.19.2, `import onnxruntime` validates the build by importing
    `onnxruntime.training.ortmodule`, and the package's `__init__` imports `training.optim`: both import torch where
    it is installed (a device with `.[runtime-torch]`, or this repository's environment), which costs the training
    process ~1.5 s and 240 MiB it never uses. Unless torch is loaded already, it is blocked while ONNX Runtime
    loads (both imports tolerate its absence, as on a device without it), and the training package is registered
    as a bare namespace pointing at its folder, so the on-device API loads with ONNX Runtime's C bindings alone.
    """
    blocker = None if "torch" in sys.modules else _TorchBlocked()
    if blocker is not None:
        sys.meta_path.insert(0, blocker)
    try:
        import onnxruntime

        if "onnxruntime.training" not in sys.modules:
            package = types.ModuleType("onnxruntime.training")
            package.__path__ = [str(Path(onnxruntime.__file__).parent / "training")]
            sys.modules["onnxruntime.training"] = package
        from onnxruntime.training import api
    finally:
        if blocker is not None:
            sys.meta_path.remove(blocker)
    return api


_api = _load_training_api()
CheckpointState, Module, Optimizer = _api.CheckpointState, _api.Module, _api.Optimizer
OrtValue, SessionOptions = sys.modules["onnxruntime"].OrtValue, sys.modules["onnxruntime"].SessionOptions
