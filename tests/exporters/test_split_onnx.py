"""The split device side exported for ONNX Runtime training: its cut is PyTorch's device side's, checked at export.
(That its steps train PyTorch's prompt: tests/edge_runtime/test_split_device.py.)"""

from __future__ import annotations

import pytest
import torch

from coordinator.split.sides import split_model
from coordinator.train import TrainConfig
from edge_runtime.backends.split_ort import OrtCutSide
from edge_runtime.frozen_inputs import FROZEN_FILE
from exporters.onnx_training import ExportError, OptimizerSettings
from exporters.split_onnx import export_split_side
from tests.conftest import make_model, sentiment_examples
from tests.split_helpers import PROMPT, export_device_side, sentiment_task


def test_the_exported_cut_is_the_device_sides_for_any_batch_and_the_prompt_starts_as_attached(tmp_path):
    task, model = sentiment_task(), make_model("llama", num_layers=4)
    graphs, _ = export_device_side(tmp_path, task, model, TrainConfig(steps=1))
    assert (graphs / FROZEN_FILE).is_file() and (graphs / "eval_model.onnx").is_file()
    side = OrtCutSide(graphs)
    device, _ = split_model(model, 2, PROMPT)
    batch = next(task.batches(sentiment_examples(12, seed=3), 6, seed=1))  # another batch, another length
    with torch.no_grad():
        want = device(batch.input_ids, batch.attention_mask).hidden
    got = torch.from_numpy(side.cut(batch.input_ids.numpy(), batch.attention_mask.numpy()))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(side.prompt()), device.soft_prompt.detach())


def test_an_export_that_does_not_reproduce_pytorch_is_refused(tmp_path, monkeypatch):
    task, model = sentiment_task(), make_model("llama", num_layers=4)
    device, _ = split_model(model, 2, PROMPT)
    batch = next(task.batches(sentiment_examples(8), 8, seed=0))
    monkeypatch.setattr("exporters.split_onnx.GRADIENT_TOLERANCE", -1.0)  # no gradient can be that close
    with pytest.raises(ExportError, match="prompt gradient differs from PyTorch's"):
        export_split_side(device, (batch.input_ids, batch.attention_mask), tmp_path, OptimizerSettings())
