"""SmolLM2 bundles: export for a laptop (ORT + PyTorch), verify, train on the device path, encode as the coordinator."""

import shutil

import numpy as np
import pytest

from coordinator.cli import main as coordinator
from coordinator.datasets import dataset_path, prepare_datasets
from coordinator.models import load_model
from coordinator.tasks import ClassificationTask
from edge_runtime.bundle import TOKENIZER_FILE, verify_bundle
from edge_runtime.data import load_examples
from edge_runtime.manifest import Manifest
from edge_runtime.text import TaskEncoder
from edge_runtime.trainer import TrainOptions, train_bundle

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    prepare_datasets()
    root = tmp_path_factory.mktemp("smollm2-bundle")
    assert coordinator(["keys", "init", "--out", str(root / "keys")]) == 0
    command = [
        "export",
        "--model",
        "smollm2-135m",
        "--profile",
        "laptop-16gb",
        "--backends",
        "ort,torch",
        "--key",
        str(root / "keys" / "coordinator.key"),
        "--out",
        str(root / "bundle"),
    ]
    assert coordinator(command) == 0
    yield root / "bundle", root / "keys" / "coordinator.pub"
    shutil.rmtree(root)  # 1 GB: gone before the next module writes its own


def test_the_bundle_verifies_and_its_export_matches_pytorch(bundle):
    manifest = verify_bundle(*bundle)
    check = manifest.export_check
    assert check is not None and check["logits_max_abs_diff"] <= check["logits_tolerance"] * check["logits_max_abs"]
    # The default recipe: greedy removes SmolLM2's four middle layers whose removal moves predictions least, and a
    # rank-64 harmonizer runs in place of each removed run (layer 14; layers 16-18).
    assert manifest.emulator.options == {"recipe": "greedy", "keep": 22, "harmonize": 64}
    assert manifest.emulator.layer_map == [*range(14), 15, *range(19, 30)]
    assert manifest.plan.micro_batch == 8  # a 10 GB laptop budget holds the whole batch


def test_the_device_encodes_reviews_exactly_as_the_coordinator(bundle):
    manifest = Manifest.from_json((bundle[0] / "manifest.json").read_bytes())
    device = TaskEncoder(bundle[0] / TOKENIZER_FILE, manifest.task)
    task = ClassificationTask(load_model("smollm2-135m").tokenizer, manifest.task.label_words)
    examples = load_examples(dataset_path("sentiment", "test"))[:300]
    coordinator_rows = [task.encode(example)[0] for example in examples]
    assert [ids for ids, _ in device.rows(examples)] == coordinator_rows


def test_ort_and_torch_train_the_same_steps_on_smollm2(bundle, tmp_path):
    data = dataset_path("sentiment", "train")
    losses = {}
    for backend in ("ort", "torch"):
        options = TrainOptions(steps=4, backend=backend, progress=False)
        losses[backend] = train_bundle(bundle[0], data, tmp_path / backend, bundle[1], options)["loss_curve"]
    np.testing.assert_allclose(losses["ort"][0], losses["torch"][0], rtol=1e-5)  # the same forward pass
    # AdamW's first updates are ±lr wherever a gradient is non-zero, so float-level gradient differences between
    # the backends show up at lr 1e-4 as a fraction of a percent in the next losses; a wrong update would not.
    np.testing.assert_allclose(losses["ort"], losses["torch"], rtol=1e-2)


def test_jetson_plan_uses_the_torch_backend(capsys):
    assert coordinator(["plan", "--model", "smollm2-135m", "--profile", "jetson-orin"]) == 0
    assert "profile jetson-orin-nano-8gb" in capsys.readouterr().out


def test_an_int8_recomputing_smollm2_bundle_is_smaller_and_both_backends_train_it_alike(tmp_path):
    prepare_datasets()
    assert coordinator(["keys", "init", "--out", str(tmp_path / "keys")]) == 0
    out = tmp_path / "bundle"
    command = ["export", "--model", "smollm2-135m", "--profile", "laptop-16gb", "--backends", "ort,torch"]
    command += ["--keep", "8", "--emulator", "uniform:store=int8", "--recompute"]
    assert coordinator([*command, "--key", str(tmp_path / "keys" / "coordinator.key"), "--out", str(out)]) == 0
    manifest = verify_bundle(out, tmp_path / "keys" / "coordinator.pub")
    check, storage = manifest.export_check, manifest.emulator.details["storage"]
    assert check["gradient_relative_diff"] <= check["gradient_tolerance"]
    # 56.6 M frozen weights at one byte and 14.2 M adapter-layer weights at four, against all at four
    assert storage["stored_bytes"] < 0.42 * storage["float32_bytes"]
    assert (out / "ort" / "checkpoint").stat().st_size < 0.42 * storage["float32_bytes"]
    data = dataset_path("sentiment", "train")
    losses = {}
    for backend in ("ort", "torch"):
        options = TrainOptions(steps=4, backend=backend, progress=False)
        losses[backend] = train_bundle(out, data, tmp_path / backend, tmp_path / "keys" / "coordinator.pub", options)
    np.testing.assert_allclose(losses["ort"]["loss_curve"], losses["torch"]["loss_curve"], rtol=1e-2)
    assert all(run["peak_memory_bytes"] <= run["budget_bytes"] for run in losses.values())
