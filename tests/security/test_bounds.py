"""Bounded work per input: a huge data line is cut before it is tokenized; a received archive that is not a plain
tar (or is compressed) is refused with a reason, not an exception from deep inside tarfile."""

from __future__ import annotations

import gzip
import tarfile

import pytest

from edge_runtime.data import Example
from edge_runtime.manifest import CLASSIFICATION, LANGUAGE_MODEL, TaskRecord
from edge_runtime.text import PIECE_CHARACTERS, TaskEncoder, pieces
from edge_runtime.transfer import pack_directory, unpack_archive
from edge_runtime.wire import WireError
from tests.conftest import make_tokenizer


def test_a_huge_line_is_cut_before_tokenizing_and_encodes_as_the_whole_would(tmp_path, monkeypatch):
    make_tokenizer().save_pretrained(tmp_path / "tokenizer")
    task = TaskRecord(CLASSIFICATION, 16, 0, template="Review: {text} Sentiment:", label_token_ids={"pos": 5})
    encoder = TaskEncoder(tmp_path / "tokenizer" / "tokenizer.json", task)
    line = " ".join(["good", "film", "bad", "plot"] * 250_000)  # 4.5 MB on one line
    whole = encoder.tokenizer.encode(f"Review: {line} Sentiment:", add_special_tokens=False).ids[-16:]
    seen: list[int] = []
    encode = encoder._ids
    monkeypatch.setattr(encoder, "_ids", lambda text: seen.append(len(text)) or encode(text))
    [(ids, target)] = encoder.rows([Example(line, "pos")])
    assert ids == whole and target == 5
    assert max(seen) <= encoder.kept_characters + len("Review:  Sentiment:")  # not 4.5 MB of text


def test_a_huge_language_model_line_is_tokenized_in_pieces_into_the_same_blocks(tmp_path, monkeypatch):
    make_tokenizer().save_pretrained(tmp_path / "tokenizer")
    encoder = TaskEncoder(tmp_path / "tokenizer" / "tokenizer.json", TaskRecord(LANGUAGE_MODEL, 32, 0, eos_token_id=2))
    line = " ".join(["good", "film", "bad", "plot", "again\n"] * 60_000)  # 1.8 MB on one line
    whole = [*encoder.tokenizer.encode(line, add_special_tokens=False).ids, 2]
    seen: list[int] = []
    encode = encoder._ids
    monkeypatch.setattr(encoder, "_ids", lambda text: seen.append(len(text)) or encode(text))
    rows = encoder.rows([Example(line, None)])
    blocks = [whole[i : i + 32] for i in range(0, len(whole), 32)]
    assert [list(ids) for ids, _ in rows] == [b for b in blocks if len(b) > 1]  # the pieces' ids: the whole text's
    assert max(seen) <= PIECE_CHARACTERS and len(seen) > 20
    assert "".join(pieces("a" * 100, 30)) == "a" * 100  # no whitespace in reach: cut anyway, nothing lost


def test_an_archive_that_is_not_a_plain_tar_is_refused_with_its_reason(tmp_path):
    (tmp_path / "result").mkdir()
    (tmp_path / "result" / "metrics.json").write_text("{}")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(WireError, match="is not a plain tar archive"):
        unpack_archive(tmp_path / "junk.tar", tmp_path / "out")
    packed = pack_directory(tmp_path / "result", tmp_path / "result.tar")
    (tmp_path / "result.tar.gz").write_bytes(gzip.compress(packed.read_bytes()))  # could unpack to far more
    with pytest.raises(WireError, match="is not a plain tar archive"):
        unpack_archive(tmp_path / "result.tar.gz", tmp_path / "out")
    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as archive:
        info = tarfile.TarInfo("metrics.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(info)
    with pytest.raises(WireError, match="not a plain file"):
        unpack_archive(link, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert (unpack_archive(packed, tmp_path / "out") / "metrics.json").read_text() == "{}"
