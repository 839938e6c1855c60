"""The memory rewrites of the training graph: weights read in place, int8 weights dequantized per use behind a
gate, recomputed layers; each export still checked against PyTorch's logits, loss and gradients."""

import onnx
import pytest

from coordinator.architectures import spec_for
from coordinator.compression import EmulatorSpec, make_emulator
from coordinator.emulator import Split
from edge_runtime import quantized
from exporters.onnx_rewrites import RECOMPUTE, _is_gradient
from exporters.onnx_training import GRADIENT_TOLERANCE, OptimizerSettings, export_training_artifacts
from tests.conftest import make_model
from tests.exporters.test_onnx_training import _adapter_names, _sample


def export(tmp_path, family="llama", store="float32", recompute=False, kind="classification"):
    tmp_path.mkdir(exist_ok=True)
    model = make_model(family, num_layers=4)
    spec = spec_for(model.config.model_type)
    emulator = make_emulator(model, Split(1, 1, keep=2), EmulatorSpec.parse(f"uniform:store={store}"))
    check = export_training_artifacts(
        emulator,
        spec.backbone,
        spec.head,
        kind,
        _adapter_names(emulator, [0, 3]),
        _sample(kind),
        tmp_path,
        OptimizerSettings(),
        recompute=spec.layers if recompute else None,
    )
    assert check.gradient_relative_diff <= GRADIENT_TOLERANCE
    return check, onnx.load(str(tmp_path / "training_model.onnx"))


def _producers(graph):
    return {output: node for node in graph.node for output in node.output}


def test_no_weight_is_transposed_into_a_copy(tmp_path):
    _, training = export(tmp_path)
    stored = {tensor.name for tensor in training.graph.input} | {t.name for t in training.graph.initializer}
    transposed = [n for n in training.graph.node if n.op_type == "Transpose" and n.input[0] in stored]
    assert transposed == []
    assert sum(node.op_type == "Gemm" and not _is_gradient(node) for node in training.graph.node) == 2 * 7 + 2 * 7 + 1


@pytest.mark.parametrize("kind", ["classification", "language-model"])
def test_every_int8_weight_is_dequantized_once_per_use_behind_a_gate(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(quantized, "CHUNK_BYTES", 4 * 32 * 16)  # the 64-row head in slices of 16 rows
    _, training = export(tmp_path, store="int8", kind=kind)
    graph = training.graph
    producers = _producers(graph)
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    dequantized = [node for node in graph.node if node.op_type == "DequantizeLinear"]
    assert len(dequantized) > 2 * (2 * 7 + 4)  # forward and backward copies of 14 matrices and 4 head slices
    for node in dequantized:
        assert len(readers[node.output[0]]) == 1
        assert producers[node.input[0]].name.endswith("/Reshape")  # its values come through a gate


def test_recomputed_layers_keep_only_their_inputs_for_the_backward_pass(tmp_path):
    _, plain = export(tmp_path / "plain")
    _, recomputed = export(tmp_path / "recompute", recompute=True)

    def stashed(training):
        producers = _producers(training.graph)
        return {
            name
            for node in training.graph.node
            if _is_gradient(node)
            for name in node.input
            if name in producers and not _is_gradient(producers[name]) and "/model/layers." in producers[name].name
        }

    kept = {name for name in stashed(recomputed) if "/gate" not in name}  # a gate is an alias of a layer input

    def layer(name):
        return name.split("/")[2] if name.startswith("/model/layers.") else None

    forward = [node for node in recomputed.graph.node if not _is_gradient(node) and "/gate" not in node.name]
    shared = {name for node in forward for name in node.input if layer(name) and layer(name) != layer(node.name)}
    assert {f"/model/layers.{i}/Add_1_output_0" for i in range(4)} <= kept <= shared  # layer outputs only
    assert len(stashed(plain)) > 10 * len(kept)
    assert any(node.name.endswith(RECOMPUTE) for node in recomputed.graph.node)


def test_recompute_and_int8_together_still_differentiate_like_pytorch(tmp_path):
    check, _ = export(tmp_path, family="gpt2", store="int8", recompute=True)
    assert check.loss_onnx == pytest.approx(check.loss_torch, rel=1e-4)
