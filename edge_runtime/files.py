"""Atomic, durable writes: a reader sees the old file or the whole new one, never a half-written one, and once a
write returns it survives a power cut (the data is synced before the rename, the folder's entry after it)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _sync(path: Path) -> None:
    """fsync a file or a folder (a folder's sync makes the names in it, a rename's result, durable)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(temporary)
        _sync(Path(temporary))
        os.replace(temporary, path)
        _sync(path.parent)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` whole, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(temporary, 0o777 & ~_umask())
    try:
        yield temporary
        for inner in sorted(temporary.rglob("*"), reverse=True):  # files, then their folders, deepest first
            if not inner.is_symlink():
                _sync(inner)
        _sync(temporary)
        retired = path.with_name(f".{path.name}.old-{os.getpid()}") if path.exists() else None
        if retired is not None:
            os.replace(path, retired)
        os.replace(temporary, path)
        _sync(path.parent)
        if retired is not None:
            shutil.rmtree(retired)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, record: object) -> None:
    """Write `record` as sorted, indented JSON to `path` atomically."""
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
