"""Adapter kinds: the registry, what each kind trains, and how it averages across a fleet."""

from dataclasses import replace

import pytest
import torch

from coordinator.adapters import KINDS, adapter_kind, plugged_in
from coordinator.adapters.layers import adapter_parameters
from coordinator.architectures import spec_for
from coordinator.bundles.planner import model_shape
from coordinator.bundles.request import BundleRequest
from coordinator.cli import main as coordinator
from coordinator.emulator import Split, build_emulator
from coordinator.errors import ConfigError, DataError
from coordinator.fleet.aggregate import federated_average
from coordinator.tasks import ClassificationTask
from coordinator.train import TrainConfig, train
from edge_runtime.low_rank import load_causal_lm
from edge_runtime.manifest import LANGUAGE_MODEL
from edge_runtime.memory import estimate
from edge_runtime.torch_graph import TrainingGraph
from tests.conftest import device_result, make_bundle, make_model, sentiment_examples


def test_layers_trains_every_parameter_of_the_adapter_layers_of_each_family(family):
    model = make_model(family, num_layers=6)
    emulator = build_emulator(model, Split(1, 1, keep=2))
    trained = adapter_kind("layers").attach(emulator, 1, 1)
    assert trained.keys() == adapter_parameters(emulator, 1, 1).keys()
    layers = spec_for(model.config.model_type).layers
    assert {name[len(layers) + 1 :].split(".")[0] for name in trained} == {"0", "5"}  # source layers, not emulator's
    assert sum(p.numel() for p in trained.values()) < sum(p.numel() for p in emulator.parameters())


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("prefix:n=3", "'prefix' is not one of: layers"),
        ("layers:r=8", "takes no options"),
        ("layers:r", "not KEY=VALUE"),
        ("lora:r=8,alpha", "r and alpha must be numbers"),
        ("prompt:tokens=0", "tokens=0 must be at least 1"),
        ("prompt:length=20", "takes tokens and seed, not length"),
    ],
)
def test_an_unknown_kind_or_option_is_refused_naming_it(text, named):
    with pytest.raises(ConfigError, match=named):
        adapter_kind(text)
    with pytest.raises(ConfigError, match=named):
        BundleRequest(adapter_kind=text)
    assert "layers" in KINDS


def test_export_refuses_an_unknown_adapter_kind_before_building_anything(tmp_path, capsys):
    paths = make_bundle(tmp_path)
    command = ["export", "--model", str(paths["model"]), "--profile", "laptop-16gb", "--keep", "2"]
    assert coordinator([*command, "--adapter-kind", "ia3", "--out", str(tmp_path / "b")]) == 2
    assert "adapter kind 'ia3' is not one of: layers, lora, bias, prompt" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_fedavg_of_layers_weighs_each_device_by_its_examples():
    one = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    two = {"w": torch.tensor([4.0, -1.0]), "b": torch.tensor([3.0])}
    average = federated_average([device_result(one, 10), device_result(two, 30)])
    torch.testing.assert_close(average["w"], torch.tensor([0.25 * 1 + 0.75 * 4, 0.25 * 2 + 0.75 * -1]))
    torch.testing.assert_close(average["b"], torch.tensor([2.25]))
    assert average["w"].dtype == torch.float32


def test_fedavg_refuses_results_of_different_tensors_or_kinds():
    with pytest.raises(DataError, match="name different tensors"):
        federated_average([device_result({"w": torch.zeros(1)}, 1), device_result({"v": torch.zeros(1)}, 1)])
    with pytest.raises(DataError, match="different kinds"):
        federated_average([device_result({"w": torch.zeros(1)}, 1), device_result({"w": torch.zeros(1)}, 1, "lora")])
    with pytest.raises(DataError, match="nothing to aggregate"):
        federated_average([])


NEW_KINDS = ["lora:r=4,alpha=8", "bias"]  # the kinds whose untrained adapter is a no-op


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("text", NEW_KINDS)
def test_an_untrained_adapter_changes_nothing_and_plugs_in_as_a_no_op(family, text):
    model = make_model(family, num_layers=6).eval()
    ids = torch.randint(0, 64, (2, 7))
    before = _logits(model, ids)
    emulator = build_emulator(model, Split(1, 1, keep=2)).eval()
    kind = adapter_kind(text)
    untrained = {name: p.detach().clone() for name, p in kind.attach(emulator, 1, 1).items()}
    assert untrained and all(name.split(".")[-1] in ("lora_A", "lora_B", "bias") for name in untrained)
    with plugged_in(kind, model, untrained, 1, 1):
        torch.testing.assert_close(_logits(model, ids), before)
    torch.testing.assert_close(_logits(model, ids), before)  # and taken out again
    assert set(dict(model.named_parameters())) == set(dict(make_model(family, num_layers=6).named_parameters()))


