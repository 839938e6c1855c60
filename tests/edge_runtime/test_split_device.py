"""The split device loop on ONNX Runtime (no torch on the device) and on PyTorch: each trains the prompt the
coordinator's PyTorch loop trains, and resumes from its checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coordinator.split.sides import split_model
from coordinator.split.train import ServerExchange, train_split
from coordinator.train import TrainConfig
from edge_runtime.backends.split_ort import OrtCutSide
from edge_runtime.backends.split_torch import TorchCutSide
from edge_runtime.errors import ConfigError
from edge_runtime.manifest import DPTarget
from edge_runtime.records import to_dict
from edge_runtime.split_device import SplitSetup, train_cut_side
from tests.conftest import make_model, sentiment_examples
from tests.split_helpers import PROMPT, InProcess, export_device_side, sentiment_task, training_record

TRAINING = TrainConfig(steps=8, lr=3e-2, batch_size=8, warmup_ratio=0.25)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    task, model = sentiment_task(), make_model("llama", num_layers=4)
    graphs, encoder = export_device_side(tmp_path_factory.mktemp("split_device"), task, model, TRAINING)
    split_model(model, 2, PROMPT)[0].backbone.save_pretrained(graphs.parent / "torch")  # as a split bundle holds it
    return task, model, graphs, encoder


def _side(setting, backend: str) -> OrtCutSide | TorchCutSide:
    _, model, graphs, _ = setting
    if backend == "ort":
        return OrtCutSide(graphs)
    prompt = split_model(model, 2, PROMPT)[0].soft_prompt.detach().numpy()
    return TorchCutSide(graphs.parent / "torch", "norm", prompt, training_record(TRAINING).optimizer)


def _run_on(setting, setup: SplitSetup, examples, backend: str = "ort", **options):
    task, model, _, encoder = setting
    side = _side(setting, backend)
    exchange = InProcess(ServerExchange(split_model(model, 2, PROMPT)[1], task.label_token_ids))
    report = train_cut_side(side, exchange, encoder, encoder.rows(examples), training_record(TRAINING), setup,
                            **options)  # fmt: skip
    return report, side, exchange


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_the_device_loop_prunes_and_steps_as_the_coordinators_pytorch_loop(setting, backend):
    task, model, _, _ = setting
    examples, setup = sentiment_examples(40), SplitSetup(prune_fraction=0.25)
    device, server = split_model(model, 2, PROMPT)
    expected = train_split(device, server, task, examples, TRAINING, setup)
    report, side, _ = _run_on(setting, setup, examples, backend)

    assert report.pruned == expected.pruned == {"score": "el2n", "fraction": 0.25, "dropped": 10, "kept": 30}
    kept_epoch = 8 + 8 + 8 + 6
    assert (report.exchanges, report.samples) == (expected.exchanges, expected.samples) == (8, 2 * kept_epoch)
    assert (report.bytes_up, report.bytes_down, report.bytes_scoring) == (
        expected.bytes_up, expected.bytes_down, expected.bytes_scoring)  # fmt: skip
    np.testing.assert_allclose(report.losses, expected.losses, rtol=1e-4)
    # within a tenth of one step (AdamW turns rounding in a near-zero gradient into a visible step), and most
    # weights far closer: a lost step or another schedule would move them all by about the learning rate
    difference = np.abs(side.prompt() - device.soft_prompt.detach().numpy())
    assert difference.max() < TRAINING.lr / 10 and np.median(difference) < 1e-5


def test_with_noise_on_the_cut_the_server_sees_only_releases_and_the_run_records_its_epsilon(setting):
    setup = SplitSetup(cut_dp=DPTarget(epsilon=8.0, clip=2.0))
    report, side, exchange = _run_on(setting, setup, sentiment_examples(40))
    assert report.cut_privacy["crossings"] == 2 and report.cut_privacy["epsilon"] <= 8.0  # 8 steps, 5 an epoch
    sigma = report.cut_privacy["noise_multiplier"]
    for cut in exchange.cuts:
        inputs = cut[:, PROMPT.tokens :]
        assert float(inputs[inputs != 0].std()) == pytest.approx(sigma * 2.0, rel=0.15)
    assert np.isfinite(side.prompt()).all() and report.exchanges == 8


class _PowerCut(Exception):
    pass


def _cut_after_step_6(step: int, loss: float) -> None:
    if step == 6:
        raise _PowerCut


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_a_run_cut_off_mid_epoch_resumes_from_its_checkpoint_to_the_same_prompt(setting, backend, tmp_path):
    examples, setup = sentiment_examples(40), SplitSetup(prune_fraction=0.25)
    whole, whole_side, _ = _run_on(setting, setup, examples, backend)
    with pytest.raises(_PowerCut):  # after step 6; the checkpoint is step 4's (one every 4 steps)
        _run_on(setting, setup, examples, backend, on_step=_cut_after_step_6, out=tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["checkpoint-00000004"]

    report, side, exchange = _run_on(setting, setup, examples, backend, out=tmp_path)
    assert len(exchange.cuts) == 4  # steps 5 to 8; the scoring pass is not run again
    assert report.pruned == whole.pruned and (report.exchanges, report.samples) == (whole.exchanges, whole.samples)
    assert (report.bytes_up, report.bytes_down) == (whole.bytes_up, whole.bytes_down)
    np.testing.assert_allclose(report.losses, whole.losses, rtol=1e-4)
    np.testing.assert_allclose(side.prompt(), whole_side.prompt(), rtol=0, atol=TRAINING.lr / 10)
    assert np.median(np.abs(side.prompt() - whole_side.prompt())) < 1e-6


def test_the_local_loss_is_refused_on_the_device_with_the_way_out(setting):
    with pytest.raises(ConfigError, match=r"local_steps=0 or train with coordinator/split/train\.py"):
        _run_on(setting, SplitSetup(local_steps=1), sentiment_examples(8))


def test_the_device_side_runs_where_torch_is_not_installed(setting, tmp_path):
    _, _, graphs, encoder = setting
    (tmp_path / "task.json").write_text(json.dumps(to_dict(encoder.task)))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in sentiment_examples(16)))
    tokenizer = graphs.parent / "tokenizer" / "tokenizer.json"
    arguments = [str(graphs), str(tokenizer), str(tmp_path / "task.json"), str(data), "--steps", "2"]
    finished = subprocess.run([sys.executable, "-m", "tests.without_torch", "bench.split_device_run", *arguments],
                              capture_output=True, text=True, cwd=Path(__file__).parents[2])  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    measured = json.loads(finished.stdout.strip().splitlines()[-1])
    assert measured["steps"] == 2 and measured["peak_memory_bytes"] > 0 and measured["step_seconds_median"] > 0
