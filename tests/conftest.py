"""Shared fixtures: a word-level tokenizer and tiny models of every registered family, built in code."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from edge_runtime.data import Example
from edge_runtime.memory import ModelShape

if TYPE_CHECKING:
    from coordinator.results import DeviceResult

GOOD = ["great", "good", "wonderful", "moving", "brilliant", "fun"]
BAD = ["bad", "awful", "boring", "dull", "terrible", "weak"]
FILLER = ["review", "sentiment", ":", "the", "a", "film", "movie", "plot", "actors", "story", "is", "was", "very"]
WORDS = [*FILLER, *GOOD, *BAD, "positive", "negative"]
FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "opt")
# The training shape of SmolLM2-135M's default bundle: 12-layer emulator, 2+2 adapter (memory-model tests).
SMOLLM2_EMULATOR = ModelShape(
    hidden=576,
    intermediate=1536,
    heads=9,
    vocab=49152,
    layers=12,
    backprop_layers=12,
    frozen_parameters=56_632_896,
    trainable_parameters=14_160_384,
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer over WORDS with <pad>, <eos>, <unk>."""
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_model(family: str, num_layers: int = 6, vocab_size: int = 64, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised tiny causal LM of `family` (hidden 32), in eval mode, seeded.

    Weights start wider than the default (std 0.3, not 0.02) so that a tiny model learns in a few dozen steps.
    """
    common = {"vocab_size": vocab_size, "num_hidden_layers": num_layers, "num_attention_heads": 4}
    llama_like = {"hidden_size": 32, "intermediate_size": 64, "num_key_value_heads": 2, "initializer_range": 0.3}
    configs = {
        "llama": LlamaConfig(**llama_like, **common),
        "mistral": MistralConfig(**llama_like, **common),
        "qwen2": Qwen2Config(**llama_like, **common),
        "gpt2": GPT2Config(n_embd=32, n_positions=128, initializer_range=0.3, **common),
        "opt": OPTConfig(
            hidden_size=32, ffn_dim=64, max_position_embeddings=128, word_embed_proj_dim=32, init_std=0.3, **common
        ),
    }
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs[family])
    return model.eval()


def sentiment_examples(count: int, seed: int = 0) -> list[Example]:
    """Toy reviews whose label is decided by one sentiment word: learnable by a tiny model."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(count):
        positive = i % 2 == 0
        words = GOOD if positive else BAD
        word = words[int(torch.randint(len(words), (1,), generator=generator))]
        subject = ["film", "movie", "plot", "story"][int(torch.randint(4, (1,), generator=generator))]
        examples.append(Example(f"the {subject} was very {word}", "positive" if positive else "negative"))
    return examples


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def make_bundle(root: Path, backends: str = "ort,torch", *extra: str) -> dict[str, Path]:
    """A signed bundle of a tiny 6-layer LLaMA (adapter 1+1, emulator keeps 2) with its keys and data."""
    from coordinator.cli import main as coordinator
    from coordinator.datasets import write_jsonl

    folder = root / "tiny-llama"
    tokenizer = make_tokenizer()
    make_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_jsonl(root / "train.jsonl", sentiment_examples(64))
    keys = root / "keys"
    assert coordinator(["keys", "init", "--out", str(keys)]) == 0
    options = [
        "--adapter-layers",
        "1,1",
        "--keep",
        "2",
        "--batch-size",
        "8",
        "--max-length",
        "32",
        "--lr",
        str(BUNDLE_LEARNING_RATE),
    ]
    command = ["export", "--model", str(folder), "--profile", "laptop-16gb", "--backends", backends, *options]
    assert coordinator([*command, "--key", str(keys / "coordinator.key"), "--out", str(root / "bundle"), *extra]) == 0
    return {
        "model": folder,
        "bundle": root / "bundle",
        "trust": keys / "coordinator.pub",
        "key": keys / "coordinator.key",
        "data": root / "train.jsonl",
    }


BUNDLE_LEARNING_RATE = 1e-3  # make_bundle's --lr


def assert_same_adapter(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Two runs of make_bundle's training agree to a tenth of one AdamW step.

    Not bitwise: fresh ORT sessions may sum in another order (two unbroken runs differ by ~1e-7), and AdamW divides
    by the root of the second moment, so a weight whose gradient is near zero turns that rounding into a visible
    step (seen: one of 2,048 weights 1.1e-5 apart). A resume that loses or repeats a step, or its optimizer state,
    moves nearly every weight by about a whole step (the learning rate), ten times this tolerance.
    """
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=BUNDLE_LEARNING_RATE / 10, err_msg=name)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny bundle shared by the tests that only read it."""
    return make_bundle(tmp_path_factory.mktemp("tiny-bundle"))


def device_result(weights: dict[str, torch.Tensor], examples: int, kind: str = "layers") -> DeviceResult:
    """A device result of a tiny model holding `weights`, trained on `examples` examples, of adapter `kind`."""
    import json

    from coordinator.results import DeviceResult
    from edge_runtime.manifest import RESULT_FORMAT, RESULT_SCHEMA, read_metrics

    metrics = {
        "format": RESULT_FORMAT,
        "schema": RESULT_SCHEMA,
        "model": {"name": "tiny", "sha256": "0" * 64, "num_layers": 6},
        "emulator": {"recipe": "uniform", "source_num_layers": 6, "layer_map": [0, 5], "bottom": 1, "top": 1},
        "backend": "ort",
        "steps": 1,
        "samples": 8,
        "examples": examples,
        "first_loss": 1.0,
        "final_loss": 0.5,
        "loss_curve": [1.0],
        "wall_seconds": 1.0,
        "peak_memory_bytes": 1,
        "adapter_kind": kind,
    }
    return DeviceResult(weights, read_metrics(json.dumps(metrics)))
