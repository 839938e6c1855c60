"""Split frames: a message crosses in signed parts and comes back whole; anything altered is refused."""

from __future__ import annotations

import random

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.split_wire import DEVICE_KINDS, SERVER_KINDS, Assembler, SplitFrame, SplitMessage
from edge_runtime.wire import CHUNK_BYTES, WireError

KEY = Ed25519PrivateKey.generate()


def cut_message(rows: int = 3, positions: int = 40, hidden: int = 700, exchange: int = 1) -> SplitMessage:
    generator = np.random.default_rng(exchange)
    arrays = {
        "hidden": generator.standard_normal((rows, positions, hidden), dtype=np.float32),
        "mask": np.ones((rows, positions), np.uint8),
    }
    return SplitMessage("job-1", "a", exchange, "cut", arrays)


def receive(frames: list[bytes], max_bytes: int = 10**8) -> SplitMessage | None:
    assembler, message = Assembler(max_bytes), None
    for payload in frames:
        frame = SplitFrame.decode(payload, DEVICE_KINDS)
        frame.verify(KEY.public_key(), "device a")
        message = assembler.add(frame)
    return message


def test_a_message_larger_than_a_chunk_crosses_in_parts_and_arrives_whole():
    sent = cut_message()
    frames = sent.frames(KEY)
    assert len(frames) == -(-(3 * 40 * 700 * 4 + 3 * 40) // CHUNK_BYTES) == 2
    got = receive(frames)
    assert (got.job, got.device, got.exchange, got.kind) == ("job-1", "a", 1, "cut")
    for name in sent.arrays:
        np.testing.assert_array_equal(got.arrays[name], sent.arrays[name])
    assert receive(list(reversed(frames))) is not None  # order does not matter
    empty = SplitMessage("job-1", "a", 1, "unknown_cut", {}).frames(KEY)
    assert Assembler(10).add(SplitFrame.decode(empty[0], SERVER_KINDS)).arrays == {}


def test_altered_unsigned_or_oversize_frames_are_refused():
    frames = cut_message().frames(KEY)
    with pytest.raises(WireError, match="fails its sha256"):
        SplitFrame.decode(frames[0][:-1] + bytes([frames[0][-1] ^ 1]), DEVICE_KINDS)
    with pytest.raises(WireError, match="bad signature"):
        receive([frames[0].replace(b'"exchange": 1', b'"exchange": 2')])
    with pytest.raises(WireError, match="bad signature"):
        SplitFrame.decode(frames[0], DEVICE_KINDS).verify(Ed25519PrivateKey.generate().public_key(), "device a")
    with pytest.raises(WireError, match="is not one of cut, gradient"):
        SplitFrame.decode(SplitMessage("job-1", "a", 1, "logits", {}).frames(KEY)[0], DEVICE_KINDS)
    with pytest.raises(WireError, match="over this job's"):
        receive(frames, max_bytes=1000)
    with pytest.raises(WireError, match="over the"):
        SplitFrame.decode(frames[0] + bytes(CHUNK_BYTES), DEVICE_KINDS)
    with pytest.raises(WireError, match="magic"):
        SplitFrame.decode(b"OEC1" + frames[0][4:], DEVICE_KINDS)


def test_two_messages_may_cross_and_a_third_drops_the_oldest():
    assembler = Assembler(10**8)
    one, two, three = (cut_message(exchange=n).frames(KEY) for n in (1, 2, 3))
    assert assembler.add(SplitFrame.decode(one[0], DEVICE_KINDS)) is None
    assert assembler.add(SplitFrame.decode(two[0], DEVICE_KINDS)) is None
    assert assembler.add(SplitFrame.decode(one[1], DEVICE_KINDS)).exchange == 1
    assert assembler.add(SplitFrame.decode(three[0], DEVICE_KINDS)) is None  # building: 2 and 3
    assert assembler.add(SplitFrame.decode(one[0], DEVICE_KINDS)) is None  # 1 again drops 2, the oldest
    assert assembler.add(SplitFrame.decode(two[1], DEVICE_KINDS)) is None  # 2's first part is gone; drops 3
    assert assembler.add(SplitFrame.decode(one[1], DEVICE_KINDS)).exchange == 1
    assert assembler.add(SplitFrame.decode(three[1], DEVICE_KINDS)) is None  # 3's first part is gone


def test_any_damaged_frame_is_refused_as_a_wire_error_and_nothing_else():
    frame = cut_message(rows=1, positions=4, hidden=8).frames(KEY)[0]
    rng = random.Random(0)
    for _ in range(500):
        damaged = bytearray(frame)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        damaged = damaged[: rng.randrange(len(damaged) + 1)] if rng.random() < 0.3 else damaged
        try:
            receive([bytes(damaged)])
        except WireError:
            continue
        assert bytes(damaged) == frame  # only the untouched frame passes
