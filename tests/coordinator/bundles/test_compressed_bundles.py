"""Every emulator recipe through the device path (export → ORT and PyTorch training), and the privacy–utility
comparison of `coordinator evaluate` with several recipes."""

import json
import random

import numpy as np
import pytest
from onnxruntime.training.api import CheckpointState
from safetensors.numpy import load_file

from coordinator.cli import main as coordinator
from coordinator.datasets import write_jsonl
from edge_runtime.data import Example
from edge_runtime.frozen_inputs import FROZEN_FILE
from edge_runtime.manifest import Manifest
from edge_runtime.records import to_dict
from edge_runtime.trainer import TrainOptions, train_bundle
from tests.conftest import WORDS, make_bundle, sentiment_examples


def public_text(path):
    rng = random.Random(1)
    write_jsonl(path, [Example(" ".join(rng.choice(WORDS) for _ in range(64))) for _ in range(40)])
    return path


@pytest.mark.parametrize(
    "recipe",
    ["importance", "greedy", "share", "luc:size=0.3", "lowrank:size=0.5", "uniform:distill=3", "uniform:harmonize=4"],
)
def test_each_recipe_exports_a_bundle_that_both_backends_train_alike(tmp_path, recipe):
    public = public_text(tmp_path / "public.jsonl")
    bundle = make_bundle(tmp_path, "ort,torch", "--keep", "3", "--emulator", recipe, "--calibration", str(public))
    manifest = Manifest.from_json((bundle["bundle"] / "manifest.json").read_bytes())
    emulator, check = manifest.emulator, manifest.export_check
    assert emulator.recipe == recipe.split(":")[0] and len(set(emulator.layer_map)) == 5
    assert len(emulator.layer_map) == (6 if recipe == "share" else 5)  # share runs a kept layer in every position
    assert emulator.details["calibration"]["source"] == "public.jsonl"
    assert check is not None and check["logits_max_abs_diff"] <= 1e-4 * max(1, check["logits_max_abs"])
    curves = {}
    for backend in ("ort", "torch"):
        options = TrainOptions(steps=8, backend=backend, progress=False, threads=1)
        metrics = train_bundle(bundle["bundle"], bundle["data"], tmp_path / backend, bundle["trust"], options)
        assert metrics["emulator"] == to_dict(emulator)
        curves[backend] = metrics["loss_curve"]
    np.testing.assert_allclose(curves["ort"], curves["torch"], rtol=1e-3)
    assert curves["ort"][-1] < curves["ort"][0]


def evaluate_command(tmp_path, steps: int) -> list[str]:
    """`coordinator evaluate` on a tiny model with a 1+1 adapter and 16 test sentences; recipes come after."""
    bundle = make_bundle(tmp_path, "torch")
    write_jsonl(tmp_path / "test.jsonl", sentiment_examples(16, seed=5))
    command = ["evaluate", "--model", str(bundle["model"]), "--train", str(bundle["data"])]
    return [*command, "--test", str(tmp_path / "test.jsonl"), "--adapter-layers", "1,1", "--steps", str(steps)]


def test_evaluate_with_several_recipes_prints_the_privacy_utility_table_and_plots_it(tmp_path, capsys):
    out = tmp_path / "tradeoff.json"
    command = [*evaluate_command(tmp_path, steps=3), "--batch-size", "4"]
    command += [
        "--emulator",
        "uniform:keep=2",
        "--emulator",
        "luc:keep=4,size=0.25",
        "--emulator",
        "lowrank:energy=0.8",
    ]
    command += ["--keep", "4", "--calibration", str(public_text(tmp_path / "public.jsonl")), "--out", str(out)]
    assert coordinator(command) == 0
    results = json.loads(out.read_text())
    rows = results["recipes"]
    assert [row["emulator"]["spec"] for row in rows] == [
        "uniform:keep=2",
        "luc:keep=4,size=0.25",
        "lowrank:keep=4,energy=0.8",
    ]
    assert rows[0]["emulator"]["middle_fraction"] == 0.5 and rows[1]["emulator"]["middle_fraction"] <= 0.25
    for row in rows:
        assert row["gap"] == pytest.approx(row["offsite_plugin"]["accuracy"] - row["emulator_zero_shot"]["accuracy"])
    table = capsys.readouterr().out
    assert "luc:keep=4,size=0.25" in table and "plug-in" in table and "full model zero-shot" in table
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_a_comparison_with_validation_and_finetune_chooses_checkpoints_on_data_it_never_tests_on(tmp_path, capsys):
    out = tmp_path / "utility.json"
    command = [*evaluate_command(tmp_path, steps=4), "--batch-size", "4"]
    command += [
        "--emulator",
        "uniform:keep=2",
        "--emulator",
        "greedy:keep=2",
        "--validation",
        "8",
        "--check-every",
        "2",
    ]
    command += ["--finetune", "--calibration", str(public_text(tmp_path / "public.jsonl")), "--out", str(out)]
    assert coordinator(command) == 0
    results = json.loads(out.read_text())
    assert results["config"]["validation_examples"] == 8
    for trained in [results["full_finetune"], *(row["offsite_emulator"] for row in results["recipes"])]:
        assert [step for step, _ in trained["train"]["selection"]["validation_curve"]] == [0, 2, 4]
    assert results["recipes"][1]["emulator"]["spec"] == "greedy:keep=2"
    assert "full fine-tune:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("recipe", "extra"),
    [("uniform:store=int8", []), ("luc:size=0.3,store=int8", ["--recompute"]), ("uniform", ["--recompute"])],
)
def test_int8_storage_and_recomputation_train_alike_on_both_backends(tmp_path, recipe, extra):
    public = public_text(tmp_path / "public.jsonl")
    options = ["--keep", "3", "--emulator", recipe, "--calibration", str(public), *extra]
    bundle = make_bundle(tmp_path, "ort,torch", *options)
    manifest = Manifest.from_json((bundle["bundle"] / "manifest.json").read_bytes())
    shape = manifest.plan.shape
    assert shape.recompute_layers == bool(extra)
    assert (shape.quantized_parameters > 0) == ("store=int8" in recipe)
    assert manifest.export_check["gradient_relative_diff"] <= manifest.export_check["gradient_tolerance"]
    state = CheckpointState.load_checkpoint(str(bundle["bundle"] / "ort" / "checkpoint"))
    dtypes = {name: parameter.data.dtype for name, parameter in state.parameters}
    assert dtypes == dict.fromkeys(manifest.adapter.parameters, np.dtype("float32"))  # what trains, and only that
    frozen = load_file(str(bundle["bundle"] / "ort" / FROZEN_FILE))
    assert (np.dtype("int8") in {array.dtype for array in frozen.values()}) == ("store=int8" in recipe)
    curves = {}
    for backend in ("ort", "torch"):
        options = TrainOptions(steps=8, backend=backend, progress=False, threads=1)
        metrics = train_bundle(bundle["bundle"], bundle["data"], tmp_path / backend, bundle["trust"], options)
        curves[backend] = metrics["loss_curve"]
    np.testing.assert_allclose(curves["ort"], curves["torch"], rtol=1e-3)
    assert curves["ort"][-1] < curves["ort"][0]
