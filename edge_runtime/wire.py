"""Wire records shared by device and coordinator: topics, typed JSON records, signed jobs, binary chunk frames."""

import base64
import dataclasses
import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime.errors import OffsiteError
from edge_runtime.records import RecordError, from_dict, json_object

WIRE_SCHEMA = 1
CHUNK_BYTES = 256 * 1024
# Nothing on the wire is larger than a chunk plus its header; anything larger is refused before it is parsed.
MAX_MESSAGE_BYTES = CHUNK_BYTES + 4096
FRAME_MAGIC = b"OEC1"
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Names that arrive over the network become folder names, so each is checked against a pattern that cannot be a
# path: no '/', and never '.' or '..' (the first character is a letter or digit). A transfer id is a sha256.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
TRANSFER_ID = re.compile(r"^[0-9a-f]{64}$")
MAX_TRANSFER_BYTES = 16 * 1024**3  # the largest file either side offers (a bundle of a few-billion-parameter model)
MAX_REQUEST_INDICES = 64  # chunks one Request may ask for: twice the receiver's window
MAX_TEXT = 2000  # characters of a free-text field (a reason)
DEVICE_STATES = ("online", "busy", "offline")
# What a device reports of a job: the daemon's events and, when a job is sent again, its state on disk.
EVENTS = ("queued", "downloading", "accepted", "training", "progress", "trained", "delivered", "rejected", "failed")

# Per-device channels. The device writes the first six, the coordinator the last three (`split` and `answers`:
# split learning's exchanges, edge_runtime/split_wire.py).
DEVICE_CHANNELS = ("status", "profile", "events", "acks", "results", "split")
COORDINATOR_CHANNELS = ("jobs", "transfer", "answers")


class WireError(OffsiteError):
    """A message that is malformed, of an unknown kind or schema, unsigned, replayed or oversize."""


def check_device_id(device_id: str) -> str:
    """Return `device_id` if it can be a topic level, else raise naming the rule."""
    if not DEVICE_ID.match(device_id):
        raise WireError(f"device id {device_id!r} must be 1-64 of A-Z a-z 0-9 _ . - (starting with a letter or digit)")
    return device_id


def _check(value: str, pattern: re.Pattern[str], what: str) -> None:
    """ValueError (a record's field rule) unless `value` matches `pattern`."""
    if not pattern.match(value):
        rule = "a sha256 (64 hex digits)" if pattern is TRANSFER_ID else "1-128 of A-Z a-z 0-9 _ . - (a letter first)"
        raise ValueError(f"{what} = {value[:80]!r} is not {rule}")


def _check_device(device: str) -> None:
    if not DEVICE_ID.match(device):
        raise ValueError(f"device = {device[:80]!r} is not a device id (1-64 of A-Z a-z 0-9 _ . -, a letter first)")


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix: `{prefix}/devices/{device}/{channel}[/{job}]`."""

    prefix: str = "offsite"

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "#+") or self.prefix.startswith("/"):
            raise WireError(f"topic prefix {self.prefix!r} must be non-empty, without '#', '+' or a leading '/'")

    def device(self, device_id: str, channel: str, job_id: str | None = None) -> str:
        tail = f"/{job_id}" if job_id is not None else ""
        return f"{self.prefix}/devices/{device_id}/{channel}{tail}"

    def all_devices(self, channel: str) -> str:
        return f"{self.prefix}/devices/+/{channel}"

    def parse(self, topic: str) -> tuple[str, str, str | None]:
        """(device id, channel, job id or None) of a topic under this prefix."""
        head = f"{self.prefix}/devices/"
        parts = topic[len(head) :].split("/") if topic.startswith(head) else []
        if len(parts) not in (2, 3) or parts[1] not in DEVICE_CHANNELS + COORDINATOR_CHANNELS:
            raise WireError(f"topic {topic[:200]!r} is not a device topic under {self.prefix!r}")
        check_device_id(parts[0])
        return parts[0], parts[1], parts[2] if len(parts) == 3 else None


@dataclass(frozen=True)
class Record:
    """Base of every JSON wire record: `kind` names the type, `schema` the wire version, `signature` its sender.

    Every record is signed by the side that sends it (the coordinator's key, or the device's enrolled key) over
    its canonical JSON without the signature; the receiver checks it against the key of whoever the topic says
    sent it. Chunks are not signed: each belongs to a transfer whose sha256 arrived in a signed record.
    """

    kind: ClassVar[str] = ""
    signature: str = field(default="", kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "schema": WIRE_SCHEMA} | dataclasses.asdict(self)

    def encode(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    def signed_bytes(self) -> bytes:
        body = {key: value for key, value in self.to_dict().items() if key != "signature"}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def signed(self, key: Ed25519PrivateKey) -> Self:
        return dataclasses.replace(self, signature=base64.b64encode(key.sign(self.signed_bytes())).decode())

    def verify(self, key: Ed25519PublicKey, sender: str) -> None:
        """WireError unless `sender`'s `key` signed this record."""
        if not self.signature:
            raise WireError(f"a {self.kind} record is unsigned; only records signed by {sender} are read")
        try:
            key.verify(base64.b64decode(self.signature, validate=True), self.signed_bytes())
        except (InvalidSignature, ValueError):
            raise WireError(f"a {self.kind} record has a bad signature: not from {sender}") from None


