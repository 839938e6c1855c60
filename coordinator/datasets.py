"""Prepare the real public datasets from their PyPI packages: movie and product review sentiment, Wikipedia, news."""

from __future__ import annotations

import bz2
import io
import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ElementTree
import zipfile
from dataclasses import dataclass
from pathlib import Path

from coordinator.errors import DataError
from coordinator.models import cache_root
from edge_runtime.data import Example
from edge_runtime.files import write_text_atomic

SPLIT_SEED = 20141  # fixed: every machine gets the same train/test split
MIN_ABS_SENTIMENT = 0.5


@dataclass(frozen=True)
class PackageFile:
    """A file inside a distribution downloaded from PyPI (`pip download`), used as raw data."""

    requirement: str
    binary: bool
    member: str


REVIEWS = PackageFile(
    "vaderSentiment==3.3.2", binary=False, member="vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
)
# Inside REVIEWS' archive: human-rated review snippets of two domains, one file per prepared dataset.
REVIEW_FILES = {
    "sentiment": "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",  # Rotten Tomatoes
    "products": "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",  # Amazon product reviews
}
WIKIPEDIA = PackageFile(
    "gensim==4.4.0",
    binary=True,
    member="gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
)
NEWS = PackageFile("gensim==4.4.0", binary=True, member="gensim/test/test_data/lee_background.cor")
DATASETS = ("sentiment", "products", "wikipedia", "news")


def data_root() -> Path:
    """Where prepared datasets live: <cache>/data/<name>/{train,test}.jsonl."""
    return cache_root() / "data"


def dataset_path(name: str, split: str) -> Path:
    """Path of a prepared split, e.g. dataset_path('sentiment', 'test')."""
    return data_root() / name / f"{split}.jsonl"


def parse_review_snippets(text: str) -> list[Example]:
    """Rated review snippets (`id<TAB>mean score -4..4<TAB>sentence`) → positive/negative examples.

    Snippets with |score| <= 0.5 are dropped as neutral.
    """
    examples = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise DataError(f"review snippets line {number}: expected 3 tab-separated fields, got {len(fields)}")
        score, sentence = float(fields[1]), fields[2].strip()
        if abs(score) > MIN_ABS_SENTIMENT and sentence:
            examples.append(Example(text=sentence, label="positive" if score > 0 else "negative"))
    return examples


_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|.*?\|\}", re.DOTALL)
_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_TAG = re.compile(r"<[^>]+>")
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.IGNORECASE)
_LINK = re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]")
_EXTERNAL = re.compile(r"\[https?://\S+ ?([^\]]*)\]")
_QUOTES = re.compile(r"'{2,}")


def clean_wiki_markup(markup: str) -> list[str]:
    """Plain-text paragraphs of a MediaWiki article: templates, tables, refs, files and headings removed."""
    text = _COMMENT.sub("", markup)
    text = _REF.sub("", text)
    for _ in range(5):  # templates nest
        text, count = _TEMPLATE.subn("", text)
        if not count:
            break
    text = _TABLE.sub("", text)
    text = _FILE_LINK.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _QUOTES.sub("", _TAG.sub("", text))
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.splitlines()]
        lines = [line for line in lines if line and not line.startswith(("=", "*", "#", ":", ";", "|", "!", "{", "}"))]
        paragraph = " ".join(lines)
        if len(paragraph.split()) >= 20:
            paragraphs.append(paragraph)
    return paragraphs


def parse_wikipedia(xml_bytes: bytes) -> list[list[str]]:
    """Articles (main namespace, not redirects) of a MediaWiki XML dump, each a list of paragraphs."""
    articles = []
    for _, element in ElementTree.iterparse(io.BytesIO(xml_bytes)):
        if not element.tag.endswith("}page"):
            continue
        namespace = element.findtext("{*}ns")
        text = element.findtext("{*}revision/{*}text") or ""
        if namespace == "0" and element.find("{*}redirect") is None and not text.lower().startswith("#redirect"):
            paragraphs = clean_wiki_markup(text)
            if paragraphs:
                articles.append(paragraphs)
        element.clear()
    return articles


def split_train_test(items: list, test_fraction: float) -> tuple[list, list]:
    """Shuffle with the fixed SPLIT_SEED and cut off the test share."""
    shuffled = list(items)
    random.Random(SPLIT_SEED).shuffle(shuffled)
    cut = max(1, round(len(shuffled) * test_fraction))
    return shuffled[cut:], shuffled[:cut]


def write_jsonl(path: Path, examples: list[Example]) -> None:
    """Write examples as JSONL (`text`, and `label` when set), atomically."""
    rows = [{"text": e.text} | ({"label": e.label} if e.label is not None else {}) for e in examples]
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _download(source: PackageFile, folder: Path) -> Path:
    kind = ["--only-binary", ":all:"] if source.binary else ["--no-binary", ":all:"]
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        *kind,
        "-d",
        str(folder),
        source.requirement,
    ]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise DataError(
            f"`pip download {source.requirement}` failed (exit {finished.returncode}): "
            f"{finished.stderr.strip()[-400:]}; check that PyPI is reachable (or PIP_INDEX_URL points at a mirror)"
        )
    name = source.requirement.split("==")[0].lower().replace("-", "_")
    found = [path for path in folder.iterdir() if path.name.lower().replace("-", "_").startswith(name)]
    if not found:
        raise DataError(f"`pip download {source.requirement}` wrote no file into {folder}")
    return found[0]


def _read_member(archive: Path, member: str) -> bytes:
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as bundle:
            return bundle.read(member)
    with tarfile.open(archive) as bundle:
        extracted = bundle.extractfile(member)
        if extracted is None:
            raise DataError(f"{archive.name} holds no file {member}")
        return extracted.read()


def _paragraph_examples(documents: list[list[str]]) -> list[Example]:
    return [Example(text=paragraph) for document in documents for paragraph in document]


def prepare_datasets(force: bool = False) -> dict[str, Path]:
    """Download the raw packages (once), write train/test JSONL for every dataset; returns their folders."""
    folders = {name: data_root() / name for name in DATASETS}
    if not force and all((folder / "test.jsonl").is_file() for folder in folders.values()):
        return folders
    with tempfile.TemporaryDirectory(prefix="offsite-edge-data-") as scratch:
        reviews_sdist = _download(REVIEWS, Path(scratch) / "vader")
        with tarfile.open(fileobj=io.BytesIO(_read_member(reviews_sdist, REVIEWS.member))) as inner:
            reviews = {
                name: parse_review_snippets(inner.extractfile(member).read().decode("utf-8"))
                for name, member in REVIEW_FILES.items()
            }
        gensim_wheel = _download(WIKIPEDIA, Path(scratch) / "gensim")
        articles = parse_wikipedia(bz2.decompress(_read_member(gensim_wheel, WIKIPEDIA.member)))
        news = [
            [line.strip()]
            for line in _read_member(gensim_wheel, NEWS.member).decode("utf-8").splitlines()
            if line.strip()
        ]
    splits = {
        **{name: split_train_test(examples, 0.15) for name, examples in reviews.items()},
        "wikipedia": tuple(_paragraph_examples(part) for part in split_train_test(articles, 0.1)),
        "news": tuple(_paragraph_examples(part) for part in split_train_test(news, 0.1)),
    }
    for name, (train, test) in splits.items():
        write_jsonl(folders[name] / "train.jsonl", train)
        write_jsonl(folders[name] / "test.jsonl", test)
        print(f"{name}: {len(train)} train, {len(test)} test -> {folders[name]}", file=sys.stderr)
    return folders
