"""The device's side plus the server's reproduce the full model with the same soft prompt, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from coordinator.adapters.prompt import PromptAdapter
from coordinator.architectures import decoder_layers
from coordinator.errors import ConfigError
from coordinator.split.sides import split_model
from coordinator.tasks import ClassificationTask
from edge_runtime.data import Example
from tests.conftest import make_model, make_tokenizer, sentiment_examples

PROMPT = PromptAdapter(tokens=3)


@pytest.fixture
def batch():
    task = ClassificationTask(make_tokenizer(), {"negative": " negative", "positive": " positive"})
    reviews = [*sentiment_examples(5), Example("great", "positive")]  # rows of different lengths
    return task, next(task.batches(reviews, 6, seed=0))


def _prompted(family: str = "llama", layers: int = 4):
    full = make_model(family, num_layers=layers)
    PROMPT.attach(full, 1, 1)  # the full model with the same soft prompt, through its own hooks
    return full


def test_the_cut_output_and_the_servers_remainder_reproduce_the_full_models_logits(batch):
    task, rows = batch
    # Right-padded rows of different lengths: padding and the prompt's positions must line up on both sides.
    assert (rows.attention_mask == 0).any()
    full = _prompted()
    device, server = split_model(make_model("llama", num_layers=4), 2, PROMPT)
    with torch.no_grad():
        expected = full(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits
        cut = device(rows.input_ids, rows.attention_mask)
        logits = server.logits(cut)
    assert cut.hidden.shape[1] == rows.input_ids.shape[1] + PROMPT.tokens
    real = rows.attention_mask.bool()
    torch.testing.assert_close(logits[real], expected[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(server.last_token_logits(cut), task.last_token_logits(full, rows), rtol=1e-5, atol=1e-5)


def test_the_gradient_returned_across_the_cut_is_the_full_models_gradient_at_the_cut(batch):
    task, rows = batch
    targets = task.label_token_ids[rows.targets]
    full = _prompted()
    at_cut = {}

    def keep(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden.retain_grad()
        at_cut["hidden"] = hidden

    hook = decoder_layers(full)[1].register_forward_hook(keep)
    F.cross_entropy(task.last_token_logits(full, rows), targets).backward()
    hook.remove()

    device, server = split_model(make_model("llama", num_layers=4), 2, PROMPT)
    cut = device(rows.input_ids, rows.attention_mask)
    sent = cut.hidden.detach().requires_grad_(True)  # what crosses the wire
    F.cross_entropy(server.last_token_logits(type(cut)(sent, cut.attention_mask)), targets).backward()
    torch.testing.assert_close(sent.grad, at_cut["hidden"].grad, rtol=1e-5, atol=1e-6)
    assert sent.grad.abs().sum() > 0
    cut.hidden.backward(sent.grad)  # the device finishes the backward pass with the gradient it got back
    prompt = full.get_submodule("model").soft_prompt
    torch.testing.assert_close(device.soft_prompt.grad, prompt.grad, rtol=1e-5, atol=1e-6)
    # Only the prompt trains: the layers on both sides are frozen.
    assert [name for name, p in device.named_parameters() if p.requires_grad] == ["soft_prompt"]
    assert not any(p.requires_grad for p in server.parameters())


def test_a_device_side_holds_only_the_layers_before_the_cut():
    model = make_model("llama", num_layers=6)
    device, server = split_model(model, 2, PROMPT)
    assert len(device.backbone.layers) == 2 and len(server.backbone.layers) == 4
    assert not any(p.data_ptr() == q.data_ptr() for p in device.parameters() for q in model.parameters())
    for cut in (0, 6):
        with pytest.raises(ConfigError, match=r"choose 1\.\.5"):
            split_model(model, cut, PROMPT)
    with pytest.raises(ConfigError, match="not 'gpt2'"):
        split_model(make_model("gpt2"), 2, PROMPT)
