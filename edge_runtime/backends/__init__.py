"""Training backends: ONNX Runtime training (default) and PyTorch (for devices without an ORT training wheel)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

import numpy as np

from edge_runtime.errors import ConfigError
from edge_runtime.manifest import Manifest
from edge_runtime.tensor_file import WeightView
from edge_runtime.text import Batch

BACKENDS = ("ort", "torch")
# The module each backend needs, to tell whether it is installed without importing it.
BACKEND_MODULES = {"ort": "onnxruntime", "torch": "torch"}
_INSTALL = {
    "ort": "pip install onnxruntime-training==1.19.2 (x86-64 only)",
    "torch": "pip install '.[runtime-torch]' (on Jetson: JetPack's torch wheel)",
}


class Backend(Protocol):
    """One training step over micro-batches; state saved and restored with the optimizer's moments."""

    name: str

    def select_window(self, window: int) -> None:
        """Train the bundle's layer window `window` from the next step on (edge_runtime/windows.py)."""
        ...

    def step(self, micro_batches: list[Batch], learning_rate: float) -> float:
        """Accumulate gradients over `micro_batches` (each weighted by its share of rows), update; mean loss."""
        ...

    def save(self, directory: Path) -> None:
        """Write the trainable weights and optimizer state into `directory` (which exists and is empty)."""
        ...

    def adapter(self) -> WeightView:
        """Trainable weights by their names in the exported emulator, each read when asked (copy what you keep)."""
        ...

    def load(self, weights: dict[str, np.ndarray]) -> None:
        """Start from these trainable weights (names as in `adapter`), e.g. the last round's aggregate."""
        ...


def installed_backends() -> list[str]:
    """Backends whose package is installed here (checked without importing them)."""
    return [name for name, module in BACKEND_MODULES.items() if importlib.util.find_spec(module) is not None]


def open_backend(name: str, bundle: Path, manifest: Manifest, threads: int, resume: Path | None) -> Backend:
    """Load backend `name` for `bundle`, from the bundle's initial state or from the checkpoint `resume`."""
    if name not in BACKENDS:
        raise ConfigError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    if name not in manifest.backends:
        raise ConfigError(
            f"this bundle was exported for {manifest.backends} only; export it with --backends {name} "
            f"or train with --backend {manifest.backends[0]}"
        )
    try:
        if name == "ort":
            from edge_runtime.backends.ort import OrtBackend

            return OrtBackend(bundle, manifest, threads, resume)
        from edge_runtime.backends.pytorch import TorchBackend
    except ImportError as error:
        raise ConfigError(f"backend {name!r} is not installed here ({error}): {_INSTALL[name]}") from None
    return TorchBackend(bundle, manifest, threads, resume)