@dataclass(frozen=True)
class Status(Record):
    """Retained per device; its Last Will is the same record with state 'offline'."""

    kind: ClassVar[str] = "status"
    device: str
    state: str  # online | busy | offline
    time: float
    job: str | None = None

    def __post_init__(self) -> None:
        _check_device(self.device)
        if self.state not in DEVICE_STATES:
            raise ValueError(f"state = {self.state[:80]!r} is not one of {', '.join(DEVICE_STATES)}")
        if self.job is not None:
            _check(self.job, NAME, "job")


@dataclass(frozen=True)
class Profile(Record):
    """Retained per device: its profile and the datasets its owner configured (names and sizes, never content)."""

    kind: ClassVar[str] = "profile"
    device: str
    profile: dict[str, Any]
    datasets: dict[str, int]
    backends: list[str]
    time: float

    def __post_init__(self) -> None:
        _check_device(self.device)
        for name, size in self.datasets.items():
            _check(name, NAME, "dataset name")
            if size < 0:
                raise ValueError(f"datasets.{name} = {size} is not a count of examples")


@dataclass(frozen=True)
class Offer(Record):
    """A file ready to be pulled in chunks; `transfer` is its sha256, so offering it twice changes nothing."""

    kind: ClassVar[str] = "offer"
    transfer: str
    name: str
    size: int
    chunk_bytes: int
    job: str | None = None
    metrics: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _check(self.transfer, TRANSFER_ID, "transfer")
        _check(self.name, NAME, "name")
        if not 0 <= self.size <= MAX_TRANSFER_BYTES:
            raise ValueError(f"size = {self.size} is outside 0..{MAX_TRANSFER_BYTES} bytes")
        if not 1 <= self.chunk_bytes <= CHUNK_BYTES:
            raise ValueError(f"chunk_bytes = {self.chunk_bytes} is outside 1..{CHUNK_BYTES}")
        if self.job is not None:
            _check(self.job, NAME, "job")

    @property
    def chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_bytes))


@dataclass(frozen=True)
class Job(Record):
    """One device's part of one round, signed by the coordinator; `issued_at` and `nonce` make replays visible."""

    kind: ClassVar[str] = "job"
    job: str
    device: str
    round: int
    dataset: str
    steps: int
    bundle: dict[str, Any]  # an Offer's fields
    start_adapter: dict[str, Any] | None
    issued_at: float
    nonce: str

    def __post_init__(self) -> None:
        _check(self.job, NAME, "job")
        _check_device(self.device)
        _check(self.dataset, NAME, "dataset")
        if self.round < 1 or self.steps < 1:
            raise ValueError(f"round = {self.round} and steps = {self.steps} must be at least 1")


@dataclass(frozen=True)
class Event(Record):
    """Device → coordinator: accepted, rejected, progress, trained, failed."""

    kind: ClassVar[str] = "event"
    device: str
    job: str
    event: str
    time: float
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_device(self.device)
        if self.job:
            _check(self.job, NAME, "job")
        if self.event not in EVENTS:
            raise ValueError(f"event = {self.event[:80]!r} is not one of {', '.join(EVENTS)}")


@dataclass(frozen=True)
class Progress:
    """A progress event's detail: the step reached, of how many, and its loss."""

    step: int
    steps: int
    loss: float


@dataclass(frozen=True)
class Request(Record):
    """Receiver → sender: send these chunks of `transfer` (an empty list asks for an Offer again)."""

    kind: ClassVar[str] = "request"
    transfer: str
    indices: list[int]

    def __post_init__(self) -> None:
        _check(self.transfer, TRANSFER_ID, "transfer")
        if len(self.indices) > MAX_REQUEST_INDICES or len(set(self.indices)) < len(self.indices):
            raise ValueError(f"indices: {len(self.indices)} given; at most {MAX_REQUEST_INDICES}, each once")
        if any(index < 0 for index in self.indices):
            raise ValueError("indices: a chunk index is negative")


