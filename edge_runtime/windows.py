"""Adaptive layer tuning (Edge-LLM): the adapter trains one window of layers at a time, each through its own exit.

A window is a run of consecutive adapter layers; its exit is the model's final norm and head applied right after
the window's last layer, so a step back-propagates only from that exit down to the window's first layer. Windows
train in equal phases, bottom first, so the last phase tunes the top layers against the final exit.
"""

from __future__ import annotations

from edge_runtime.bundle import ORT_DIRECTORY
from edge_runtime.errors import ConfigError
from edge_runtime.manifest import Manifest, WindowRecord


def split_windows(bottom: list[int], top: list[int], size: int) -> list[list[int]]:
    """Cut the bottom and the top adapter layers (ascending indices) into runs of at most `size`, bottom first.

    A window never spans the emulator between them, so no step back-propagates through the frozen middle alone.

    >>> split_windows([0, 1], [6, 7], 2)
    [[0, 1], [6, 7]]
    >>> split_windows([0, 1, 2], [6], 2)
    [[0, 1], [2], [6]]
    """
    if size < 1:
        raise ConfigError(f"--layer-window {size} must be at least 1 layer")
    return [group[start : start + size] for group in (bottom, top) for start in range(0, len(group), size)]


def window_at(step: int, steps: int, count: int) -> int:
    """The window 0-based `step` of `steps` trains: equal phases, bottom window first.

    >>> [window_at(step, 6, 2) for step in range(6)]
    [0, 0, 0, 1, 1, 1]
    """
    return min(count - 1, step * count // steps)


def bundle_windows(manifest: Manifest) -> list[WindowRecord]:
    """The bundle's windows: each with its `layers`, `exit` layer, trainable `parameters` and `ort` directory.

    Bundles without windows train every adapter parameter through the final exit, as one window.
    """
    return manifest.adapter.training_windows(ORT_DIRECTORY)
