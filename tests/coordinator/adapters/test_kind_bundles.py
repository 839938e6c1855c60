"""LoRA, bias and soft-prompt bundles end to end on tiny models: export, both backends alike, resume, plug-in."""

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from coordinator.adapters import adapter_kind_of, plugged_in
from coordinator.adapters.files import load_adapter
from coordinator.cli import main as coordinator
from edge_runtime.bundle import verify_bundle
from edge_runtime.low_rank import load_causal_lm
from edge_runtime.trainer import TrainOptions, train_bundle
from tests.conftest import assert_same_adapter, make_bundle

KINDS = {"lora:r=4,alpha=8": "lora", "bias": "bias", "prompt:tokens=4": "prompt"}
SUFFIXES = {"lora": {"lora_A", "lora_B"}, "bias": {"bias"}, "prompt": {"soft_prompt"}}


@pytest.mark.parametrize("text", list(KINDS))
def test_a_kind_exports_trains_alike_on_both_backends_and_plugs_in(tmp_path, capsys, text):
    paths = make_bundle(tmp_path, "ort,torch", "--adapter-kind", text)
    manifest = verify_bundle(paths["bundle"], paths["trust"])
    assert manifest.adapter.kind == KINDS[text]
    suffixes = {name.rsplit(".", 1)[-1] for name in manifest.adapter.parameters.values()}
    assert suffixes == SUFFIXES[KINDS[text]]
    assert manifest.adapter.count == manifest.plan.shape.trainable_parameters
    curves, results = {}, {}
    for backend in ("ort", "torch"):
        options = TrainOptions(steps=6, backend=backend, progress=False, threads=1)
        metrics = train_bundle(paths["bundle"], paths["data"], tmp_path / backend, paths["trust"], options)
        curves[backend], results[backend] = (
            metrics["loss_curve"],
            load_file(str(tmp_path / backend / "adapter.safetensors")),
        )
        assert metrics["adapter_kind"] == KINDS[text]
    np.testing.assert_allclose(curves["ort"], curves["torch"], rtol=1e-4)
    assert set(results["ort"]) == set(manifest.adapter.parameters.values()) == set(results["torch"])
    initial = load_file(str(paths["bundle"] / "adapter.safetensors"))
    for backend in ("ort", "torch"):  # each trained every tensor of its kind (weights: see assert_same_adapter)
        assert all(not np.array_equal(results[backend][name], initial[name]) for name in initial), backend

    assert (
        coordinator(
            [
                "plug",
                "--model",
                str(paths["model"]),
                "--adapter",
                str(tmp_path / "ort"),
                "--out",
                str(tmp_path / "tuned"),
            ]
        )
        == 0
    )
    if KINDS[text] == "prompt":
        gguf = ["plug", "--model", str(paths["model"]), "--adapter", str(tmp_path / "ort"), "--gguf", "p.gguf"]
        assert coordinator(gguf) == 2
        assert "a soft prompt has no GGUF form" in capsys.readouterr().err  # before the model's source is looked for
    tuned = load_causal_lm(tmp_path / "tuned")  # a soft prompt is saved with the model; this loader attaches it
    full = AutoModelForCausalLM.from_pretrained(paths["model"]).eval()
    weights, _ = load_adapter(tmp_path / "ort" / "adapter.safetensors")
    ids = torch.randint(0, full.config.vocab_size, (2, 9))
    with torch.no_grad(), plugged_in(adapter_kind_of(KINDS[text], manifest.adapter.options), full, weights, 1, 1):
        expected = full(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(tuned(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_lora_run_cut_and_resumed_ends_where_an_unbroken_one_does(tmp_path):
    paths = make_bundle(tmp_path, "ort,torch", "--adapter-kind", "lora:r=4")
    for backend in ("ort", "torch"):
        options = TrainOptions(steps=8, backend=backend, progress=False, threads=1, checkpoint_every=3)
        whole = train_bundle(paths["bundle"], paths["data"], tmp_path / f"whole-{backend}", paths["trust"], options)

        def power_cut(event):
            if event["step"] == 5:
                raise KeyboardInterrupt

        cut = tmp_path / f"cut-{backend}"
        with pytest.raises(KeyboardInterrupt):
            train_bundle(paths["bundle"], paths["data"], cut, paths["trust"], options, on_step=power_cut)
        resumed = train_bundle(paths["bundle"], paths["data"], cut, paths["trust"], options)
        assert resumed["resumed_from_step"] == 3
        np.testing.assert_allclose(resumed["loss_curve"], whole["loss_curve"], rtol=1e-5)
        one, two = (load_file(str(path / "adapter.safetensors")) for path in (tmp_path / f"whole-{backend}", cut))
        assert_same_adapter(two, one)


def test_layer_windows_take_whole_layers_only(tmp_path, capsys):
    with pytest.raises(AssertionError):
        make_bundle(tmp_path, "ort", "--adapter-kind", "bias", "--layer-window", "1")
    assert "--layer-window trains whole layers" in capsys.readouterr().err
