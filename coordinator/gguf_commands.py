"""`coordinator plug --gguf/--gguf-lora` and `coordinator score`: the tuned model for llama.cpp, scored there."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from coordinator.models import LoadedModel
    from exporters.gguf_model import GgufSummary

GGUF_TYPES = ("f32", "f16", "q8_0")


def add_plug_gguf_options(plug: argparse.ArgumentParser) -> None:
    plug.add_argument("--gguf", type=Path, metavar="FILE", help="also write the tuned model as a GGUF file")
    plug.add_argument("--gguf-type", choices=GGUF_TYPES, default="f16", help="type of the GGUF's matrices")
    plug.add_argument(
        "--gguf-lora", type=Path, metavar="FILE", help="lora results: the adapter as a GGUF LoRA for the base GGUF"
    )


def check_plug_outputs(args: argparse.Namespace, kind_name: str) -> None:
    """Refuse, before anything is written, outputs the adapter kind cannot have."""
    if not (args.out or args.gguf or args.gguf_lora):
        raise ConfigError("plug writes nothing: give --out DIR (transformers), --gguf FILE or --gguf-lora FILE")
    if kind_name == "prompt" and args.gguf:
        raise ConfigError("a soft prompt has no GGUF form (llama.cpp takes token ids, not trained vectors); use --out")
    if args.gguf_lora and kind_name != "lora":
        raise ConfigError(f"--gguf-lora writes LoRA adapters; this result's adapter kind is {kind_name!r}: use --gguf")


def add_score_command(commands: argparse._SubParsersAction) -> None:
    from coordinator.options import add_prompt_options

    score = commands.add_parser("score", help="score a GGUF model with llama.cpp (accuracy or perplexity)")
    score.add_argument("--gguf", type=Path, required=True, help="the GGUF model file")
    score.add_argument("--lora", type=Path, help="a GGUF LoRA adapter applied to the model at load")
    score.add_argument("--test", type=Path, help="test file (.jsonl with text and label, or plain text)")
    score.add_argument("--max-length", type=int, default=128, help="token cap per example (LM: block size)")
    score.add_argument("--limit-test", type=int, help="score only the first N test examples")
    score.add_argument("--generate", metavar="PROMPT", help="print a greedy completion of PROMPT")
    score.add_argument("--max-tokens", type=int, default=32, help="tokens to generate")
    add_prompt_options(score)


def score(args: argparse.Namespace) -> None:
    from transformers.utils import logging

    from coordinator.evaluation.gguf_score import accuracy, complete, open_gguf, perplexity
    from coordinator.models import gguf_tokenizer
    from coordinator.tasks import DEFAULT_TEMPLATE, ClassificationTask, make_task
    from edge_runtime.data import load_examples

    if args.test is None and args.generate is None:
        raise ConfigError("score needs --test FILE to score, --generate PROMPT to complete, or both")
    examples = load_examples(args.test)[: args.limit_test] if args.test else []
    plain_text = bool(examples) and examples[0].label is None  # perplexity reads every position's logits
    # Opened first: open_gguf checks the files, so a bad one is named before its tokenizer is read.
    llama = open_gguf(args.gguf, args.lora, context=max(512, args.max_length + 1), all_logits=plain_text)
    logging.set_verbosity_error()  # the GGUF tokenizer's notice about legacy behaviour, which does not apply here
    if examples:
        label_words = dict(args.label_word) if args.label_word else None
        template = args.template or DEFAULT_TEMPLATE
        task = make_task(gguf_tokenizer(args.gguf), examples, examples, label_words, template, args.max_length)
        result = (
            accuracy(llama, task, examples)
            if isinstance(task, ClassificationTask)
            else perplexity(llama, task, examples)
        )
        value = f"{100 * result.value:.1f} %" if result.metric == "accuracy" else f"{result.value:.2f}"
        print(
            f"{args.gguf.name}{' + ' + args.lora.name if args.lora else ''}: {result.metric} {value} on "
            f"{len(examples):,} examples ({result.tokens:,} tokens, {result.tokens_per_second:,.0f} tokens/s)"
        )
    if args.generate is not None:
        print(args.generate + complete(llama, args.generate, args.max_tokens))


def gguf_source(loaded: LoadedModel) -> Path:
    """The GGUF `loaded` came from, whose tokenizer and metadata a written GGUF carries; ConfigError if none."""
    from coordinator.models import source_gguf

    source = source_gguf(loaded)
    if source is None:
        raise ConfigError(
            f"{loaded.name} was loaded from a Hugging Face folder, so there is no GGUF to take its tokenizer and "
            "metadata from; load it from its .gguf (--model FILE.gguf), or convert the --out folder with llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    return source


def _summary(kind: str, summary: GgufSummary) -> str:
    return f"wrote {kind} {summary.path} ({summary.tensors} tensors, {summary.bytes / 2**20:,.1f} MiB)"


def write_lora(path: Path, loaded: LoadedModel, weights: dict[str, torch.Tensor], alpha: float) -> str:
    """The unmerged LoRA `weights` as a GGUF adapter for the base GGUF `loaded` came from."""
    from exporters.gguf_model import write_lora_gguf

    source = gguf_source(loaded)
    summary = write_lora_gguf(loaded.model, weights, alpha, source, path)
    return _summary("GGUF LoRA", summary) + f" for {source.name}: coordinator score --gguf BASE --lora {path}"


def write_model(path: Path, loaded: LoadedModel, out_type: str) -> str:
    """`loaded.model` (plugged in) as a GGUF model of `out_type`."""
    from exporters.gguf_model import write_model_gguf

    return _summary(f"GGUF {out_type} model", write_model_gguf(loaded.model, gguf_source(loaded), path, out_type))
