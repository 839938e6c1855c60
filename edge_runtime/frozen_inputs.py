"""Frozen weights fed to an ONNX Runtime training graph as inputs: held once, never written into its checkpoint.

ONNX Runtime's checkpoint holds every parameter it knows, and writing one serializes all of it in memory first
(1.3-2x the state, edge_runtime/memory.py): with the frozen weights inside, the float32 default bundle peaked at
1,958 MiB when it checkpointed against 1,388 when it did not. As constants of the graph they would be folded into
copies (a tied embedding's second use, the slices of an int8 head). So the exporter makes each frozen matrix
(2 or more dimensions; norms, scales and rotary tables stay constants) an input of the graph and saves it beside
the graphs; the backend reads the file once and passes the same buffers at every step (an OrtValue over a numpy
array is not a copy).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from edge_runtime.backends.ort_api import OrtValue
from edge_runtime.bundle import BundleError

FROZEN_FILE = "frozen_weights.safetensors"


class FrozenInputs:
    """The frozen weights of one set of training graphs, as the values of their inputs."""

    def __init__(self, graphs: Path) -> None:
        path = graphs / FROZEN_FILE
        arrays = load_file(str(path)) if path.exists() else {}
        self.values = {name: OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}

    def feeds(self, input_names: list[str], batch: dict[str, np.ndarray]) -> list[OrtValue]:
        """The graph's inputs in its order: `batch`'s arrays by name, the frozen weights by theirs."""
        missing = [name for name in input_names if name not in batch and name not in self.values]
        if missing:
            raise BundleError(
                f"the training graph reads inputs that neither the batch nor {FROZEN_FILE} holds: {missing[:3]}; "
                "export the bundle again with this version"
            )
        return [
            self.values[name] if name in self.values else OrtValue.ortvalue_from_numpy(batch[name])
            for name in input_names
        ]
