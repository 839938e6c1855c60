"""Score and run a GGUF model with llama-cpp-python, the way the project scores a model with PyTorch.

Classification: the logits of each label word's first token after the prompt (coordinator/tasks.py, the same token
ids); perplexity: the next-token negative log-likelihood over the same packed blocks. Only the model's arithmetic
differs, so a score here against PyTorch's measures what the GGUF file type costs.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from coordinator.errors import ConfigError
from coordinator.tasks import ClassificationTask, LanguageModelTask
from edge_runtime.data import Example
from exporters.gguf_model import field_value, read_gguf

if TYPE_CHECKING:
    from llama_cpp import Llama


@dataclass(frozen=True)
class GgufScore:
    metric: str
    value: float
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("inf")


def open_gguf(path: Path, lora: Path | None = None, context: int = 512, all_logits: bool = False) -> Llama:
    """llama.cpp's model from `path` (with the GGUF LoRA adapter `lora` applied at load); the files are checked
    first, so a corrupt or truncated one fails with its name instead of llama.cpp's bare 'failed to load'."""
    if field_value(read_gguf(path), "general.type") != "model":
        raise ConfigError(f"{path} is not a GGUF model (its general.type is not 'model'): give --gguf the model file")
    if lora is not None and field_value(read_gguf(lora), "general.type") != "adapter":
        raise ConfigError(f"{lora} is not a GGUF adapter (general.type is not 'adapter'); plug --gguf-lora makes one")
    from llama_cpp import Llama

    return Llama(
        model_path=str(path),
        lora_path=str(lora) if lora else None,
        n_ctx=context,
        n_batch=context,
        logits_all=all_logits,
        n_threads=os.cpu_count() or 1,
        verbose=False,
    )


def last_logits(llama: Llama, ids: Sequence[int]) -> np.ndarray:
    """Vocabulary logits [V] after the token ids `ids`, from a fresh context."""
    import llama_cpp

    llama.reset()
    llama.eval(list(ids))
    pointer = llama_cpp.llama_get_logits_ith(llama.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llama.n_vocab(),)).copy()


def label_logits(llama: Llama, task: ClassificationTask, prompts: Sequence[Sequence[int]]) -> np.ndarray:
    """Logits [N, C] of each label word's first token after each prompt (token ids, as `task.encode` gives)."""
    label_ids = task.label_token_ids.numpy()
    return np.stack([last_logits(llama, ids)[label_ids] for ids in prompts])


def accuracy(llama: Llama, task: ClassificationTask, examples: Sequence[Example]) -> GgufScore:
    """The share of examples whose label word scores highest; timed over the model's work, not tokenizing."""
    prompts, targets = zip(*(task.encode(example) for example in examples), strict=True)
    start = time.perf_counter()
    scores = label_logits(llama, task, prompts)
    seconds = time.perf_counter() - start
    correct = int((scores.argmax(axis=1) == np.asarray(targets)).sum())
    return GgufScore("accuracy", correct / len(examples), sum(len(ids) for ids in prompts), seconds)


def perplexity(llama: Llama, task: LanguageModelTask, examples: Sequence[Example]) -> GgufScore:
    """exp of the mean next-token NLL over the task's blocks (needs `open_gguf(..., all_logits=True)`)."""
    blocks = task.blocks(examples)
    if not blocks:
        raise ConfigError("the test text holds no token to predict; give it at least two tokens")
    start, total, count = time.perf_counter(), 0.0, 0
    for block in blocks:
        llama.reset()
        llama.eval(block)
        logits = np.asarray(llama.scores[: len(block) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        total += float((log_norm - logits[np.arange(len(block) - 1), block[1:]]).sum())
        count += len(block) - 1
    seconds = time.perf_counter() - start
    return GgufScore("perplexity", math.exp(total / count), sum(len(b) for b in blocks), seconds)


def complete(llama: Llama, prompt: str, max_tokens: int = 32) -> str:
    """A greedy completion of `prompt`."""
    llama.reset()
    return llama.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)["choices"][0]["text"]
