"""The device's command line in a process of its own, as a device runs it."""

import subprocess
import sys


def edge_runtime(*args: str) -> subprocess.CompletedProcess:
    """`edge-runtime ARGS`, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "edge_runtime.cli", *args], capture_output=True, text=True)
