"""On-device training: both backends agree, micro-batches add up to the batch, a killed run resumes exactly."""

import importlib
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from edge_runtime.cli import main as edge
from edge_runtime.manifest import Manifest
from edge_runtime.memory import BudgetError, estimate
from edge_runtime.trainer import PLAN_MARGIN, TrainOptions, train_bundle
from tests.conftest import assert_same_adapter, make_bundle

# Same graph, same AdamW + clipping, same batches; float32 kernels differ in summation order only.
LOSS_RTOL = 1e-3


def _train(bundle, out, **options):
    defaults = {"progress": False, "threads": 1}
    return train_bundle(bundle["bundle"], bundle["data"], out, bundle["trust"], TrainOptions(**defaults | options))


def test_ort_and_torch_give_the_same_losses_for_20_steps(tiny_bundle, tmp_path):
    ort = _train(tiny_bundle, tmp_path / "ort", steps=20, backend="ort")
    torch = _train(tiny_bundle, tmp_path / "torch", steps=20, backend="torch")
    assert ort["backend"] == "ort" and torch["backend"] == "torch"
    np.testing.assert_allclose(ort["loss_curve"], torch["loss_curve"], rtol=LOSS_RTOL)
    assert ort["final_loss"] < ort["first_loss"] * 0.7  # it learns the toy task


def test_the_result_holds_the_adapter_under_full_model_names_and_the_metrics(tiny_bundle, tmp_path):
    metrics = _train(tiny_bundle, tmp_path / "r", steps=3)
    weights = load_file(str(tmp_path / "r" / "adapter.safetensors"))
    assert {name.split(".")[2] for name in weights} == {"0", "5"}  # layers 0 and 5 of the 6-layer source
    assert metrics["steps"] == 3 and metrics["samples"] == 24 and len(metrics["loss_curve"]) == 3
    assert metrics["peak_memory_bytes"] > 0 and metrics["budget_bytes"] > 0 and metrics["micro_batch"] == 8
    assert json.loads((tmp_path / "r" / "metrics.json").read_text()) == metrics
    assert not list((tmp_path / "r").glob("checkpoint-*"))


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_micro_batches_accumulate_to_the_whole_batch(tiny_bundle, tmp_path, backend):
    shape = Manifest.from_json((tiny_bundle["bundle"] / "manifest.json").read_bytes()).plan.shape
    whole = _train(tiny_bundle, tmp_path / "whole", steps=5, backend=backend)
    budget = int(estimate(shape, 2, whole["sequence"], "classification", backend).total * (1 + PLAN_MARGIN)) + 1
    split = _train(tiny_bundle, tmp_path / "split", steps=5, backend=backend, budget_bytes=budget)
    # Planned at 2; this pytest process already holds more than the budget, so the run may step down to 1.
    assert whole["micro_batch"] == 8 and split["micro_batch"] in (1, 2)
    np.testing.assert_allclose(split["loss_curve"], whole["loss_curve"], rtol=LOSS_RTOL)


@pytest.mark.parametrize(
    "backend, module", [("ort", "edge_runtime.backends.ort"), ("torch", "edge_runtime.backends.pytorch")]
)
def test_a_graph_on_mallocs_heap_gives_its_free_pages_back_after_each_micro_batch(
    tiny_bundle, tmp_path, monkeypatch, backend, module
):
    calls = []
    monkeypatch.setattr(importlib.import_module(module), "give_back_free_heap", lambda: calls.append(1))
    metrics = _train(tiny_bundle, tmp_path / "r", steps=3, backend=backend)  # no recomputation: no ORT arena
    assert len(calls) == 3 * metrics["batch_size"] // metrics["micro_batch"]


def test_a_budget_too_small_stops_before_training(tiny_bundle, tmp_path, capsys):
    with pytest.raises(BudgetError, match="budget is 10 MiB"):
        _train(tiny_bundle, tmp_path / "r", steps=2, budget_bytes=10 * 2**20)
    assert not (tmp_path / "r").exists()


