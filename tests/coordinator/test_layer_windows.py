"""Adaptive layer tuning: early-exit views, confidence voting, and window-by-window training on both backends."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from coordinator.cli import main as coordinator
from coordinator.datasets import write_jsonl
from coordinator.evaluation.exits import exit_views
from coordinator.tasks import ClassificationTask, LanguageModelTask
from edge_runtime.backends import open_backend
from edge_runtime.bundle import verify_bundle
from edge_runtime.data import load_examples
from edge_runtime.text import TaskEncoder, training_batches
from edge_runtime.torch_graph import truncated
from edge_runtime.trainer import TrainOptions, train_bundle
from edge_runtime.windows import window_at
from tests.conftest import assert_same_adapter, make_bundle, make_model, sentiment_examples

LEARNING_RATE = 1e-3
WINDOWED = ("--adapter-layers", "2,2", "--layer-window", "2")  # 6-layer model, keep 2: windows [0, 1] and [4, 5]


def test_an_exit_view_runs_the_first_layers_then_the_final_norm_and_head_on_shared_weights():
    model = make_model("llama", num_layers=4).eval()
    ids = torch.randint(0, 64, (2, 7))
    view = truncated(model, "model.layers", 2)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[2]  # after layer 1, before the norm
        expected = model.lm_head(model.model.norm(hidden))
        got = view(input_ids=ids).logits
    torch.testing.assert_close(got, expected)
    assert len(model.model.layers) == 4 and len(view.model.layers) == 2
    assert view.model.layers[1].mlp.up_proj.weight is model.model.layers[1].mlp.up_proj.weight
    with pytest.raises(ValueError, match="between 1 and the model's 4 layers"):
        truncated(model, "model.layers", 5)


@pytest.mark.parametrize("kind", ["classification", "language-model"])
def test_voting_over_the_last_layer_alone_scores_like_the_model(tokenizer, kind):
    model = make_model("llama", num_layers=3, vocab_size=len(tokenizer)).eval()
    examples = sentiment_examples(12, seed=3)
    if kind == "classification":
        task = ClassificationTask(tokenizer, {"negative": " negative", "positive": " positive"})
    else:
        task = LanguageModelTask(tokenizer, max_length=16)
    assert task.score(model, examples, 4, exits=[2]) == pytest.approx(task.score(model, examples, 4), rel=1e-5)


def test_voting_answers_with_the_surest_exit(tokenizer):
    model = make_model("llama", num_layers=3, vocab_size=len(tokenizer)).eval()
    task = ClassificationTask(tokenizer, {"negative": " negative", "positive": " positive"})
    examples = sentiment_examples(16, seed=4)
    batch = next(task.batches(examples, 16, seed=None))
    with torch.no_grad():
        per_exit = torch.stack([task.label_logits(view, batch) for view in exit_views(model, [0, 2])]).softmax(-1)
    surest = per_exit.amax(-1).argmax(0)
    expected = per_exit[surest, torch.arange(16)].argmax(-1)
    accuracy = task.score(model, examples, 16, exits=[0, 2])
    assert accuracy == pytest.approx(float((expected == batch.targets).float().mean()))


def _copied(weights):
    """A snapshot of a backend's adapter view (its reads may share memory with the live weights)."""
    return {name: np.array(value, copy=True) for name, value in weights.items()}


def test_each_backend_trains_one_window_at_a_time_through_its_exit(tmp_path):
    paths = make_bundle(tmp_path, "ort,torch", *WINDOWED)
    manifest = verify_bundle(paths["bundle"], paths["trust"])
    windows = manifest.adapter.windows
    assert [(w.layers, w.exit, w.exit_source) for w in windows] == [([0, 1], 1, 1), ([4, 5], 5, 5)]
    assert (paths["bundle"] / "ort" / "window-0" / "training_model.onnx").is_file()
    encoder = TaskEncoder(paths["bundle"] / "tokenizer" / "tokenizer.json", manifest.task)
    batches = training_batches(encoder, encoder.rows(load_examples(paths["data"])), 8, seed=0)
    steps = [next(batches) for _ in range(4)]
    losses = {}
    for name in ("ort", "torch"):
        backend = open_backend(name, paths["bundle"], manifest, 1, None)
        before, losses[name] = _copied(backend.adapter()), []
        for step, batch in enumerate(steps):
            window = window_at(step, len(steps), len(windows))
            backend.select_window(window)
            losses[name].append(backend.step([batch], LEARNING_RATE))
            after = _copied(backend.adapter())
            changed = {key for key in after if not np.array_equal(after[key], before[key])}
            assert changed == set(windows[window].parameters), (name, step)
            before = after
    np.testing.assert_allclose(losses["ort"], losses["torch"], rtol=1e-4)


@pytest.mark.parametrize("every", [3, 4])  # a checkpoint inside the top window, and one at the switch
def test_a_windowed_run_stopped_and_resumed_ends_where_an_unbroken_one_does(tmp_path, every):
    paths = make_bundle(tmp_path, "ort", *WINDOWED)
    options = TrainOptions(steps=8, progress=False, threads=1, checkpoint_every=every)
    whole = train_bundle(paths["bundle"], paths["data"], tmp_path / "whole", paths["trust"], options)
    assert whole["layer_windows"] == [{"layers": [0, 1], "exit": 1}, {"layers": [4, 5], "exit": 5}]
    assert [window_at(step, 8, 2) for step in range(8)] == [0] * 4 + [1] * 4

    def power_cut(event):
        if event["step"] == every + 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_bundle(paths["bundle"], paths["data"], tmp_path / "cut", paths["trust"], options, on_step=power_cut)
    resumed = train_bundle(paths["bundle"], paths["data"], tmp_path / "cut", paths["trust"], options)
    assert resumed["resumed_from_step"] == every
    np.testing.assert_allclose(resumed["loss_curve"], whole["loss_curve"], rtol=1e-5)
    one, two = (load_file(str(tmp_path / run / "adapter.safetensors")) for run in ("whole", "cut"))
    assert_same_adapter(two, one)


def test_evaluate_with_layer_windows_votes_and_reports_the_last_exit_alone(tmp_path, capsys):
    paths = make_bundle(tmp_path, "torch")
    write_jsonl(tmp_path / "test.jsonl", sentiment_examples(16, seed=5))
    out = tmp_path / "results.json"
    command = ["evaluate", "--model", str(paths["model"]), "--train", str(paths["data"])]
    command += ["--test", str(tmp_path / "test.jsonl"), "--steps", "4", "--batch-size", "4", "--keep", "2"]
    assert coordinator([*command, *WINDOWED, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["config"]["layer_window"] == 2
    assert 0 <= results["offsite_plugin"]["final_exit_only"] <= 1
    assert results["offsite_emulator"]["train"]["steps"] == 4
