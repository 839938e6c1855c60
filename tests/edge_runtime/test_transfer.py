"""Chunked transfer without a broker: idempotent under duplicates, resumable after a restart, checked whole."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from edge_runtime import transfer
from edge_runtime.transfer import (
    Download,
    Outbox,
    offer_for,
    pack_directory,
    store_shared_chunk,
    unpack_archive,
)
from edge_runtime.wire import Chunk, Offer, WireError


def _source(tmp_path: Path, size: int = 10_000) -> Path:
    path = tmp_path / "adapter.bin"
    path.write_bytes(os.urandom(size))
    return path


def _pull(download: Download, outbox: Outbox, asked: list[list[int]], duplicate: bool = False) -> None:
    """Answer every request (twice each when `duplicate`) until nothing more is asked."""
    while asked:
        for chunk in outbox.chunks(download.offer.transfer, asked.pop(0)):
            download.receive(Chunk.decode(chunk.encode()))
            if duplicate:
                download.receive(Chunk.decode(chunk.encode()))


def test_duplicates_are_stored_once_and_the_file_arrives_whole(tmp_path: Path) -> None:
    source = _source(tmp_path)
    outbox = Outbox()
    offer = outbox.add(source, offer_for(source, "adapter", chunk_bytes=1000))
    asked: list[list[int]] = []
    finished: list[Path] = []
    download = Download(offer, tmp_path / "in", asked.append, finished.append)
    download.start()
    _pull(download, outbox, asked, duplicate=True)
    assert finished == [tmp_path / "in" / offer.transfer]
    assert finished[0].read_bytes() == source.read_bytes()
    assert download.received_bytes == source.stat().st_size


def test_a_restarted_receiver_asks_only_for_the_missing_chunks(tmp_path: Path) -> None:
    source = _source(tmp_path)
    outbox = Outbox()
    offer = outbox.add(source, offer_for(source, "adapter", chunk_bytes=1000))
    first = Download(offer, tmp_path / "in", lambda ids: None, lambda path: None)
    for chunk in outbox.chunks(offer.transfer, [0, 2, 4, 6]):
        first.receive(chunk)
    asked: list[list[int]] = []
    finished: list[Path] = []
    again = Download(offer, tmp_path / "in", asked.append, finished.append)  # as after a crash
    again.start()
    assert asked == [[1, 3, 5, 7, 8, 9]]
    _pull(again, outbox, asked)
    assert finished[0].read_bytes() == source.read_bytes()


def test_chunks_another_process_stores_complete_the_download_that_asked(tmp_path: Path, monkeypatch) -> None:
    """Two service workers behind a shared subscription: the broker hands some chunks to the one that did not ask;
    it keeps them in the shared folder, where the one that asked finds them and goes on."""
    monkeypatch.setattr(transfer, "SHARED_LOOK_SECONDS", 0.0)
    source = _source(tmp_path, size=50_000)
    outbox = Outbox()
    offer = outbox.add(source, offer_for(source, "adapter", chunk_bytes=1000))  # 50 chunks, asked 32 at a time
    stray = Chunk.decode(next(outbox.chunks(offer.transfer, [0])).encode())
    assert not store_shared_chunk(tmp_path / "in", stray)  # nobody is receiving it yet: not kept
    asked: list[list[int]] = []
    finished: list[Path] = []
    download = Download(offer, tmp_path / "in", asked.append, finished.append)
    download.start()
    assert asked == [list(range(32))]
    for chunk in outbox.chunks(offer.transfer, asked.pop()):  # every chunk of the window goes to the other worker
        assert store_shared_chunk(tmp_path / "in", Chunk.decode(chunk.encode()))
    download.tick()  # the one that asked sees them on disk and asks for the rest at once, not after a stall
    assert asked == [list(range(32, 50))]
    for chunk in outbox.chunks(offer.transfer, asked.pop()):
        store_shared_chunk(tmp_path / "in", Chunk.decode(chunk.encode()))
    download.tick()
    assert finished == [tmp_path / "in" / offer.transfer] and finished[0].read_bytes() == source.read_bytes()
    assert store_shared_chunk(tmp_path / "in", stray)  # a late duplicate of a whole transfer: dropped quietly
    beyond = Chunk(offer.transfer, 50, b"x")
    second = Download(outbox.add(source, offer), tmp_path / "other", lambda ids: None, lambda path: None)
    assert second.offer == offer
    with pytest.raises(WireError, match=r"outside 0\.\.49"):
        store_shared_chunk(tmp_path / "other", beyond)


def test_a_whole_that_fails_its_sha256_is_refused_and_fetched_again(tmp_path: Path) -> None:
    source = _source(tmp_path, 3000)
    outbox = Outbox()
    honest = offer_for(source, "adapter", chunk_bytes=1000)
    lying = Offer(hashlib.sha256(b"something else").hexdigest(), "adapter", 3000, 1000)
    outbox.files[lying.transfer] = (source, lying)
    download = Download(lying, tmp_path / "in", lambda ids: None, lambda path: None)
    with pytest.raises(WireError, match="does not match its sha256 when whole"):
        for chunk in outbox.chunks(lying.transfer, [0, 1, 2]):
            download.receive(chunk)
    assert not download.done and download.missing() == [0, 1, 2]
    assert honest.transfer == hashlib.sha256(source.read_bytes()).hexdigest()


def test_unknown_transfers_and_indices_are_refused(tmp_path: Path) -> None:
    source = _source(tmp_path, 3000)
    outbox = Outbox()
    offer = outbox.add(source, offer_for(source, "adapter", chunk_bytes=1000))
    with pytest.raises(WireError, match=r"outside 0\.\.2"):
        outbox.chunks(offer.transfer, [3])
    with pytest.raises(WireError, match="no transfer"):
        outbox.chunks("0" * 64, [0])


def test_pack_is_deterministic_and_unpack_refuses_paths_outside(tmp_path: Path) -> None:
    folder = tmp_path / "result"
    (folder / "sub").mkdir(parents=True)
    (folder / "metrics.json").write_text("{}")
    (folder / "sub" / "adapter.safetensors").write_bytes(b"weights")
    first, second = pack_directory(folder, tmp_path / "a.tar"), pack_directory(folder, tmp_path / "b.tar")
    assert first.read_bytes() == second.read_bytes()
    assert (unpack_archive(first, tmp_path / "out") / "sub" / "adapter.safetensors").read_bytes() == b"weights"

    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as archive:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(WireError, match="not a plain file inside"):
        unpack_archive(evil, tmp_path / "evil-out")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "evil-out").exists()
