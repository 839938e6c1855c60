"""Device-side encoding: the bundle's tokenizer turns examples into padded batches, as the coordinator does."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from edge_runtime.data import Example
from edge_runtime.errors import DataError
from edge_runtime.manifest import CLASSIFICATION, TaskRecord
from edge_runtime.privacy import poisson_draw, secret_rng

IGNORE_INDEX = -100
# A language-model text is tokenized this many characters at a time (cut before a whitespace, where the
# pre-tokenizer splits anyway, so the ids are the whole text's): a 50 MB line no longer costs gigabytes at once.
PIECE_CHARACTERS = 1 << 16


def pieces(text: str, size: int = PIECE_CHARACTERS) -> Iterator[str]:
    """`text` in consecutive parts of at most `size` characters, each (but the first) starting at a whitespace
    where there is one in reach."""
    start = 0
    while len(text) - start > size:
        cut = max(text.rfind(" ", start + 1, start + size), text.rfind("\n", start + 1, start + size))
        end = cut if cut > start else start + size
        yield text[start:end]
        start = end
    yield text[start:]


@dataclass(frozen=True)
class Batch:
    """Right-padded int64 ids and mask [B, T], and labels: [B] label-word token ids, or [B*(T-1)] next ids."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def split(self, micro_batch: int) -> list[Batch]:
        """Micro-batches of at most `micro_batch` rows (labels split with their rows)."""
        rows = self.input_ids.shape[0]
        per_row = self.labels.shape[0] // rows
        return [
            Batch(
                self.input_ids[start : start + micro_batch],
                self.attention_mask[start : start + micro_batch],
                self.labels[start * per_row : (start + micro_batch) * per_row],
            )
            for start in range(0, rows, micro_batch)
        ]


def _pad(rows: Sequence[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


class TaskEncoder:
    """Encodes examples for the bundle's task (the manifest's `task` record) with the bundle's tokenizer."""

    def __init__(self, tokenizer_file: Path, task: TaskRecord) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.task = task
        self.kind = task.kind
        self.max_length = task.max_length
        self.pad_id = task.pad_token_id
        # No token spans more characters than its vocabulary entry has (bytes, for byte-level BPE), so a text's last
        # (max_length + 1) * longest characters hold its last max_length tokens, encoded as the whole text's are.
        longest = max(len(piece) for piece in self.tokenizer.get_vocab())
        self.kept_characters = (self.max_length + 1) * longest

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def rows(self, examples: Sequence[Example]) -> list[tuple[list[int], int]]:
        """(token ids, target) per example (classification) or per packed block (language model)."""
        if self.kind == CLASSIFICATION:
            label_ids = self.task.label_token_ids or {}
            unknown = sorted({str(e.label) for e in examples if e.label not in label_ids})
            if unknown:
                raise DataError(f"labels {unknown} are not among the bundle's labels {sorted(label_ids)}")
            template = self.task.template or "{text}"
            keep = self.kept_characters  # cut first: a huge line must not be tokenized whole
            rows = [self._ids(template.format(text=e.text[-keep:]))[-self.max_length :] for e in examples]
            return [(ids, label_ids[e.label]) for ids, e in zip(rows, examples, strict=True)]
        parts = []
        for example in examples:
            parts += [np.asarray(self._ids(part), dtype=np.int32) for part in pieces(example.text)]
            parts.append(np.array([self.task.eos_token_id], dtype=np.int32))
        stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)  # 4 bytes a token, not 36
        blocks = [stream[i : i + self.max_length] for i in range(0, len(stream), self.max_length)]
        return [(block, 0) for block in blocks if len(block) > 1]  # type: ignore[misc]  (int32 views of the stream)

    def collate(self, rows: Sequence[tuple[list[int], int]]) -> Batch:
        ids, mask = _pad([row for row, _ in rows], self.pad_id)
        if self.kind == CLASSIFICATION:
            return Batch(ids, mask, np.array([target for _, target in rows], dtype=np.int64))
        labels = np.where(mask[:, 1:] == 1, ids[:, 1:], IGNORE_INDEX).reshape(-1)
        return Batch(ids, mask, labels.astype(np.int64))


def poisson_batches(encoder: TaskEncoder, rows: list[tuple[list[int], int]], rate: float) -> Iterator[Batch]:
    """Endless DP-SGD batches: each row in each batch with probability `rate`, independently (Poisson sampling, as
    the accountant assumes), drawn from the OS's randomness; a batch may be empty (zero rows)."""
    if not rows:
        raise DataError("the training data holds no usable example")
    generator = secret_rng()
    while True:
        chosen = poisson_draw(generator, len(rows), rate)
        if len(chosen):
            yield encoder.collate([rows[i] for i in chosen])
        else:
            empty = np.zeros((0, 1), dtype=np.int64)
            yield Batch(empty, empty, np.zeros(0, dtype=np.int64))


def training_batches(
    encoder: TaskEncoder, rows: list[tuple[list[int], int]], batch_size: int, seed: int
) -> Iterator[Batch]:
    """Endless batches: each epoch shuffled by `seed + epoch`; the same seed gives the same stream (for resume)."""
    if not rows:
        raise DataError("the training data holds no usable example")
    epoch = 0
    while True:
        order = list(range(len(rows)))
        random.Random(seed + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            yield encoder.collate([rows[i] for i in order[start : start + batch_size]])
        epoch += 1
