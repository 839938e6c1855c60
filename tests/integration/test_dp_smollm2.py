"""Differentially private training of SmolLM2 on a device: a `--dp` bundle of bias terms, trained with the CLI in
its own process on the real sentiment data, reports an ε within the one asked, and plugs into the full model."""

import json
import subprocess
import sys

import pytest

from coordinator.cli import main as coordinator
from coordinator.datasets import dataset_path, prepare_datasets
from edge_runtime.privacy import epsilon_spent

pytestmark = pytest.mark.integration


def test_a_dp_bias_bundle_of_smollm2_trains_within_its_epsilon(tmp_path):
    prepare_datasets()
    assert coordinator(["keys", "init", "--out", str(tmp_path / "keys")]) == 0
    key, trust = tmp_path / "keys" / "coordinator.key", tmp_path / "keys" / "coordinator.pub"
    export = ["export", "--model", "smollm2-135m", "--profile", "jetson-orin-nano-8gb", "--adapter-kind", "bias"]
    dp = ["--dp", "epsilon=3,delta=1e-5,clip=1.0", "--steps", "400"]
    assert coordinator([*export, *dp, "--key", str(key), "--out", str(tmp_path / "bundle")]) == 0
    train = ["train", str(tmp_path / "bundle"), "--data", str(dataset_path("sentiment", "train"))]
    command = [*train, "--out", str(tmp_path / "result"), "--trust", str(trust), "--steps", "3", "--quiet"]
    trained = subprocess.run([sys.executable, "-m", "edge_runtime.cli", *command], capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr
    metrics = json.loads((tmp_path / "result" / "metrics.json").read_text())
    privacy = metrics["privacy"]
    assert metrics["backend"] == "torch" and privacy["accountant"] == "rdp" and privacy["steps"] == 3
    assert 0 < privacy["epsilon"] <= 3.0  # 3 steps, with the noise set for them on 8,537 reviews
    rate = privacy["sampling_rate"]
    assert rate == pytest.approx(8 / metrics["examples"], rel=1e-5)
    assert privacy["epsilon"] == pytest.approx(epsilon_spent(privacy["noise_multiplier"], rate, 3, 1e-5), rel=1e-4)
    plug = ["plug", "--model", "smollm2-135m", "--adapter", str(tmp_path / "result"), "--out", str(tmp_path / "tuned")]
    assert coordinator(plug) == 0
