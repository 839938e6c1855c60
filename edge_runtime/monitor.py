"""Memory watching: a background sampler of this process's resident memory, and the kernel's own peak."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import TracebackType

import psutil


def peak_rss_bytes() -> int:
    """The kernel's record of this process's peak resident memory (0 where the platform has none).

    On Linux this is VmHWM, the high-water mark of this program's own memory: `ru_maxrss` would do, except that it
    keeps the parent's resident size across fork and exec, so a 100 MiB trainer started by a 1.4 GiB process
    reports 1.4 GiB (measured in bench/layer_windows.py before this was changed).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """Samples resident memory every `interval` seconds while open: `peak` since opening, `window_peak` since the
    last `new_window()`, and `current`, in bytes."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self.window_peak = 0
        self.current = 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def _sample(self) -> None:
        self.current = self._process.memory_info().rss
        self.peak = max(self.peak, self.current)
        self.window_peak = max(self.window_peak, self.current)

    def new_window(self) -> None:
        """Start a new window for `window_peak` (e.g. one training step)."""
        self.window_peak = self.current

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
