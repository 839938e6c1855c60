"""Memory watching: a background sampler of this process's resident memory, and the kernel's own peak."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import TracebackType

import psutil

CLEAR_REFS = Path("/proc/self/clear_refs")


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


def reset_peak_rss() -> bool:
    """Lower the kernel's peak record to this process's current resident memory (Linux 4.0+); False elsewhere."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """This process's resident memory while open: `peak` since opening, `window_peak` since the last
    `new_window()`, and `current`, in bytes.

    A background thread samples every `interval` seconds, but it needs the GIL, which ONNX Runtime holds through a
    whole training call: the samples missed a 1 GiB transient inside one (2.5 GiB by the kernel, 1.5 by the
    samples). So where the kernel's peak can be reset (Linux), each window starts by resetting it and its peak is
    the kernel's; the samples remain the fallback and feed the progress bar.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.sampled_peak = 0
        self.current = 0
        self._window_sampled = 0
        self._earlier_windows = 0  # the kernel's peaks of the closed windows
        self._kernel_windows = False
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    @property
    def window_peak(self) -> int:
        kernel = peak_rss_bytes() if self._kernel_windows else 0
        return max(self._window_sampled, kernel)

    @property
    def peak(self) -> int:
        return max(self.sampled_peak, self._earlier_windows, self.window_peak)

    def _sample(self) -> None:
        self.current = self._process.memory_info().rss
        self.sampled_peak = max(self.sampled_peak, self.current)
        self._window_sampled = max(self._window_sampled, self.current)

    def new_window(self) -> None:
        """Start a new window for `window_peak` (e.g. one training step)."""
        self._earlier_windows = max(self._earlier_windows, self.window_peak)
        self._kernel_windows = reset_peak_rss()
        self._window_sampled = self.current = self._process.memory_info().rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._earlier_windows = peak_rss_bytes()  # what this process reached before, e.g. loading
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
