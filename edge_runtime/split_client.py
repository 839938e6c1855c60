"""The device's half of a split-learning exchange over MQTT: send a message, wait for the answer, ask again.

A device asks one question at a time (its cut, then its gradient on the logits) and waits for the server's
answer to that exchange. With no answer within `retry_seconds`, or when the connection comes back after a
broker restart, it sends the same frames again; the server answers a repeated question with the same answer,
so asking twice costs bytes, never a wrong step. Only frames the coordinator signed for this job and device are
read. numpy only: no torch on the device.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime.errors import OffsiteError
from edge_runtime.mqtt import BrokerAddress, BrokerUnreachable, Connection
from edge_runtime.split_wire import SERVER_KINDS, Assembler, SplitFrame, SplitMessage
from edge_runtime.wire import Topics, WireError

log = logging.getLogger(__name__)
# What answers each question: the logits a cut; the cut's gradient (or `unknown_cut`) a logits' gradient.
ANSWERS = {"cut": ("logits",), "gradient": ("cut_gradient", "unknown_cut")}


@dataclass(frozen=True)
class SplitLink:
    """Where a device's split job finds its server: the broker, the device (its key is `state`/device.key), the
    job's wire id and the topic prefix. The daemon names it for the training process, which connects itself."""

    address: BrokerAddress
    device: str
    job: str
    state: Path
    topics: Topics = field(default_factory=Topics)


class NoAnswer(OffsiteError):
    """The server did not answer an exchange in time."""


class SplitClient:
    """One device's connection to one split job's server."""

    def __init__(
        self, address: BrokerAddress, device: str, job: str, key: Ed25519PrivateKey, coordinator: Ed25519PublicKey,
        max_bytes: int, topics: Topics | None = None, retry_seconds: float = 5.0, give_up_seconds: float = 600.0,
    ) -> None:  # fmt: skip
        self.device, self.job, self.key, self.coordinator = device, job, key, coordinator
        self.topics = topics or Topics()
        self.retry_seconds, self.give_up_seconds = retry_seconds, give_up_seconds
        self.asked_again = 0
        self.refused = 0
        self._assembler = Assembler(max_bytes)
        self._lock = threading.Lock()
        self._question: tuple[int, tuple[str, ...]] | None = None  # exchange and the kinds that answer it
        self._frames: list[bytes] = []
        self._answer: SplitMessage | None = None
        self._answered = threading.Event()
        answers = [self.topics.device(device, "answers")]
        self.connection = Connection(address, f"edge-{device}:split", answers, self._received,
                                     on_connect=self._ask_again)  # fmt: skip

    def start(self) -> SplitClient:
        """Connect, waiting for a broker that is away (restarting, say) up to `give_up_seconds`."""
        deadline, delay = time.monotonic() + self.give_up_seconds, 1.0
        while True:
            try:
                self.connection.start()
                return self
            except BrokerUnreachable as error:
                if time.monotonic() + delay > deadline:
                    raise NoAnswer(f"{error}; gave up after {self.give_up_seconds:.0f} s") from None
                log.warning("%s; trying again in %.0f s", error, delay)
                time.sleep(delay)
                delay = min(2 * delay, 16.0)

    def close(self) -> None:
        self.connection.close()

    def ask(self, exchange: int, kind: str, arrays: dict[str, np.ndarray]) -> SplitMessage:
        """Send `arrays` as exchange `exchange`'s `kind` message and return the server's answer to it."""
        frames = SplitMessage(self.job, self.device, exchange, kind, arrays).frames(self.key)
        with self._lock:
            self._question, self._frames, self._answer = (exchange, ANSWERS[kind]), frames, None
            self._answered.clear()
        self._send(frames)
        deadline = time.monotonic() + self.give_up_seconds
        while not self._answered.wait(self.retry_seconds):
            if time.monotonic() > deadline:
                raise NoAnswer(
                    f"no answer from the split server for exchange {exchange} ({kind}) of job {self.job!r} in "
                    f"{self.give_up_seconds:.0f} s; is `coordinator` serving the job and the broker reachable?"
                )
            self.asked_again += 1
            self._send(frames)
        with self._lock:
            answer, self._question, self._frames = self._answer, None, []
        assert answer is not None
        return answer

    def _send(self, frames: list[bytes]) -> None:
        for frame in frames:
            self.connection.publish(self.topics.device(self.device, "split"), frame)

    def _ask_again(self) -> None:
        """On (re)connect: the question in flight may have been lost with the broker."""
        with self._lock:
            frames = list(self._frames)
        if frames:
            self._send(frames)

    def _received(self, topic: str, payload: bytes) -> None:
        if topic != self.topics.device(self.device, "answers"):  # amqtt delivers some messages of other topics
            log.debug("ignoring %s: not this device's answers", topic[:200])
            return
        try:
            frame = SplitFrame.decode(payload, SERVER_KINDS)
            if frame.device != self.device:
                raise WireError(f"a split answer for {frame.device} reached {self.device}")
            if frame.job != self.job:  # a late answer of an earlier job (a round before)
                log.debug("ignoring a split answer of %s: this client asks %s", frame.job, self.job)
                return
            frame.verify(self.coordinator, "the coordinator")
            message = self._assembler.add(frame)
        except WireError as error:
            self.refused += 1
            log.warning("refused a split answer: %s", error)
            return
        with self._lock:
            question = self._question
            if (
                message is not None
                and question is not None
                and (message.exchange, message.kind) in {(question[0], kind) for kind in question[1]}
            ):
                self._answer = message
                self._answered.set()
