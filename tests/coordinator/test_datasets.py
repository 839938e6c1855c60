"""Parsers of the raw public data: review-snippet labels, MediaWiki cleaning, the fixed split."""

import bz2

import pytest

from coordinator.datasets import clean_wiki_markup, parse_review_snippets, parse_wikipedia, split_train_test
from coordinator.errors import DataError
from edge_runtime.data import Example


def test_review_snippets_are_labelled_by_sign_and_neutral_dropped():
    raw = "1\t2.3\tA gorgeous film.\n2\t-0.5\tMeh.\n3\t-1.6\tTepid and dull.\n\n4\t0.51\tFine.\n"
    assert parse_review_snippets(raw) == [
        Example("A gorgeous film.", "positive"),
        Example("Tepid and dull.", "negative"),
        Example("Fine.", "positive"),
    ]
    with pytest.raises(DataError, match="line 1"):
        parse_review_snippets("1\t2.0\n")


ARTICLE = """{{Infobox animal|name=Aardvark {{nested|x}}}}
'''Aardvark''' ([[Orycteropus afer]]) is a [[mammal|burrowing mammal]] native to Africa.<ref>Smith 2001</ref>
It is the only living species of its order and it feeds on ants and termites at night.

== Description ==
[[File:Aardvark.jpg|thumb|An [[aardvark]] at night]]
* a list item that is dropped
{| class="wikitable"
| table cell
|}
Short line.
"""


def test_wiki_markup_becomes_plain_paragraphs():
    paragraphs = clean_wiki_markup(ARTICLE)
    assert paragraphs == [
        "Aardvark (Orycteropus afer) is a burrowing mammal native to Africa. It is the only living species "
        "of its order and it feeds on ants and termites at night."
    ]


def test_wikipedia_dump_keeps_main_namespace_articles_only():
    page = "<page><title>{t}</title><ns>{ns}</ns>{redirect}<revision><text>{text}</text></revision></page>"
    body = ARTICLE.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    xml = (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
        + page.format(t="Aardvark", ns=0, redirect="", text=body)
        + page.format(t="Talk:Aardvark", ns=1, redirect="", text=body)
        + page.format(t="AccessibleComputing", ns=0, redirect='<redirect title="X" />', text="#REDIRECT [[X]]")
        + "</mediawiki>"
    )
    articles = parse_wikipedia(bz2.decompress(bz2.compress(xml.encode())))
    assert len(articles) == 1 and articles[0][0].startswith("Aardvark (Orycteropus afer)")


def test_split_is_fixed_and_disjoint():
    items = list(range(100))
    train, test = split_train_test(items, 0.15)
    assert (train, test) == split_train_test(items, 0.15)
    assert len(test) == 15 and sorted(train + test) == items
