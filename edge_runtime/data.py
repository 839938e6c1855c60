"""Read a user's dataset (JSONL, CSV or plain text) into examples, with errors that name the file and line."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import DataError

SUPPORTED_SUFFIXES = (".jsonl", ".csv", ".txt")


@dataclass(frozen=True)
class Example:
    """One record: `text`, and `label` for classification (None for language modelling)."""

    text: str
    label: str | None = None


def load_examples(path: str | Path) -> list[Example]:
    """Read examples from a `.jsonl`, `.csv` (columns `text`, optional `label`) or `.txt` file.

    A `.txt` file is language-modelling text: paragraphs separated by blank lines, one example each.
    Either every record has a label (classification) or none has (language modelling).

    Example::

        load_examples("reviews.jsonl")[0]  # Example(text='A gorgeous film.', label='positive')
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"data file {str(path)!r} does not exist; pass the path of a {'/'.join(SUPPORTED_SUFFIXES)} file"
        )
    readers = {".jsonl": _read_jsonl, ".csv": _read_csv, ".txt": _read_text}
    suffix = path.suffix.lower()
    if suffix not in readers:
        raise DataError(f"data file {str(path)!r} has suffix {suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    try:
        examples = readers[suffix](path)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: byte {error.start} is not UTF-8; save the file as UTF-8") from None
    if not examples:
        raise DataError(f"data file {str(path)!r} holds no examples; add at least one record with a `text` field")
    labelled = {example.label is not None for example in examples}
    if len(labelled) > 1:
        first = next(i for i, e in enumerate(examples, 1) if e.label is None)
        raise DataError(
            f"{path}: record {first} has no `label` while others have one; "
            "label every record (classification) or none (language modelling)"
        )
    return examples


def _record(path: Path, line: int, fields: object) -> Example:
    if not isinstance(fields, dict):
        raise DataError(f"{path}:{line}: expected an object with a `text` field, got {type(fields).__name__}")
    text = fields.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{path}:{line}: `text` must be a non-empty string, got {text!r}")
    label = fields.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
        raise DataError(f"{path}:{line}: `label` must be a string or an integer, got {label!r}")
    if isinstance(label, str) and not label.strip():
        raise DataError(f"{path}:{line}: `label` is empty; give every record a label or drop the field")
    return Example(text=text, label=None if label is None else str(label))


def _read_jsonl(path: Path) -> list[Example]:
    examples = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}:{number}: not valid JSON ({error.msg}); write one JSON object per line"
                ) from None
            examples.append(_record(path, number, fields))
    return examples


def _read_csv(path: Path) -> list[Example]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "text" not in reader.fieldnames:
            raise DataError(
                f"{path}:1: the header {reader.fieldnames} has no `text` column; add a header row `text,label`"
            )
        examples = []
        for row in reader:
            if None in row:
                raise DataError(
                    f"{path}:{reader.line_num}: more fields than the header names; quote fields that hold commas"
                )
            fields = {key: value for key, value in row.items() if value not in (None, "") or key == "text"}
            examples.append(_record(path, reader.line_num, fields))
    return examples


def _read_text(path: Path) -> list[Example]:
    paragraphs = path.read_text(encoding="utf-8").split("\n\n")
    return [Example(text=paragraph.strip()) for paragraph in paragraphs if paragraph.strip()]
