"""Split learning on the wire: one side's tensors of one exchange, in signed frames that each fit a message.

A message is a few named arrays (the cut's hidden states and mask; the logits; their gradient; the cut's
gradient). Its body is the arrays' bytes back to back in name order, cut into parts of at most `CHUNK_BYTES`;
each part travels as a frame: magic bytes, a JSON header, the part's bytes. The header names the job, device,
exchange and kind, the arrays' dtypes and shapes, the part's number, the body's and the part's sha256, and is
signed by its sender (the device's enrolled key, or the coordinator's), so every frame is authenticated alone
and a body is read only when all its parts arrived and its sha256 matches. numpy only: no torch on the device.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime.wire import CHUNK_BYTES, NAME, WIRE_SCHEMA, WireError, check_device_id, pack_frame, unpack_frame

SPLIT_MAGIC = b"OES1"
# What each side sends: the device its cut, then its gradient on the logits; the server the logits, then the
# gradient at the cut, or `unknown_cut` when asked for a gradient of a cut it does not hold (the device sends
# the cut again).
DEVICE_KINDS = ("cut", "gradient")
SERVER_KINDS = ("logits", "cut_gradient", "unknown_cut")
DTYPES = {"float32": np.dtype("<f4"), "uint8": np.dtype("u1")}
MAX_ARRAYS, MAX_DIMENSIONS = 4, 4


def cut_body_bytes(rows: int, positions: int, width: int) -> int:
    """A cut's body: float32 hidden states [rows, positions, width] and a byte of mask a position. Either side's
    limit on what one exchange may carry, and what the device counts as sent."""
    return rows * positions * (4 * width + 1)


@dataclass(frozen=True)
class SplitMessage:
    """What one side sends in one phase of one exchange."""

    job: str
    device: str
    exchange: int
    kind: str
    arrays: dict[str, np.ndarray]

    def body(self) -> bytes:
        return b"".join(np.ascontiguousarray(self.arrays[name], DTYPES[_dtype(self.arrays[name])]).tobytes()
                        for name in sorted(self.arrays))  # fmt: skip

    def frames(self, key: Ed25519PrivateKey) -> list[bytes]:
        """The message as signed frames, ready to publish."""
        body = self.body()
        parts = max(1, math.ceil(len(body) / CHUNK_BYTES))
        layout = {name: [_dtype(array), list(array.shape)] for name, array in sorted(self.arrays.items())}
        frames = []
        for part in range(parts):
            data = body[part * CHUNK_BYTES : (part + 1) * CHUNK_BYTES]
            header = {
                "kind": "split", "schema": WIRE_SCHEMA, "job": self.job, "device": self.device,
                "exchange": self.exchange, "message": self.kind, "arrays": layout, "part": part, "parts": parts,
                "body_sha256": hashlib.sha256(body).hexdigest(), "sha256": hashlib.sha256(data).hexdigest(),
            }  # fmt: skip
            signature = base64.b64encode(key.sign(_canonical(header))).decode()
            frames.append(pack_frame(SPLIT_MAGIC, header | {"signature": signature}, data))
        return frames


def carries(message: SplitMessage, names: set[str]) -> None:
    """WireError unless `message` carries exactly the arrays `names`."""
    if set(message.arrays) != names:
        raise WireError(f"a {message.kind} message carries {sorted(message.arrays)}, not {sorted(names)}")


def checked_array(message: SplitMessage, name: str, dtype: str, shape: tuple[int | None, ...]) -> np.ndarray:
    """`message`'s array `name`, checked against `dtype` and `shape` (None: any size, the caller checks it) and
    for finite values; WireError naming what differs."""
    array = message.arrays.get(name)
    if array is None or array.dtype != DTYPES[dtype] or array.ndim != len(shape):
        raise WireError(f"a {message.kind} message's {name!r} is not a {len(shape)}-d {dtype} array")
    if any(want is not None and have != want for have, want in zip(array.shape, shape, strict=True)):
        raise WireError(f"a {message.kind} message's {name!r} has shape {array.shape}, not {shape}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise WireError(f"a {message.kind} message's {name!r} holds a NaN or infinity")
    return array


def _dtype(array: np.ndarray) -> str:
    for name, dtype in DTYPES.items():
        if array.dtype == dtype:
            return name
    raise ValueError(f"split messages carry float32 or uint8 arrays, not {array.dtype}")


def _canonical(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class SplitFrame:
    """One received frame: its checked header and bytes; `verify` checks who signed it."""

    header: dict[str, Any]
    data: bytes

    @property
    def job(self) -> str:
        return self.header["job"]

    @property
    def device(self) -> str:
        return self.header["device"]

    @property
    def key(self) -> tuple[int, str, str]:
        """Which message this frame is part of: (exchange, kind, body sha256)."""
        return self.header["exchange"], self.header["message"], self.header["body_sha256"]

    def size(self) -> int:
        """The whole body's bytes, as the arrays' layout says."""
        return sum(DTYPES[dtype].itemsize * math.prod(shape) for dtype, shape in self.header["arrays"].values())

    def verify(self, key: Ed25519PublicKey, sender: str) -> None:
        signed = {name: value for name, value in self.header.items() if name != "signature"}
        try:
            key.verify(base64.b64decode(self.header["signature"], validate=True), _canonical(signed))
        except (InvalidSignature, ValueError):
            raise WireError(f"a split frame has a bad signature: not from {sender}") from None

    @classmethod
    def decode(cls, payload: bytes, kinds: tuple[str, ...]) -> SplitFrame:
        """Parse a frame of one of `kinds` and check its header and sha256; WireError naming what is wrong."""
        frame = cls(*unpack_frame(payload, SPLIT_MAGIC, "split frame"))
        frame._check(kinds)
        return frame

    def _check(self, kinds: tuple[str, ...]) -> None:
        header = self.header
        fields = {"kind": str, "schema": int, "job": str, "device": str, "exchange": int, "message": str,
                  "arrays": dict, "part": int, "parts": int, "body_sha256": str, "sha256": str,
                  "signature": str}  # fmt: skip
        for name, kind in fields.items():
            if not isinstance(header.get(name), kind) or isinstance(header.get(name), bool):
                raise WireError(f"split frame header's {name} is missing or not a {kind.__name__}")
        if set(header) != set(fields):
            raise WireError(f"split frame header has unknown fields: {sorted(set(header) - set(fields))[:5]}")
        if header["kind"] != "split" or header["schema"] != WIRE_SCHEMA:
            raise WireError(f"split frame of kind {header['kind'][:20]!r}, schema {header['schema']}: not split, 1")
        if not NAME.match(header["job"]):
            raise WireError(f"split frame's job {header['job'][:80]!r} is not a job name")
        check_device_id(header["device"])
        if header["message"] not in kinds:
            raise WireError(f"split frame's message {header['message'][:20]!r} is not one of {', '.join(kinds)}")
        if not 0 <= header["part"] < header["parts"] or header["exchange"] < 0:
            raise WireError(f"split frame's part {header['part']} of {header['parts']} or exchange is out of range")
        arrays = header["arrays"]
        if len(arrays) > MAX_ARRAYS or not all(NAME.match(name) for name in arrays):
            raise WireError(f"split frame names {len(arrays)} arrays; at most {MAX_ARRAYS}, each a name")
        for name, layout in arrays.items():
            good = (
                isinstance(layout, list) and len(layout) == 2 and layout[0] in DTYPES and isinstance(layout[1], list)
                and 1 <= len(layout[1]) <= MAX_DIMENSIONS
                and all(isinstance(n, int) and not isinstance(n, bool) and 0 < n < 2**31 for n in layout[1])
            )  # fmt: skip
            if not good:
                raise WireError(f"split frame's array {name!r} is not [dtype, shape] of float32 or uint8, 1-4 sizes")
        if header["parts"] != max(1, math.ceil(self.size() / CHUNK_BYTES)):
            raise WireError(f"split frame says {header['parts']} parts for a body of {self.size():,} bytes")
        if hashlib.sha256(self.data).hexdigest() != header["sha256"]:
            raise WireError(f"split frame part {header['part']} fails its sha256")


class Assembler:
    """One sender's frames, gathered into messages. It builds at most `slots` messages at once (a frame of one
    more drops the longest-held; a copy of an earlier question sent again can cross a new one) and none with a
    body over `max_bytes`."""

    def __init__(self, max_bytes: int, slots: int = 2) -> None:
        self.max_bytes, self.slots = max_bytes, slots
        self._parts: dict[tuple[int, str, str], dict[int, bytes]] = {}

    def add(self, frame: SplitFrame) -> SplitMessage | None:
        """The whole message once `frame` completes it, else None; WireError for a body over the limit or whose
        sha256 does not match."""
        if frame.size() > self.max_bytes:
            raise WireError(f"a split message of {frame.size():,} bytes is over this job's {self.max_bytes:,}")
        if frame.key not in self._parts and len(self._parts) == self.slots:
            del self._parts[next(iter(self._parts))]
        parts = self._parts.setdefault(frame.key, {})
        parts[frame.header["part"]] = frame.data
        if len(parts) < frame.header["parts"]:
            return None
        del self._parts[frame.key]
        body = b"".join(parts[part] for part in range(frame.header["parts"]))
        if len(body) != frame.size() or hashlib.sha256(body).hexdigest() != frame.header["body_sha256"]:
            raise WireError(f"split message of exchange {frame.key[0]} does not match its sha256")
        arrays, offset = {}, 0
        for name, (dtype, shape) in sorted(frame.header["arrays"].items()):
            count = math.prod(shape)
            arrays[name] = np.frombuffer(body, DTYPES[dtype], count, offset).reshape(shape).copy()
            offset += count * DTYPES[dtype].itemsize
        exchange, kind, _ = frame.key
        return SplitMessage(frame.job, frame.device, exchange, kind, arrays)
