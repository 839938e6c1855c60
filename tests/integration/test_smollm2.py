"""SmolLM2-135M end to end: GGUF vs cached conversion, zero-shot above chance, a short five-setting run."""

import pytest
import torch

from coordinator.adapters.files import load_adapter
from coordinator.datasets import dataset_path, prepare_datasets
from coordinator.emulator import Split
from coordinator.evaluation.five_settings import SETTINGS, Experiment, run_five_settings
from coordinator.models import load_model, packaged_gguf_path
from coordinator.tasks import make_task
from coordinator.train import TrainConfig
from edge_runtime.data import load_examples

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def sentiment():
    prepare_datasets()
    return load_examples(dataset_path("sentiment", "train")), load_examples(dataset_path("sentiment", "test"))


def test_gguf_and_its_cached_conversion_give_the_same_logits(smollm2):
    direct = load_model(str(packaged_gguf_path("smollm2-135m")))
    text = "The capital of France is"
    ids = direct.tokenizer(text).input_ids
    assert ids == smollm2.tokenizer(text).input_ids
    assert ids[0] != direct.tokenizer.convert_tokens_to_ids("<|im_start|>")  # the GGUF's BOS quirk is fixed
    assert direct.tokenizer.eos_token == smollm2.tokenizer.eos_token == "<|im_end|>"
    with torch.no_grad():
        assert torch.equal(direct.model(torch.tensor([ids])).logits, smollm2.model(torch.tensor([ids])).logits)


def test_zero_shot_sentiment_is_above_chance(smollm2, sentiment):
    train, test = sentiment
    assert len(test) >= 1000
    task = make_task(smollm2.tokenizer, train, test)
    assert task.score(smollm2.model, test[:200], batch_size=16) > 0.55


def test_product_reviews_are_a_second_labelled_domain(smollm2, sentiment):
    prepare_datasets()
    train, test = (load_examples(dataset_path("products", split)) for split in ("train", "test"))
    assert len(train) > 2000 and len(test) > 400
    assert {example.label for example in test} == {"positive", "negative"}
    assert not {example.text for example in test} & {example.text for example in train + sentiment[0]}
    task = make_task(smollm2.tokenizer, train, test)
    assert task.score(smollm2.model, test[:200], batch_size=16) > 0.6  # the label words fit this domain too


def test_short_five_setting_run(smollm2, sentiment, tmp_path):
    train, test = sentiment
    task = make_task(smollm2.tokenizer, train, test)
    training = TrainConfig(steps=6, batch_size=4, lr=1e-4)
    experiment = Experiment(Split(2, 2, keep=8), training, TrainConfig(steps=6, batch_size=4, lr=2e-5))
    snapshot = smollm2.model.model.layers[29].mlp.down_proj.weight.clone()
    results = run_five_settings(smollm2, task, train, test[:48], experiment, tmp_path / "adapter.safetensors")
    assert all(0 <= results[key]["accuracy"] <= 1 for key, _ in SETTINGS)
    assert results["config"]["emulator_layers"] == [0, 1, 2, 6, 9, 13, 16, 20, 23, 27, 28, 29]
    assert results["parameters"]["emulator"] < 0.7 * results["parameters"]["full"]
    assert torch.equal(smollm2.model.model.layers[29].mlp.down_proj.weight, snapshot)
    weights, _ = load_adapter(tmp_path / "adapter.safetensors")
    assert sorted({int(name.split(".")[2]) for name in weights}) == [0, 1, 28, 29]
    assert not torch.equal(weights["model.layers.29.mlp.down_proj.weight"], snapshot)