@pytest.mark.parametrize("text", [*NEW_KINDS, "prompt:tokens=3"])
def test_training_moves_only_the_kinds_parameters_and_the_plug_in_carries_them(tokenizer, family, text, tmp_path):
    model = make_model(family, num_layers=6, vocab_size=len(tokenizer)).eval()
    emulator = build_emulator(model, Split(1, 1, keep=2)).eval()
    kind = adapter_kind(text)
    adapter = kind.attach(emulator, 1, 1)
    trainable = {id(p) for p in adapter.values()}
    frozen = {name: p.detach().clone() for name, p in emulator.named_parameters() if id(p) not in trainable}
    before = {name: p.detach().clone() for name, p in adapter.items()}
    task = ClassificationTask(tokenizer, {"negative": " negative", "positive": " positive"}, max_length=32)
    train(emulator, adapter.values(), task, sentiment_examples(16), TrainConfig(3, 1e-2, 8, 32))
    assert all(torch.equal(p, frozen[name]) for name, p in emulator.named_parameters() if name in frozen)
    assert any(not torch.equal(p, before[name]) for name, p in adapter.items())
    trained = {name: p.detach().clone() for name, p in adapter.items()}
    ids = torch.randint(0, len(tokenizer), (2, 7))
    untouched = _logits(model, ids)
    with plugged_in(kind, model, trained, 1, 1):
        assert not torch.allclose(_logits(model, ids), untouched)
        plugged = _logits(model, ids)
    if text == "bias" and family in ("mistral", "qwen2"):  # their configs cannot say every projection has a bias
        with pytest.raises(ConfigError, match="cannot say"):
            kind.merge(model, trained, 1, 1)
        return
    kind.merge(model, trained, 1, 1)  # what `coordinator plug` saves: LoRA folded in, biases kept
    torch.testing.assert_close(_logits(model, ids), plugged, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "tuned")
    reloaded = load_causal_lm(tmp_path / "tuned")  # a soft prompt comes back from the config's record
    torch.testing.assert_close(_logits(reloaded, ids), plugged, rtol=1e-5, atol=1e-5)


def test_lora_needs_a_target_the_layers_have_and_aggregates_a_and_b_each():
    model = make_model("llama", num_layers=6)
    with pytest.raises(ConfigError, match="match no linear map"):
        adapter_kind("lora:targets=c_attn").attach(model, 1, 1)
    names = adapter_kind("lora:r=2,targets=q_proj,k_proj").attach(model, 1, 1)
    assert {name.split(".")[-2] for name in names} == {"q_proj", "k_proj"}
    assert names["model.layers.0.self_attn.q_proj.lora_A"].shape == (2, 32)
    one = {"a": torch.ones(2, 3), "b": torch.zeros(3, 2)}
    two = {"a": torch.zeros(2, 3), "b": torch.ones(3, 2)}
    average = federated_average([device_result(one, 1, "lora"), device_result(two, 3, "lora")])
    torch.testing.assert_close(average["a"], torch.full((2, 3), 0.25))
    torch.testing.assert_close(average["b"], torch.full((3, 2), 0.75))


def test_an_untrained_prompt_computes_what_its_starting_text_would_and_comes_out_again(family):
    """No prompt is a no-op (every attention row weighs its keys); an untrained one is exactly its starting text in
    front of the input: for the whole model, the training graph (4D mask, explicit positions) and `generate`."""
    model = make_model(family, num_layers=6).eval()
    spec = spec_for(model.config.model_type)
    kind = adapter_kind("prompt:tokens=3")
    start = kind.starting_ids(model.config.vocab_size)
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding, as every task batches
    texted = torch.cat([start.expand(2, -1), ids], dim=1)
    texted_mask = torch.cat([torch.ones_like(texted[:, :3]), mask], dim=1)
    graph = TrainingGraph(model, spec.backbone, spec.head, LANGUAGE_MODEL)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        expected = model(input_ids=texted, attention_mask=texted_mask).logits[:, 3:]
        generated = model.generate(texted[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)[0, 10:]
        prompt = kind.attach(model, 1, 1)
        assert list(prompt) == [f"{spec.backbone}.soft_prompt"]
        got = model(input_ids=ids, attention_mask=mask).logits
        traced = graph(ids, mask).reshape(2, 6, -1)
        prompted = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)[0, 7:]
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(traced[real[:, :-1]], expected[:, :-1][real[:, :-1]], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[real], plain[real], atol=1e-3)  # the prompt is there
    assert prompted.tolist() == generated.tolist()
    kind.detach(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, plain)
    assert set(dict(model.named_parameters())) == set(dict(make_model(family, num_layers=6).named_parameters()))


def test_a_prompt_averages_vector_by_vector_and_plans_for_its_tokens():
    one, two = {"model.soft_prompt": torch.zeros(2, 3)}, {"model.soft_prompt": torch.ones(2, 3)}
    average = federated_average([device_result(one, 1, "prompt"), device_result(two, 3, "prompt")])
    torch.testing.assert_close(average["model.soft_prompt"], torch.full((2, 3), 0.75))
    emulator = build_emulator(make_model("llama", num_layers=6), Split(1, 1, keep=2))
    plain = model_shape(emulator, adapter_kind("bias").attach(emulator, 1, 1))
    adapter_kind("bias").detach(emulator)
    shape = model_shape(emulator, adapter_kind("prompt:tokens=5").attach(emulator, 1, 1))
    assert (shape.prefix_tokens, shape.trainable_parameters) == (5, 5 * 32)
    assert shape.backprop_layers == shape.layers == plain.backprop_layers  # the gradient goes through every layer
    longer = estimate(shape, 2, 16, "classification", "ort").activations
    assert longer > estimate(replace(shape, prefix_tokens=0), 2, 16, "classification", "ort").activations
