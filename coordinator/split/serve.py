"""The server's half of split learning over MQTT: enrolled devices' cuts in, label logits and cut gradients out.

The server keeps, per device, only its last cut and its last answer, never a graph: a gradient request runs the
layers after the cut again with autograd (a third more server compute than keeping the graph, and no
activations held between messages, however many devices train). A request that arrives again (the device heard
nothing and asked again, say across a broker restart) gets the same answer again; a gradient for a cut the
server does not hold (it restarted) gets `unknown_cut`, and the device sends the cut again. Every frame is
checked before anything is computed: its signature against the device's enrolled key, its job, its arrays'
shapes against the job's limits, finite values; a bad one is refused and counted, and the server goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from coordinator.split.sides import Cut, ServerSide
from edge_runtime.mqtt import BrokerAddress, Connection
from edge_runtime.split_wire import (
    DEVICE_KINDS,
    Assembler,
    SplitFrame,
    SplitMessage,
    carries,
    checked_array,
    cut_body_bytes,
)
from edge_runtime.wire import Topics, WireError

log = logging.getLogger(__name__)
QUEUED_FRAMES = 256  # frames waiting for the worker (each at most a chunk); more are dropped and counted


@dataclass(frozen=True)
class CutLimits:
    """The largest exchange a job accepts: its batch, positions (prompt tokens plus the longest input), the
    model's width, the label count."""

    batch_size: int
    positions: int
    hidden: int
    labels: int

    def max_bytes(self) -> int:
        """A cut's body at its largest: float32 hidden states and a byte of mask per position."""
        return cut_body_bytes(self.batch_size, self.positions, self.hidden)


@dataclass
class SplitServer:
    """Answers one job's split frames: frames in, frames out (`handle`), refusing and counting what is bad."""

    server: ServerSide
    label_token_ids: torch.Tensor
    job: str
    key: Ed25519PrivateKey
    device_keys: Mapping[str, Ed25519PublicKey]
    limits: CutLimits
    topics: Topics = field(default_factory=Topics)
    answered: int = 0
    refused: int = 0
    _assemblers: dict[str, Assembler] = field(default_factory=dict)
    _cuts: dict[str, tuple[int, Cut]] = field(default_factory=dict)
    _answers: dict[str, tuple[tuple[int, str, str], list[bytes]]] = field(default_factory=dict)

    def handle(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """The frames to publish for one received frame (none until a message is whole); total: a bad frame is
        refused, counted and logged."""
        try:
            device, channel, _ = self.topics.parse(topic)
            if channel != "split":  # amqtt delivers some retained messages of other channels to a wildcard
                log.debug("ignoring %s: not a split topic", topic[:200])
                return []
            frame = SplitFrame.decode(payload, DEVICE_KINDS)
            if frame.device != device:
                raise WireError(f"a split frame for {frame.device} arrived on {topic[:200]!r}")
            if frame.job != self.job:  # another split job's server answers it
                log.debug("ignoring a split frame of %s: this server answers %s", frame.job, self.job)
                return []
            key = self.device_keys.get(device)
            if key is None:
                raise WireError(f"device {device!r} is not enrolled in split job {self.job!r}")
            frame.verify(key, device)
            message = self._assemblers.setdefault(device, Assembler(self.limits.max_bytes())).add(frame)
            if message is None:
                return []
            answered = self._answers.get(device)
            if answered is None or answered[0] != frame.key:
                answered = frame.key, self._answer(message).frames(self.key)
                self._answers[device] = answered
            self.answered += 1
            return [(self.topics.device(device, "answers"), answer) for answer in answered[1]]
        except WireError as error:
            self.refused += 1
            log.warning("refused a split frame on %s: %s", topic[:200], error)
            return []

    def _answer(self, message: SplitMessage) -> SplitMessage:
        if message.kind == "cut":
            return self._logits(message)
        held = self._cuts.get(message.device)
        if held is None or held[0] != message.exchange:
            return SplitMessage(self.job, message.device, message.exchange, "unknown_cut", {})
        return self._cut_gradient(message, held[1])

    def _logits(self, message: SplitMessage) -> SplitMessage:
        carries(message, {"hidden", "mask"})
        hidden = checked_array(message, "hidden", "float32", (None, None, self.limits.hidden))
        mask = checked_array(message, "mask", "uint8", hidden.shape[:2])
        batch, positions = mask.shape
        if batch > self.limits.batch_size or positions > self.limits.positions:
            raise WireError(f"a cut of {batch} rows and {positions} positions is over the job's "
                            f"{self.limits.batch_size} and {self.limits.positions}")  # fmt: skip
        if mask.max() > 1 or mask.sum(axis=1).min() < 1:
            raise WireError("a cut's mask must be 0 or 1, with at least one position per row")
        cut = Cut(torch.from_numpy(hidden), torch.from_numpy(mask).long())
        self._cuts[message.device] = message.exchange, cut
        with torch.no_grad():
            logits = self.server.last_token_logits(cut)[:, self.label_token_ids]
        return SplitMessage(self.job, message.device, message.exchange, "logits", {"logits": logits.numpy()})

    def _cut_gradient(self, message: SplitMessage, cut: Cut) -> SplitMessage:
        carries(message, {"logits_gradient"})
        shape = (cut.hidden.shape[0], self.limits.labels)
        gradient = torch.from_numpy(checked_array(message, "logits_gradient", "float32", shape))
        hidden = cut.hidden.clone().requires_grad_(True)
        self.server.last_token_logits(Cut(hidden, cut.attention_mask))[:, self.label_token_ids].backward(gradient)
        arrays = {"gradient": hidden.grad.numpy()}
        return SplitMessage(self.job, message.device, message.exchange, "cut_gradient", arrays)


class SplitService:
    """A SplitServer on a broker connection: paho's thread queues frames, a worker answers them in order."""

    def __init__(self, server: SplitServer, address: BrokerAddress, client_id: str = "coordinator-split") -> None:
        self.server = server
        self.dropped = 0
        self._frames: queue.Queue[tuple[str, bytes] | None] = queue.Queue(QUEUED_FRAMES)
        subscriptions = [server.topics.all_devices("split")]
        self.connection = Connection(address, client_id, subscriptions, self._received)
        self._worker = threading.Thread(target=self._work, name="split-server", daemon=True)

    def start(self) -> SplitService:
        self.connection.start()
        self._worker.start()
        return self

    def _received(self, topic: str, payload: bytes) -> None:
        try:
            self._frames.put_nowait((topic, payload))
        except queue.Full:  # the device asks again when no answer comes
            self.dropped += 1

    def _work(self) -> None:
        while (item := self._frames.get()) is not None:
            try:
                answers = self.server.handle(*item)
            except Exception:  # a frame that passed every check yet fails to compute: refused, not fatal
                self.server.refused += 1
                log.exception("a split frame on %s failed to compute; refused", item[0][:200])
                continue
            for topic, payload in answers:
                self.connection.publish(topic, payload)

    def close(self) -> None:
        self._frames.put(None)
        self._worker.join(timeout=30)
        self.connection.close()
