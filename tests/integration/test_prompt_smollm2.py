"""A soft-prompt bundle of SmolLM2 trained as a device would (the CLI, in its own process) on ONNX Runtime, then
saved with the full model by `coordinator plug` and loaded back with its prompt."""

import json

import pytest
import torch
from safetensors.torch import load_file

from coordinator.cli import main as coordinator
from coordinator.datasets import dataset_path, prepare_datasets
from coordinator.models import load_model
from tests.integration.device import edge_runtime

pytestmark = pytest.mark.integration


def test_a_prompt_bundle_verifies_trains_and_plugs_in_with_its_prompt(tmp_path):
    prepare_datasets()
    assert coordinator(["keys", "init", "--out", str(tmp_path / "keys")]) == 0
    key, trust = tmp_path / "keys" / "coordinator.key", tmp_path / "keys" / "coordinator.pub"
    export = ["export", "--model", "smollm2-135m", "--profile", "laptop-16gb", "--adapter-kind", "prompt:tokens=20"]
    assert coordinator([*export, "--backends", "ort", "--key", str(key), "--out", str(tmp_path / "bundle")]) == 0
    verified = edge_runtime("verify", str(tmp_path / "bundle"), "--trust", str(trust))
    assert verified.returncode == 0 and "adapter prompt (11,520 parameters)" in verified.stdout, verified.stderr
    train = ["train", str(tmp_path / "bundle"), "--data", str(dataset_path("sentiment", "train"))]
    trained = edge_runtime(*train, "--out", str(tmp_path / "result"), "--trust", str(trust), "--steps", "3", "--quiet")
    assert trained.returncode == 0, trained.stderr
    metrics = json.loads((tmp_path / "result" / "metrics.json").read_text())
    assert metrics["adapter_kind"] == "prompt" and metrics["adapter_options"]["tokens"] == 20
    prompt = load_file(str(tmp_path / "result" / "adapter.safetensors"))["model.soft_prompt"]
    start = load_file(str(tmp_path / "bundle" / "adapter.safetensors"))["model.soft_prompt"]
    assert prompt.shape == (20, 576) and not torch.equal(prompt, start)

    plug = ["plug", "--model", "smollm2-135m", "--adapter", str(tmp_path / "result"), "--out", str(tmp_path / "tuned")]
    assert coordinator(plug) == 0
    tuned = load_model(str(tmp_path / "tuned")).model  # the project's loader attaches the saved prompt again
    torch.testing.assert_close(tuned.model.soft_prompt.detach(), prompt)
    full = load_model("smollm2-135m")
    ids = full.tokenizer("Review: a fine film.\nSentiment:", return_tensors="pt").input_ids
    with torch.no_grad():
        with_prompt = tuned(input_ids=ids).logits
        texted = full.model(inputs_embeds=torch.cat([prompt[None], full.model.model.embed_tokens(ids)], 1)).logits
    torch.testing.assert_close(with_prompt, texted[:, 20:], rtol=1e-4, atol=1e-4)
