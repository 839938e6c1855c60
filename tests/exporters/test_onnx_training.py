"""ONNX training export: every family exports, ONNX Runtime reproduces PyTorch, trains, and loses nothing."""

import numpy as np
import onnx
import pytest
import torch
from onnxruntime.training.api import CheckpointState
from safetensors.numpy import load_file

from coordinator.architectures import spec_for
from edge_runtime.bundle import BundleError
from edge_runtime.frozen_inputs import FROZEN_FILE, FrozenInputs
from exporters.onnx_training import (
    GRADIENT_TOLERANCE,
    LOGITS_TOLERANCE,
    LOSS_TOLERANCE,
    OPSET,
    ExportError,
    OptimizerSettings,
    export_training_artifacts,
    onnx_name,
)
from tests.conftest import make_model


def _adapter_names(model, layers):
    prefix = spec_for(model.config.model_type).layers
    return [name for name, _ in model.named_parameters() if any(name.startswith(f"{prefix}.{i}.") for i in layers)]


def _sample(kind, vocab=64):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    if kind == "classification":
        return ids, mask, torch.randint(0, vocab, (3,), generator=generator)
    return ids, mask, ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100).reshape(-1)


def _export_classifier(model, directory):
    """A classification export of `model` with its first and last layers trainable."""
    spec = spec_for(model.config.model_type)
    trainable = _adapter_names(model, [0, 3])
    sample = _sample("classification")
    return export_training_artifacts(
        model, spec.backbone, spec.head, "classification", trainable, sample, directory, OptimizerSettings()
    )


@pytest.mark.parametrize("kind", ["classification", "language-model"])
def test_every_family_exports_and_reproduces_pytorch(family, kind, tmp_path):
    model = make_model(family, num_layers=4)
    spec = spec_for(model.config.model_type)
    trainable = _adapter_names(model, [0, 3])
    check = export_training_artifacts(
        model, spec.backbone, spec.head, kind, trainable, _sample(kind), tmp_path, OptimizerSettings()
    )
    assert check.logits_max_abs_diff <= LOGITS_TOLERANCE * max(1.0, check.logits_max_abs)
    assert abs(check.loss_onnx - check.loss_torch) <= LOSS_TOLERANCE * abs(check.loss_torch)
    training = onnx.load(str(tmp_path / "training_model.onnx"))
    assert training.opset_import[0].version == OPSET and training.ir_version <= 10
    state = CheckpointState.load_checkpoint(str(tmp_path / "checkpoint"))
    marked = {name for name, parameter in state.parameters if parameter.requires_grad}
    assert marked == {name for name, _ in state.parameters} == {onnx_name(name) for name in trainable}
    weights = dict(model.named_parameters())
    for name in trainable[:3]:
        assert np.array_equal(state.parameters[onnx_name(name)].data, weights[name].detach().numpy())
    assert not (tmp_path / "eval_model.onnx").exists()  # made for the check only


def test_frozen_matrices_are_fed_from_their_file_and_a_replaced_weight_stays_in_the_checkpoint(tmp_path):
    model = make_model("llama", num_layers=4)
    spec = spec_for(model.config.model_type)
    trainable = _adapter_names(model, [3])
    replaced = _adapter_names(model, [0])  # an earlier layer window's adapter: the device sets it
    export_training_artifacts(
        model, spec.backbone, spec.head, "classification", trainable, _sample("classification"), tmp_path,
        OptimizerSettings(), replaced=replaced,
    )  # fmt: skip
    state = CheckpointState.load_checkpoint(str(tmp_path / "checkpoint"))
    assert {name for name, _ in state.parameters} == {onnx_name(name) for name in trainable + replaced}
    frozen = load_file(str(tmp_path / FROZEN_FILE))
    matrices = {name for name, weight in model.named_parameters() if weight.dim() >= 2}
    assert set(frozen) == {onnx_name(name) for name in matrices - set(trainable) - set(replaced)}
    weights = dict(model.named_parameters())
    for name in frozen:
        assert np.array_equal(frozen[name], weights[name.removeprefix(onnx_name(""))].detach().numpy())
    training = onnx.load(str(tmp_path / "training_model.onnx"))
    assert set(frozen) <= {value.name for value in training.graph.input}
    assert not set(frozen) & {tensor.name for tensor in training.graph.initializer}


def test_a_model_with_every_gradient_flag_off_exports_and_keeps_its_flags(tmp_path):
    # Training and distillation switch every flag off when they finish; a freshly distilled emulator comes so.
    model = make_model("llama", num_layers=4).requires_grad_(False)
    check = _export_classifier(model, tmp_path)
    assert check.gradient_relative_diff <= GRADIENT_TOLERANCE
    assert not any(parameter.requires_grad for parameter in model.parameters())


def test_equal_valued_parameters_stay_separate(tmp_path):
    # Fresh norm weights are all ones; merged into one initializer they would train as one tied tensor.
    _export_classifier(make_model("llama", num_layers=4), tmp_path)
    state = CheckpointState.load_checkpoint(str(tmp_path / "checkpoint"))
    assert onnx_name("model.layers.3.post_attention_layernorm.weight") in {name for name, _ in state.parameters}


def test_a_parameter_the_model_lacks_is_refused(tmp_path):
    model = make_model("llama", num_layers=4)
    spec = spec_for(model.config.model_type)
    with pytest.raises(ExportError, match="lost trainable parameters"):
        export_training_artifacts(
            model,
            spec.backbone,
            spec.head,
            "classification",
            ["model.layers.9.mlp.up_proj.weight"],
            _sample("classification"),
            tmp_path,
            OptimizerSettings(),
        )


@pytest.mark.parametrize("adapter", ["lora:r=2,alpha=4", "bias", "prompt:tokens=3"])
def test_every_family_exports_each_adapter_kind_and_trains_only_its_parameters(family, adapter, tmp_path):
    from coordinator.adapters import adapter_kind

    model = make_model(family, num_layers=4)
    spec = spec_for(model.config.model_type)
    attached = adapter_kind(adapter).attach(model, 1, 1)  # on a full model, full-model names are its own names
    with torch.no_grad():  # a trained-looking adapter, so that the check sees its branch or biases at work
        for parameter in attached.values():
            parameter.normal_(0, 0.1)
    check = export_training_artifacts(
        model, spec.backbone, spec.head, "classification", list(attached), _sample("classification"), tmp_path,
        OptimizerSettings(),
    )  # fmt: skip
    assert check.logits_max_abs_diff <= LOGITS_TOLERANCE * max(1.0, check.logits_max_abs)
    assert abs(check.loss_onnx - check.loss_torch) <= LOSS_TOLERANCE * abs(check.loss_torch)
    state = CheckpointState.load_checkpoint(str(tmp_path / "checkpoint"))
    marked = {name for name, parameter in state.parameters if parameter.requires_grad}
    assert marked == {onnx_name(name) for name in attached}


def test_a_graph_input_nobody_provides_is_named(tmp_path):
    _export_classifier(make_model("llama", num_layers=4), tmp_path)
    frozen = FrozenInputs(tmp_path)
    name = next(iter(frozen.values))
    del frozen.values[name]
    with pytest.raises(BundleError, match=f"neither the batch nor {FROZEN_FILE} holds: \\['{name}'\\]"):
        frozen.feeds(["input_ids", name], {"input_ids": np.zeros((1, 2), np.int64)})