@dataclass(frozen=True)
class Done(Record):
    """Receiver → sender: `transfer` arrived whole and its sha256 matched (or did not, with the reason)."""

    kind: ClassVar[str] = "done"
    transfer: str
    ok: bool
    reason: str = ""

    def __post_init__(self) -> None:
        _check(self.transfer, TRANSFER_ID, "transfer")
        if len(self.reason) > MAX_TEXT:
            raise ValueError(f"reason is {len(self.reason):,} characters, over {MAX_TEXT}")


RECORDS: dict[str, type[Record]] = {cls.kind: cls for cls in (Status, Profile, Offer, Job, Event, Request, Done)}


def decode(payload: bytes) -> Record:
    """Parse and validate one JSON record; raise WireError naming what is wrong."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise WireError(f"message of {len(payload):,} bytes is over the {MAX_MESSAGE_BYTES:,}-byte limit")
    try:
        data = json_object(payload, "message")
    except RecordError as error:
        raise WireError(str(error)) from None
    if data.get("schema") != WIRE_SCHEMA:
        raise WireError(f"wire schema {data.get('schema')!r} is not {WIRE_SCHEMA}: update the older side")
    cls = RECORDS.get(data.get("kind"))  # type: ignore[arg-type]
    if cls is None:
        raise WireError(f"unknown record kind {data.get('kind')!r}; known: {', '.join(RECORDS)}")
    try:
        return from_dict(cls, data, cls.kind)
    except RecordError as error:
        raise WireError(str(error)) from None


def pack_frame(magic: bytes, header: dict[str, Any], data: bytes) -> bytes:
    """A binary frame: `magic`, the JSON header's length (4 bytes, big-endian), the header, then `data`."""
    encoded = json.dumps(header, sort_keys=True).encode()
    return magic + struct.pack(">I", len(encoded)) + encoded + data


def unpack_frame(payload: bytes, magic: bytes, what: str) -> tuple[dict[str, Any], bytes]:
    """(header, data) of a `pack_frame` frame; WireError if it is oversize, cut short or not a JSON object."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise WireError(f"{what} of {len(payload):,} bytes is over the {MAX_MESSAGE_BYTES:,}-byte limit")
    start = len(magic) + 4
    if payload[: len(magic)] != magic or len(payload) < start:
        raise WireError(f"{what} is cut short or lacks its magic bytes")
    (length,) = struct.unpack(">I", payload[len(magic) : start])
    try:
        header = json_object(payload[start : start + length], f"{what} header")
    except RecordError as error:
        raise WireError(str(error)) from None
    return header, payload[start + length :]


@dataclass(frozen=True)
class Chunk:
    """One slice of a transfer: `index`, its bytes, and their sha256 (checked on receipt)."""

    transfer: str
    index: int
    data: bytes

    def encode(self) -> bytes:
        digest = hashlib.sha256(self.data).hexdigest()
        header = {"kind": "chunk", "schema": WIRE_SCHEMA, "transfer": self.transfer, "index": self.index,
                  "sha256": digest}  # fmt: skip
        return pack_frame(FRAME_MAGIC, header, self.data)

    @staticmethod
    def is_frame(payload: bytes) -> bool:
        return payload[: len(FRAME_MAGIC)] == FRAME_MAGIC

    @classmethod
    def decode(cls, payload: bytes) -> "Chunk":
        """Parse a frame and check its sha256; raise WireError if it is cut, oversize or corrupted."""
        header, data = unpack_frame(payload, FRAME_MAGIC, "chunk frame")
        if header.get("schema") != WIRE_SCHEMA:
            raise WireError(f"chunk schema {str(header.get('schema'))[:20]!r} is not {WIRE_SCHEMA}")
        if hashlib.sha256(data).hexdigest() != header.get("sha256"):
            raise WireError(f"chunk {header.get('index')} of {str(header.get('transfer'))[:12]} fails its sha256")
        index, transfer = header.get("index"), header.get("transfer")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise WireError(f"chunk header's index {str(index)[:20]!r} is not a chunk index")
        if not isinstance(transfer, str) or not TRANSFER_ID.match(transfer):
            raise WireError(f"chunk header's transfer {str(transfer)[:20]!r} is not a sha256")
        return cls(transfer, index, data)
