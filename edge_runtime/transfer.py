"""Chunked, resumable file transfer: the receiver pulls missing chunks, keeps each one on disk, checks the whole."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from edge_runtime.files import atomic_directory, atomic_path
from edge_runtime.records import RecordError, from_dict
from edge_runtime.wire import CHUNK_BYTES, Chunk, Offer, WireError

log = logging.getLogger(__name__)
# Chunks asked for at once; the next ones are asked for when half have arrived.
WINDOW = 32
# Without a chunk for this long, the receiver asks again for whatever is missing.
STALL_SECONDS = 5.0
# Without a chunk of its own for this long, the receiver looks on disk for chunks another process stored.
SHARED_LOOK_SECONDS = 0.25
OFFER_FILE = "offer.json"  # in the parts folder: what a process that did not ask needs to store a chunk


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pack_directory(directory: Path, out: Path) -> Path:
    """Write `directory`'s files into the tar `out` (sorted, no owners or times: the same folder packs alike)."""

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return info

    with atomic_path(out) as temporary, tarfile.open(temporary, "w") as archive:
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            archive.add(path, arcname=str(path.relative_to(directory)), filter=clean)
    return out


def unpack_archive(archive: Path, directory: Path) -> Path:
    """Extract a received tar into `directory` (whole or not at all); links and paths outside it are refused.

    Only a plain tar is read (as `pack_directory` writes it): a compressed one could unpack to far more than the
    bytes that were transferred and checked against their size cap.
    """
    try:
        with atomic_directory(directory) as staging, tarfile.open(archive, "r:") as tar:
            for member in tar.getmembers():
                name = member.name
                if not (member.isfile() or member.isdir()) or name.startswith("/") or ".." in name.split("/"):
                    raise WireError(f"{archive.name} holds {name[:200]!r}, which is not a plain file inside it")
            tar.extractall(staging, filter="data")
    except (tarfile.TarError, EOFError) as error:
        raise WireError(f"{archive.name} is not a plain tar archive ({error})") from None
    return directory


def offer_for(
    path: Path, name: str, job: str | None = None, metrics: dict | None = None, chunk_bytes: int = CHUNK_BYTES
) -> Offer:
    """The Offer of a file: its sha256 names the transfer."""
    if not 1 <= chunk_bytes <= CHUNK_BYTES:
        raise WireError(f"chunk size {chunk_bytes} must be between 1 and {CHUNK_BYTES} bytes")
    return Offer(sha256_file(path), name, path.stat().st_size, chunk_bytes, job, metrics)


