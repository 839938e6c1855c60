"""A LoRA bundle of SmolLM2 for a Jetson (PyTorch backend) and a laptop (ONNX Runtime), trained as a device
would (the CLI, in its own process), then merged into the full model with `coordinator plug`."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from coordinator.cli import main as coordinator
from coordinator.datasets import dataset_path, prepare_datasets
from coordinator.models import load_model
from tests.integration.device import edge_runtime

pytestmark = pytest.mark.integration
ADAPTER = ["--adapter-kind", "lora:r=8"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    prepare_datasets()
    root = tmp_path_factory.mktemp("lora-keys")
    assert coordinator(["keys", "init", "--out", str(root)]) == 0
    return root / "coordinator.key", root / "coordinator.pub"


@pytest.mark.parametrize(("profile", "backend"), [("jetson-orin-nano-8gb", "torch"), ("laptop-16gb", "ort")])
def test_a_lora_bundle_verifies_trains_and_plugs_in(keys, tmp_path, profile, backend):
    key, trust = keys
    export = ["export", "--model", "smollm2-135m", "--profile", profile, *ADAPTER, "--backends", backend]
    assert coordinator([*export, "--key", str(key), "--out", str(tmp_path / "bundle")]) == 0
    verified = edge_runtime("verify", str(tmp_path / "bundle"), "--trust", str(trust))
    assert verified.returncode == 0 and "adapter lora (61,440 parameters)" in verified.stdout, verified.stderr
    train = ["train", str(tmp_path / "bundle"), "--data", str(dataset_path("sentiment", "train"))]
    trained = edge_runtime(*train, "--out", str(tmp_path / "result"), "--trust", str(trust), "--steps", "3", "--quiet")
    assert trained.returncode == 0, trained.stderr
    metrics = json.loads((tmp_path / "result" / "metrics.json").read_text())
    assert metrics["backend"] == backend and metrics["adapter_kind"] == "lora" and metrics["steps"] == 3
    assert (tmp_path / "result" / "adapter.safetensors").stat().st_size < 500_000  # 61 k float32 values

    plug = ["plug", "--model", "smollm2-135m", "--adapter", str(tmp_path / "result"), "--out", str(tmp_path / "tuned")]
    assert coordinator(plug) == 0
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned").eval()
    full = load_model("smollm2-135m").model
    assert tuned.state_dict().keys() == full.state_dict().keys()  # merged: a plain model, no LoRA modules
    with torch.no_grad():
        moved = (tuned.model.layers[0].self_attn.q_proj.weight - full.model.layers[0].self_attn.q_proj.weight).abs()
    assert 0 < float(moved.max()) < 0.1  # three small steps moved the merged weights, and only a little
    assert torch.equal(tuned.model.layers[5].self_attn.q_proj.weight, full.model.layers[5].self_attn.q_proj.weight)
