"""Measure this machine into a device profile: memory (psutil), cores, a matmul throughput test, runtimes."""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import socket
import time

import numpy as np
import psutil

from device_profiles import GIB, DeviceProfile, validate

# Training may use this share of the machine's memory; the rest is left to the OS and other programs.
BUDGET_SHARE = 0.75
_MACHINES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64", "armv7l": "armv7l"}


def matmul_gflops(size: int = 512, seconds: float = 1.0) -> float:
    """Sustained float32 matrix-multiply throughput (numpy's BLAS) over about `seconds`."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((size, size), dtype=np.float32), rng.standard_normal((size, size), dtype=np.float32)
    a @ b  # warm up
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        runs += 1
    return 2 * size**3 * runs / elapsed / 1e9


def _providers() -> tuple[list[str], bool]:
    if importlib.util.find_spec("onnxruntime") is None:
        return ["CPUExecutionProvider"], False
    import onnxruntime

    return list(onnxruntime.get_available_providers()), importlib.util.find_spec("onnxruntime.training") is not None


def measure_profile(name: str | None = None) -> DeviceProfile:
    """A validated profile of the machine this runs on."""
    total = psutil.virtual_memory().total / GIB
    machine = platform.machine().lower()
    providers, ort_training = _providers()
    default_name = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-") or "this-device"
    record = {
        "name": name or default_name,
        "description": f"measured on {platform.node()} ({platform.platform()}) by edge-runtime profile",
        "memory_gb": round(total, 2),
        "training_budget_gb": round(total * BUDGET_SHARE, 2),
        "cpu_cores": os.cpu_count() or 1,
        "architecture": _MACHINES.get(machine, machine),
        "peak_fp32_gflops": round(matmul_gflops(), 1),
        "execution_providers": providers,
        "onnxruntime_training": ort_training,
    }
    return validate(record, "measured profile")