class Outbox:
    """Files this side offers, by transfer id; answers a Request with the chunks asked for."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[Path, Offer]] = {}

    def add(self, path: Path, offer: Offer) -> Offer:
        self.files[offer.transfer] = (path, offer)
        return offer

    def chunks(self, transfer: str, indices: list[int]) -> Iterator[Chunk]:
        """The chunks asked for, read one at a time as they are sent; an unknown transfer or index raises WireError
        before any is read."""
        if transfer not in self.files:
            raise WireError(f"no transfer {transfer[:12]}… is offered here")
        path, offer = self.files[transfer]
        bad = [i for i in indices if not 0 <= i < offer.chunks]
        if bad:
            raise WireError(f"chunks {bad[:5]} are outside 0..{offer.chunks - 1} of {transfer[:12]}…")
        return self._read(path, offer, indices)

    @staticmethod
    def _read(path: Path, offer: Offer, indices: list[int]) -> Iterator[Chunk]:
        with path.open("rb") as handle:
            for index in indices:
                handle.seek(index * offer.chunk_bytes)
                yield Chunk(offer.transfer, index, handle.read(offer.chunk_bytes))


class Download:
    """One incoming transfer, kept on disk chunk by chunk so a restart of either side only fetches what is missing.

    download = Download(offer, Path("state/incoming"), request=lambda ids: ..., finished=lambda path: ...)
    download.start()            # asks for the first window of chunks
    download.receive(chunk)     # idempotent: a chunk delivered twice is stored once
    download.tick()             # asks again after a stall

    Several processes may share `directory` (service workers behind an MQTT shared subscription, which hands each
    chunk to any of them): the one that asked drives the transfer, the others `store_shared_chunk`, and the one
    that asked finds their chunks on disk.
    """

    def __init__(
        self,
        offer: Offer,
        directory: Path,
        request: Callable[[list[int]], None],
        finished: Callable[[Path], None],
    ) -> None:
        self.offer = offer
        self.parts = directory / f".{offer.transfer}.parts"
        self.target = directory / offer.transfer
        self.request = request
        self.finished = finished
        self.outstanding: set[int] = set()
        self.last_progress = time.monotonic()
        self.received_bytes = 0
        self.done = self.target.is_file()
        if not self.done:
            self._make_parts()
        self.last_missing = len(self.missing())  # chunks not on disk when last counted

    def _make_parts(self) -> None:
        self.parts.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.parts / OFFER_FILE) as temporary:
            temporary.write_text(json.dumps(dataclasses.asdict(self.offer)))

    def missing(self) -> list[int]:
        if self.done:
            return []
        have = {int(p.name) for p in self.parts.iterdir() if p.name.isdigit()}
        return [i for i in range(self.offer.chunks) if i not in have]

    def start(self) -> None:
        if self.done:
            self.finished(self.target)
            return
        self.outstanding.clear()
        self._ask()

    def _ask(self) -> None:
        wanted = [i for i in self.missing() if i not in self.outstanding][: WINDOW - len(self.outstanding)]
        if wanted:
            self.outstanding.update(wanted)
            self.request(wanted)
        elif not self.outstanding:
            self._assemble()

    def receive(self, chunk: Chunk) -> None:
        if self.done:
            return
        if not 0 <= chunk.index < self.offer.chunks:
            raise WireError(f"chunk {chunk.index} is outside 0..{self.offer.chunks - 1} of {chunk.transfer[:12]}…")
        path = self.parts / f"{chunk.index:07d}"
        if not path.exists():  # QoS 1 may deliver a chunk twice: keep the first
            with atomic_path(path) as temporary:
                temporary.write_bytes(chunk.data)
            self.received_bytes += len(chunk.data)
            self.last_missing -= 1
        self.outstanding.discard(chunk.index)
        self.last_progress = time.monotonic()
        if len(self.outstanding) <= WINDOW // 2:
            self._ask()

    def tick(self) -> None:
        """After a stall (a lost message, a restarted broker or sender), ask again for what is missing; between,
        take in the chunks another process stored."""
        if self.done:
            return
        quiet = time.monotonic() - self.last_progress
        if quiet > STALL_SECONDS:
            log.info("transfer %s… stalled; asking again for %d chunks", self.offer.transfer[:12], len(self.missing()))
            self.last_progress = time.monotonic()
            self.start()
        elif quiet > SHARED_LOOK_SECONDS:
            missing = set(self.missing())
            if len(missing) < self.last_missing:  # another process stored some since we last counted
                self.last_missing = len(missing)
                self.last_progress = time.monotonic()
                self.outstanding &= missing
                if len(self.outstanding) <= WINDOW // 2:
                    self._ask()

    def _assemble(self) -> None:
        with atomic_path(self.target) as temporary:
            with temporary.open("wb") as out:
                for index in range(self.offer.chunks):
                    out.write((self.parts / f"{index:07d}").read_bytes())
            if temporary.stat().st_size != self.offer.size or sha256_file(temporary) != self.offer.transfer:
                shutil.rmtree(self.parts)  # every chunk passed its own hash, yet the whole did not: start over
                self._make_parts()
                raise WireError(f"transfer {self.offer.transfer[:12]}… does not match its sha256 when whole")
        shutil.rmtree(self.parts, ignore_errors=True)
        self.done = True
        self.finished(self.target)


def store_shared_chunk(directory: Path, chunk: Chunk) -> bool:
    """Keep `chunk` of a transfer another process is receiving into `directory` (its Download asked for it); False
    when no such transfer is under way there. A chunk of a transfer already whole is dropped."""
    parts = directory / f".{chunk.transfer}.parts"
    if (directory / chunk.transfer).is_file():
        return True
    try:
        offer = from_dict(Offer, json.loads((parts / OFFER_FILE).read_text()), "shared transfer's offer")
    except FileNotFoundError:
        return False
    except (RecordError, ValueError) as error:
        raise WireError(f"{parts / OFFER_FILE} is unreadable ({error})") from None
    if not 0 <= chunk.index < offer.chunks:
        raise WireError(f"chunk {chunk.index} is outside 0..{offer.chunks - 1} of {chunk.transfer[:12]}…")
    path = parts / f"{chunk.index:07d}"
    try:
        if not path.exists():
            with atomic_path(path) as temporary:
                temporary.write_bytes(chunk.data)
    except FileNotFoundError:  # assembled and cleaned up meanwhile: this chunk is no longer needed
        pass
    return True
