"""Rewrite one benchmark's section of BENCHMARKS.md in place, between its start/end markers."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from edge_runtime.files import atomic_path, write_json_atomic, write_text_atomic

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def machine_line() -> str:
    """One line describing the machine the numbers came from."""
    processor = platform.processor() or platform.machine()
    memory = psutil.virtual_memory().total / 2**30
    return f"{processor}, {os.cpu_count()} cores, {memory:.0f} GiB, Python {platform.python_version()}, CPU only"


def measuring_command(module: str) -> str:
    """The command line that made the numbers: this run's, without `--report-only` (which only rewrites text)."""
    shown = [shlex.quote(arg) for arg in sys.argv[1:] if arg != "--report-only"]
    return " ".join(["python -m", module, *shown])


def coordinator_command(argv: list[str]) -> str:
    """`coordinator ARGS` as a reader can retype it: repository and cache paths relative, not this machine's."""
    from coordinator.models import cache_root

    repo = f"{BENCHMARKS.parent}/"
    shown = [arg.replace(repo, "").replace(str(cache_root()), "$OFFSITE_EDGE_CACHE") for arg in argv]
    return " ".join(["coordinator", *shown])


def measured_or_saved(out: Path, module: str, report_only: bool, measure: Callable[[], dict]) -> dict:
    """With `report_only`, the results saved at `out`; else new ones, saved there with the command that made them."""
    if report_only:
        return json.loads(out.read_text())
    results = measure() | {"command": measuring_command(module)}
    write_json_atomic(out, results)
    return results


def save_figure(figure: Any, path: Path, dpi: int = 110) -> None:
    """Write a matplotlib figure as PNG, atomically, and free it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi)
    plt.close(figure)


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section named `name` of BENCHMARKS.md with `body`."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    write_text_atomic(BENCHMARKS, text)
