"""A split job's device bundle: signed and verified as any bundle, it holds the first layers only (ONNX graphs, a
PyTorch backbone, or both) that give the coordinator's device side's cut, its plan counts no head, and it refuses
to train without its server or with less than its whole batch."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from coordinator.bundles.request import BundleRequest
from coordinator.models import load_model
from coordinator.split.bundle import export_split_bundle, split_sides
from coordinator.split.job import SplitJob
from coordinator.train import TrainConfig
from device_profiles import load_profile
from edge_runtime.backends.split_ort import OrtCutSide
from edge_runtime.backends.split_torch import TorchCutSide
from edge_runtime.bundle import ORT_DIRECTORY, TORCH_DIRECTORY, BundleError, verify_bundle
from edge_runtime.errors import ConfigError
from edge_runtime.memory import BudgetError, estimate
from edge_runtime.trainer import PLAN_MARGIN, TrainOptions, train_bundle
from exporters.bundle import load_private_key

REQUEST = BundleRequest(adapter_kind="prompt:tokens=3", training=TrainConfig(8, 1e-2, batch_size=8, max_length=32))


@pytest.fixture(scope="module")
def split_bundle(tiny_bundle, tmp_path_factory):
    loaded = load_model(str(tiny_bundle["model"]))
    request = replace(REQUEST, model=str(tiny_bundle["model"]), backends=("ort", "torch"))
    out = tmp_path_factory.mktemp("split") / "bundle"
    key = load_private_key(tiny_bundle["key"])
    export_split_bundle(loaded, request, SplitJob(2, prune_fraction=0.25), load_profile("laptop-16gb"), out, key)
    return out, loaded, request


def test_the_split_bundle_is_signed_holds_the_first_layers_and_gives_the_device_sides_cut(split_bundle, tiny_bundle):
    out, loaded, request = split_bundle
    manifest = verify_bundle(out, tiny_bundle["trust"])
    assert manifest.split is not None
    assert (manifest.split.cut_after, manifest.split.prompt_tokens, manifest.split.positions) == (2, 3, 35)
    assert manifest.split.prune_fraction == 0.25 and manifest.backends == ["ort", "torch"]
    assert manifest.adapter.kind == "prompt" and manifest.emulator.layer_map == [0, 1]
    assert manifest.plan.predicted["logits"] == 0 and manifest.plan.micro_batch == 8  # no head on the device
    assert manifest.plan.shape.layers == 2 and manifest.plan.shape.trainable_parameters == 3 * 32

    device, _ = split_sides(loaded, request, SplitJob(2))
    ids = torch.randint(0, loaded.model.config.vocab_size, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = device(ids, mask).hidden.numpy()
    prompt = device.soft_prompt.detach().numpy()
    optimizer = manifest.training.optimizer
    sides = [OrtCutSide(out / ORT_DIRECTORY), TorchCutSide(out / TORCH_DIRECTORY, "norm", prompt, optimizer)]
    for side in sides:
        np.testing.assert_allclose(side.cut(ids.numpy(), mask.numpy()), expected, rtol=1e-4, atol=1e-4)

    (out / ORT_DIRECTORY / "eval_model.onnx").write_bytes(b"changed")
    with pytest.raises(BundleError, match="does not match the manifest"):
        verify_bundle(out, tiny_bundle["trust"])


def test_a_split_bundle_trains_only_against_its_server_and_with_its_whole_batch(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    request = replace(REQUEST, model=str(tiny_bundle["model"]))
    key = load_private_key(tiny_bundle["key"])
    export_split_bundle(load_model(str(tiny_bundle["model"])), request, SplitJob(2), load_profile("jetson-orin"),
                        bundle, key)  # fmt: skip
    manifest = verify_bundle(bundle, tiny_bundle["trust"])
    assert manifest.backends == ["torch"]  # the profile's backend
    assert not (bundle / ORT_DIRECTORY).exists()
    with pytest.raises(ConfigError, match="edge-runtime run"):
        train_bundle(bundle, tiny_bundle["data"], tmp_path / "out", tiny_bundle["trust"], TrainOptions(progress=False))
    one_row = estimate(manifest.plan.shape, 1, 32, "classification", "torch").total  # of 32 tokens: more than any
    with pytest.raises(BudgetError, match="whole batch of 8"):
        train_bundle(bundle, tiny_bundle["data"], tmp_path / "out", tiny_bundle["trust"],
                     TrainOptions(budget_bytes=int(one_row * (1 + PLAN_MARGIN)) + 1, progress=False))  # fmt: skip


def test_a_split_job_refuses_a_request_its_device_side_cannot_train(tiny_bundle):
    loaded = load_model(str(tiny_bundle["model"]))
    with pytest.raises(ConfigError, match="soft prompt"):
        split_sides(loaded, replace(REQUEST, adapter_kind="lora:r=2"), SplitJob(2))
    with pytest.raises(ConfigError, match="must leave layers on both sides"):
        split_sides(loaded, REQUEST, SplitJob(6))