def test_a_bad_data_line_stops_before_training(tiny_bundle, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine", "label": "positive"}\n{"text": 3}\n')
    command = [
        "train",
        str(tiny_bundle["bundle"]),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "r"),
        "--trust",
        str(tiny_bundle["trust"]),
        "--quiet",
    ]
    assert edge(command) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_an_unknown_label_stops_before_training(tiny_bundle, tmp_path):
    data = tmp_path / "odd.jsonl"
    data.write_text('{"text": "fine", "label": "neutral"}\n')
    with pytest.raises(Exception, match=r"labels \['neutral'\] are not among the bundle's labels"):
        train_bundle(tiny_bundle["bundle"], data, tmp_path / "r", tiny_bundle["trust"], TrainOptions(progress=False))


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_adapter(tiny_bundle, tmp_path, backend):
    common = [
        "--trust",
        str(tiny_bundle["trust"]),
        "--steps",
        "300",
        "--checkpoint-every",
        "5",
        "--backend",
        backend,
        "--threads",
        "1",
        "--quiet",
    ]
    train = [
        sys.executable,
        "-m",
        "edge_runtime.cli",
        "train",
        str(tiny_bundle["bundle"]),
        "--data",
        str(tiny_bundle["data"]),
    ]
    subprocess.run([*train, "--out", str(tmp_path / "whole"), *common], check=True, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen([*train, "--out", str(killed), *common], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(killed.glob("checkpoint-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.kill()  # SIGKILL: no handler runs, like a power cut
    process.wait()
    assert not (killed / "metrics.json").exists(), "training finished before it could be killed"
    subprocess.run([*train, "--out", str(killed), *common], check=True, capture_output=True)

    metrics = json.loads((killed / "metrics.json").read_text())
    assert 5 <= metrics["resumed_from_step"] < 300 and metrics["steps"] == 300
    whole, resumed = (
        load_file(str(tmp_path / "whole" / "adapter.safetensors")),
        load_file(str(killed / "adapter.safetensors")),
    )
    assert_same_adapter(resumed, whole)


def test_a_bundle_without_the_requested_backend_says_how_to_get_it(tmp_path):
    bundle = make_bundle(tmp_path, "torch")
    with pytest.raises(Exception, match="exported for \\['torch'\\] only; export it with --backends ort"):
        _train(bundle, tmp_path / "r", steps=1, backend="ort")


def test_ort_training_runs_where_torch_is_not_installed(tiny_bundle, tmp_path):
    # onnxruntime-training 1.19.2's own package __init__ imports torch; the backend must not need it.
    command = [
        sys.executable,
        "-m",
        "tests.without_torch",
        "edge_runtime.cli",
        "train",
        str(tiny_bundle["bundle"]),
        "--data",
        str(tiny_bundle["data"]),
        "--out",
        str(tmp_path / "r"),
        "--trust",
        str(tiny_bundle["trust"]),
        "--steps",
        "3",
        "--backend",
        "ort",
        "--quiet",
    ]
    finished = subprocess.run(command, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["steps"] == 3
    command[command.index("ort")] = "torch"
    finished = subprocess.run(command, capture_output=True, text=True)
    assert finished.returncode == 2 and "backend 'torch' is not installed here" in finished.stderr


def test_a_language_model_bundle_trains_the_same_on_both_backends(tmp_path):
    bundle = make_bundle(tmp_path, "ort,torch", "--task", "language-model")
    ort = _train(bundle, tmp_path / "ort", steps=8, backend="ort")
    torch = _train(bundle, tmp_path / "torch", steps=8, backend="torch")
    np.testing.assert_allclose(ort["loss_curve"], torch["loss_curve"], rtol=LOSS_RTOL)
    assert ort["final_loss"] < ort["first_loss"]
