"""Writing a safetensors file one tensor at a time, so that weights read out of a training runtime on demand are
never all copied into memory at once (the format: an 8-byte little-endian header length, a JSON header of each
tensor's dtype, shape and byte range, then the tensors' bytes back to back)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

SAFETENSORS_DTYPES = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
}


class WeightView(Mapping[str, np.ndarray]):
    """Named weights read when asked, one at a time: `read(name)` gives the weight's current value, which may share
    memory with the live weight (copy what you keep).

    >>> weights = {"b": np.zeros(2, np.float32), "a": np.ones(3, np.float32)}
    >>> view = WeightView(weights, weights.__getitem__)
    >>> sorted(view), view["a"].tolist()
    (['a', 'b'], [1.0, 1.0, 1.0])
    """

    def __init__(self, names: Iterable[str], read: Callable[[str], np.ndarray]) -> None:
        self._names = dict.fromkeys(names)  # ordered, and a set for lookups
        self._read = read

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        return self._read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write `tensors` (names in sorted order) with `metadata` to `path`, reading each tensor twice, for its shape and
    then for its bytes, and keeping neither: a lazy mapping has at most one tensor copied out at a time."""
    names = sorted(tensors)
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name in names:
        array = tensors[name]
        if array.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors files here do not hold")
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        del array
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the tensors' bytes start 8-byte aligned, as safetensors writes them
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name in names:
            array = np.ascontiguousarray(tensors[name])
            handle.write(array.astype(array.dtype.newbyteorder("<"), copy=False).data)
            del array
