"""Tasks: last-token logits under padding, label-word checks, perplexity against transformers' own loss."""

import math

import pytest
import torch

from coordinator.errors import ConfigError, DataError
from coordinator.tasks import ClassificationTask, LanguageModelTask, make_task
from edge_runtime.data import Example
from tests.conftest import make_model, sentiment_examples

WORDS = {"negative": " negative", "positive": " positive"}


def test_last_token_logits_match_the_full_forward_under_right_padding(tokenizer, family):
    model = make_model(family, vocab_size=len(tokenizer))
    task = ClassificationTask(tokenizer, WORDS)
    examples = [
        Example("the film was great", "positive"),
        Example("bad", "negative"),
        Example("a very dull plot", "negative"),
    ]
    batch = next(task.batches(examples, batch_size=3, seed=None))
    assert batch.attention_mask.sum(1).tolist() != [batch.input_ids.shape[1]] * 3  # really padded
    with torch.no_grad():
        fast = task.last_token_logits(model, batch)
        for row in range(3):
            length = int(batch.attention_mask[row].sum())
            alone = model(batch.input_ids[row : row + 1, :length]).logits[0, -1]
            torch.testing.assert_close(fast[row], alone, rtol=1e-5, atol=1e-5)


def test_accuracy_counts_the_label_with_the_highest_word_logit(tokenizer):
    model = make_model("llama", vocab_size=len(tokenizer))
    task = ClassificationTask(tokenizer, WORDS)
    examples = sentiment_examples(10)
    batch = next(task.batches(examples, batch_size=10, seed=None))
    with torch.no_grad():
        predicted = task.last_token_logits(model, batch)[:, task.label_token_ids].argmax(1)
    expected = float((predicted == batch.targets).float().mean())
    assert task.score(model, examples, batch_size=3) == pytest.approx(expected)


def test_perplexity_equals_exp_of_the_models_own_loss(tokenizer):
    model = make_model("gpt2", vocab_size=len(tokenizer))
    task = LanguageModelTask(tokenizer, max_length=8)
    text = [Example("the film was great and the story was moving but the actors were dull")]
    blocks = task.blocks(text)
    assert len(blocks[0]) == 8
    total, count = 0.0, 0
    with torch.no_grad():
        for block in blocks:
            ids = torch.tensor([block])
            total += float(model(ids, labels=ids).loss) * (len(block) - 1)
            count += len(block) - 1
    assert task.score(model, text, batch_size=2) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_label_words_must_start_with_different_tokens(tokenizer):
    with pytest.raises(ConfigError, match="share a first token"):
        ClassificationTask(tokenizer, {"negative": " positive", "positive": " positive"})
    with pytest.raises(ConfigError, match="placeholder"):
        ClassificationTask(tokenizer, WORDS, template="no slot")


def test_make_task_checks_test_data_before_training(tokenizer):
    train = sentiment_examples(4)
    assert isinstance(make_task(tokenizer, train, train), ClassificationTask)
    with pytest.raises(DataError, match="labelled but the test data is unlabelled"):
        make_task(tokenizer, train, [Example("plain text")])
    with pytest.raises(DataError, match=r"labels \['neutral'\] have no label word"):
        make_task(tokenizer, train, [Example("the film", "neutral")])
    unlabelled = [Example("the film was good")]
    assert isinstance(make_task(tokenizer, unlabelled, unlabelled), LanguageModelTask)
