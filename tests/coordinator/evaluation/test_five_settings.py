"""The five-setting run on a tiny model: all settings measured, the loaded model left as it was, report files."""

import json

import pytest
import torch

from coordinator.adapters.files import load_adapter
from coordinator.emulator import Split
from coordinator.evaluation.five_settings import SETTINGS, Experiment, run_five_settings
from coordinator.evaluation.report import format_table, write_results
from coordinator.models import LoadedModel
from coordinator.tasks import ClassificationTask
from coordinator.train import TrainConfig
from tests.conftest import make_model, sentiment_examples


def _run(tokenizer, tmp_path, split, adapter="layers", dp=None):
    model = make_model("llama", vocab_size=len(tokenizer))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    loaded = LoadedModel("tiny-llama", model, tokenizer, tmp_path)
    task = ClassificationTask(tokenizer, {"negative": " negative", "positive": " positive"})
    training = TrainConfig(steps=40, batch_size=8, lr=1e-2)
    full = TrainConfig(steps=40, batch_size=8, lr=3e-3)
    experiment = Experiment(split, training, full, eval_batch_size=8, adapter=adapter, dp=dp)
    results = run_five_settings(
        loaded,
        task,
        sentiment_examples(64),
        sentiment_examples(32, seed=3),
        experiment,
        tmp_path / "adapter.safetensors",
    )
    assert model.state_dict().keys() == before.keys()  # no LoRA branch or added bias left behind
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed"
    return results


def test_five_settings_are_measured_and_the_model_is_left_unchanged(tokenizer, tmp_path):
    results = _run(tokenizer, tmp_path, Split(2, 2, keep=2))
    for key, _ in SETTINGS:
        assert 0.0 <= results[key]["accuracy"] <= 1.0
    assert results["offsite_emulator"]["accuracy"] >= 0.9  # the toy task is learnable through the emulator
    assert results["full_finetune"]["accuracy"] >= 0.9
    assert results["config"]["emulator_layers"] == [0, 1, 2, 3, 4, 5]  # 6 layers, 2+2 adapter, keep both middle
    weights, metadata = load_adapter(tmp_path / "adapter.safetensors")
    assert metadata == {"model": "tiny-llama", "bottom": 2, "top": 2}
    assert sorted({int(name.split(".")[2]) for name in weights}) == [0, 1, 4, 5]
    assert results["offsite_emulator"]["train"]["trainable_parameters"] == sum(w.numel() for w in weights.values())


@pytest.mark.parametrize("adapter", ["bias", "lora:r=4"])
def test_the_offsite_adapter_trains_with_dp_sgd_as_a_dp_bundle_would(tokenizer, tmp_path, adapter):
    from edge_runtime.manifest import DPTarget
    from edge_runtime.privacy import epsilon_spent

    results = _run(tokenizer, tmp_path, Split(2, 2, keep=2), adapter, DPTarget(8.0, 1e-5, 1.0))
    privacy = results["offsite_emulator"]["train"]["privacy"]
    assert privacy["steps"] == 40 and privacy["sampling_rate"] == 8 / 64 and privacy["target_epsilon"] == 8.0
    assert 0 < privacy["epsilon"] <= 8.0
    assert privacy["epsilon"] == pytest.approx(epsilon_spent(privacy["noise_multiplier"], 8 / 64, 40, 1e-5), rel=1e-4)
    assert 0.0 <= results["offsite_plugin"]["accuracy"] <= 1.0


def test_without_a_drop_the_emulator_scores_as_the_full_model(tokenizer, tmp_path):
    results = _run(tokenizer, tmp_path, Split(1, 1, keep=4))
    assert results["emulator_zero_shot"]["accuracy"] == results["full_zero_shot"]["accuracy"]
    # no drop: the emulator is the full model, so plugging its adapter back in scores exactly as on the emulator
    assert results["offsite_plugin"]["accuracy"] == results["offsite_emulator"]["accuracy"]


def test_results_are_written_as_json_table_and_png(tokenizer, tmp_path):
    results = _run(tokenizer, tmp_path, Split(2, 2, keep=2))
    chart = write_results(results, tmp_path / "out" / "results.json")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {key for key, _ in SETTINGS} <= saved.keys()
    assert saved["config"]["adapter_layers"] == [2, 2]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(results)
    for _, title in SETTINGS:
        assert title in table
    assert f"{100 * results['offsite_plugin']['accuracy']:5.1f} %" in table


@pytest.mark.parametrize("adapter", ["lora:r=4,alpha=8", "bias"])
def test_each_kind_plugs_in_as_it_trained_when_nothing_is_dropped(tokenizer, tmp_path, adapter):
    results = _run(tokenizer, tmp_path, Split(1, 1, keep=4), adapter)
    assert results["offsite_plugin"]["accuracy"] == results["offsite_emulator"]["accuracy"]
    assert results["emulator"]["adapter_kind"] == adapter
    weights, _ = load_adapter(tmp_path / "adapter.safetensors")
    suffixes = {name.rsplit(".", 1)[-1] for name in weights}
    assert suffixes == ({"lora_A", "lora_B"} if adapter.startswith("lora") else {"bias"})
