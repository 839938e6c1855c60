"""SmolLM2 tuned through a LoRA bundle, written as GGUF by `coordinator plug`, and run by llama.cpp: the label-word
logits match PyTorch's plugged-in model, the GGUF LoRA applied to the base GGUF matches too, generation writes
text, and bad files or a wrong base model are refused before anything is written."""

import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from coordinator.cli import main as coordinator
from coordinator.datasets import dataset_path, prepare_datasets
from coordinator.evaluation.gguf_score import complete, label_logits, open_gguf, perplexity
from coordinator.models import gguf_tokenizer, load_model, packaged_gguf_path
from coordinator.tasks import make_task
from edge_runtime.data import load_examples
from tests.integration.device import edge_runtime

pytestmark = pytest.mark.integration
SENTENCES = 8
# f16 matrices round each weight to 11 significant bits; llama.cpp sums in float32 in its own order.
F16_TOLERANCE = 0.15
# The base GGUF is Q4_1 (PyTorch holds its exact dequantization); llama.cpp's Q4_1 kernels also round each
# activation vector to 8 bits before the dot products, which costs more than f16 does and varies with the machine's
# kernels (on the base model alone, up to 0.39 of a label logit on 8 reviews and 0.89 on 16 on one machine). So the
# LoRA's error is bounded against what the adapter moved: a LoRA applied at the wrong scale, transposed or not at all
# misses by a large share of that move; measured 2 % on average and 5 % at most (0.33 and 0.95 of 14.5 and 17.7).
LORA_SHARE_MEAN = 0.05
LORA_SHARE_MAX = 0.1


@pytest.fixture(scope="module")
def plugged(tmp_path_factory):
    """A LoRA result of 20 device steps at a large rate (so the plug-in differs from the base), plugged in."""
    prepare_datasets()
    root = tmp_path_factory.mktemp("gguf")
    assert coordinator(["keys", "init", "--out", str(root)]) == 0
    export = ["export", "--model", "smollm2-135m", "--profile", "jetson-orin-nano-8gb", "--adapter-kind", "lora:r=8"]
    assert coordinator([*export, "--lr", "3e-3", "--key", str(root / "coordinator.key"), "--out", str(root / "b")]) == 0
    train = ["train", str(root / "b"), "--data", str(dataset_path("sentiment", "train")), "--steps", "20"]
    trained = edge_runtime(*train, "--out", str(root / "result"), "--trust", str(root / "coordinator.pub"), "--quiet")
    assert trained.returncode == 0, trained.stderr
    outputs = ["--out", str(root / "tuned"), "--gguf", str(root / "tuned.gguf"), "--gguf-lora", str(root / "lora.gguf")]
    assert coordinator(["plug", "--model", "smollm2-135m", "--adapter", str(root / "result"), *outputs]) == 0
    yield root
    shutil.rmtree(root)  # 1.3 GB: gone before the next module writes its own


def _pytorch_label_logits(model, task, examples) -> np.ndarray:
    with torch.no_grad():
        rows = [task.label_logits(model, next(task.batches([example], 1, seed=None))) for example in examples]
    return torch.cat(rows).numpy()


def test_the_gguf_model_and_the_gguf_lora_score_as_pytorch_does(plugged):
    examples = load_examples(dataset_path("sentiment", "test"))[:SENTENCES]
    task = make_task(gguf_tokenizer(plugged / "tuned.gguf"), examples, examples)
    tuned = AutoModelForCausalLM.from_pretrained(plugged / "tuned").eval()
    expected = _pytorch_label_logits(tuned, task, examples)
    base = _pytorch_label_logits(load_model("smollm2-135m").model, task, examples)
    assert np.abs(expected - base).max() > 5 * F16_TOLERANCE  # the adapter moved what the comparison checks

    prompts = [task.encode(example)[0] for example in examples]
    merged = label_logits(open_gguf(plugged / "tuned.gguf"), task, prompts)
    np.testing.assert_allclose(merged, expected, atol=F16_TOLERANCE)
    applied = label_logits(open_gguf(packaged_gguf_path("smollm2-135m"), plugged / "lora.gguf"), task, prompts)
    error, moved = np.abs(applied - expected), np.abs(expected - base)
    assert error.mean() <= LORA_SHARE_MEAN * moved.mean() and error.max() <= LORA_SHARE_MAX * moved.max()
    assert (applied.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_the_gguf_model_generates_text_and_the_cli_scores_it(plugged, capsys):
    text = complete(open_gguf(plugged / "tuned.gguf"), "The capital of France is", max_tokens=8)
    assert len(text.strip()) > 0
    test = plugged / "test.jsonl"
    test.write_text("\n".join(dataset_path("sentiment", "test").read_text().splitlines()[:20]) + "\n")
    assert coordinator(["score", "--gguf", str(plugged / "tuned.gguf"), "--test", str(test), "--generate", "Hi"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "on 20 examples" in printed and "tokens/s" in printed


def test_perplexity_in_llama_cpp_is_pytorchs_on_the_same_blocks(plugged):
    text = load_examples(dataset_path("wikipedia", "test"))[:3]
    task = make_task(gguf_tokenizer(plugged / "tuned.gguf"), text, text)
    expected = task.score(AutoModelForCausalLM.from_pretrained(plugged / "tuned").eval(), text, batch_size=4)
    measured = perplexity(open_gguf(plugged / "tuned.gguf", all_logits=True), task, text)
    assert measured.value == pytest.approx(expected, rel=0.01) and measured.tokens > 100


def test_a_truncated_or_corrupt_gguf_is_refused_by_name(plugged, tmp_path, capsys):
    whole = (plugged / "tuned.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "noise.gguf").write_bytes(b"not a gguf at all" * 100)
    for name, says in (("cut.gguf", "is truncated or corrupt"), ("noise.gguf", "is not a GGUF file")):
        test = ["--test", str(dataset_path("sentiment", "test")), "--limit-test", "2"]
        assert coordinator(["score", "--gguf", str(tmp_path / name), *test]) == 2
        assert says in capsys.readouterr().err


def test_an_adapter_for_another_base_model_is_refused_before_anything_is_written(plugged, tmp_path, capsys):
    other = ["plug", "--model", str(plugged / "tuned"), "--adapter", str(plugged / "result")]
    assert coordinator([*other, "--gguf", str(tmp_path / "x.gguf"), "--out", str(tmp_path / "x")]) == 2
    assert "was trained for smollm2-135m" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
