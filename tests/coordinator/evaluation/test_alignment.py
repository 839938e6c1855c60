"""Gradient alignment: an emulator that is the full model steers the adapter identically; a lossy one does not."""

import pytest

from coordinator.emulator import Split, build_emulator
from coordinator.errors import ConfigError
from coordinator.evaluation.alignment import gradient_alignment
from coordinator.tasks import ClassificationTask
from tests.conftest import make_model, sentiment_examples


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_lossless_emulator_aligns_exactly_and_a_lossy_one_less_and_the_bottom_first(tokenizer, family):
    full = make_model(family, num_layers=8, vocab_size=len(tokenizer))
    task = ClassificationTask(tokenizer, {"negative": " negative", "positive": " positive"})
    examples = sentiment_examples(32)
    before = [p.requires_grad for p in full.parameters()]
    lossless = build_emulator(full, Split(2, 2, keep=4))
    same = gradient_alignment(full, lossless, Split(2, 2, keep=4), task, examples, batches=2)
    assert same == {"bottom": pytest.approx(1.0, abs=1e-4), "top": pytest.approx(1.0, abs=1e-4)}
    lossy = gradient_alignment(full, build_emulator(full, Split(2, 2, keep=2)), Split(2, 2, keep=2), task, examples)
    assert lossy["bottom"] < 0.99 and lossy["top"] < 0.999
    assert [p.requires_grad for p in full.parameters()] == before  # left as it was found


def test_top_only_adapters_report_the_top_alone_and_zero_batches_are_refused(tokenizer):
    full = make_model("llama", num_layers=6, vocab_size=len(tokenizer))
    task = ClassificationTask(tokenizer, {"negative": " negative", "positive": " positive"})
    split = Split(0, 2, keep=2)
    assert set(gradient_alignment(full, build_emulator(full, split), split, task, sentiment_examples(16))) == {"top"}
    with pytest.raises(ConfigError, match="at least 1 batch"):
        gradient_alignment(full, build_emulator(full, split), split, task, sentiment_examples(16), batches=0)
