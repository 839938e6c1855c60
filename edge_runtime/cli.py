"""`edge-runtime` command line (device side; never imports torch): `info` reports what this machine offers."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys

import psutil

from edge_runtime import __version__

BACKENDS = {"ort": "onnxruntime", "torch": "torch"}


def machine_info() -> dict[str, object]:
    """Memory, cores and which training backends are installed (checked without importing them)."""
    memory = psutil.virtual_memory()
    return {
        "version": __version__,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "memory_total_bytes": memory.total,
        "memory_available_bytes": memory.available,
        "backends": {name: importlib.util.find_spec(module) is not None for name, module in BACKENDS.items()},
    }


def main(argv: list[str] | None = None) -> int:
    """Run one `edge-runtime` command."""
    parser = argparse.ArgumentParser(prog="edge-runtime", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edge-runtime {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print this machine's memory, cores and installed backends as JSON")
    args = parser.parse_args(argv)
    if args.command == "info":
        json.dump(machine_info(), sys.stdout, indent=2)
        print()
    return 0
