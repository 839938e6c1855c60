"""Shared fixtures: a word-level tokenizer and tiny models of every registered family, built in code."""

from __future__ import annotations

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

GOOD = ["great", "good", "wonderful", "moving", "brilliant", "fun"]
BAD = ["bad", "awful", "boring", "dull", "terrible", "weak"]
FILLER = ["review", "sentiment", ":", "the", "a", "film", "movie", "plot", "actors", "story", "is", "was", "very"]
WORDS = [*FILLER, *GOOD, *BAD, "positive", "negative"]
FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "opt")


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
