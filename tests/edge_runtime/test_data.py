"""User data files: the formats read, and errors that name the file and the line."""

import pytest

from edge_runtime.data import Example, load_examples
from edge_runtime.errors import DataError


def test_jsonl_csv_and_text_are_read(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "good film", "label": "positive"}\n\n{"text": "bad", "label": 0}\n')
    (tmp_path / "b.csv").write_text('text,label\n"great, really",positive\nawful,negative\n')
    (tmp_path / "c.txt").write_text("First paragraph\nstill first.\n\n\nSecond one.\n")
    assert load_examples(tmp_path / "a.jsonl") == [Example("good film", "positive"), Example("bad", "0")]
    assert load_examples(tmp_path / "b.csv") == [Example("great, really", "positive"), Example("awful", "negative")]
    assert load_examples(tmp_path / "c.txt") == [Example("First paragraph\nstill first."), Example("Second one.")]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": \n', "bad.jsonl:2: not valid JSON"),
        ("bad.jsonl", '{"text": "ok"}\n["a list"]\n', "bad.jsonl:2: expected an object"),
        ("bad.jsonl", '{"text": ""}\n', "bad.jsonl:1: `text` must be a non-empty string"),
        ("bad.jsonl", '{"text": "a", "label": true}\n', "bad.jsonl:1: `label` must be a string or an integer"),
        ("bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n', "record 2 has no `label`"),
        ("bad.csv", "body,label\nx,y\n", "has no `text` column"),
        ("bad.csv", "text,label\nx,y,z\n", "bad.csv:2: more fields than the header"),
        ("bad.parquet", "x", "use one of .jsonl, .csv, .txt"),
        ("empty.jsonl", "\n\n", "holds no examples"),
    ],
)
def test_malformed_files_are_refused_with_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_examples(tmp_path / name)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_examples(tmp_path / "latin.txt")
