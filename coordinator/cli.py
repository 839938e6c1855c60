"""`coordinator` command line: prepare, emulator, evaluate. Each command parses, builds, runs, reports."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from edge_runtime.errors import ConfigError, OffsiteError


def _pair(text: str) -> tuple[int, int]:
    try:
        bottom, top = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not BOTTOM,TOP (two integers, e.g. 2,2)") from None
    return bottom, top


def _label_word(text: str) -> tuple[str, str]:
    label, sep, word = text.partition("=")
    if not sep or not label or not word:
        raise argparse.ArgumentTypeError(f"{text!r} is not LABEL=WORD (e.g. 'positive= positive')")
    return label, word


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `coordinator` command."""
    parser = argparse.ArgumentParser(prog="coordinator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="convert the named model and prepare the public datasets (cached)")
    prepare.add_argument("--model", default="smollm2-135m")
    prepare.add_argument("--force", action="store_true", help="rebuild the datasets even if cached")

    emulator = commands.add_parser("emulator", help="build an emulator and save it as a transformers model folder")
    emulator.add_argument("--model", default="smollm2-135m")
    emulator.add_argument("--adapter-layers", type=_pair, default=(2, 2), metavar="BOTTOM,TOP")
    emulator.add_argument("--keep", type=int, required=True, help="middle layers the emulator keeps")
    emulator.add_argument("--out", type=Path, required=True)

    evaluate = commands.add_parser("evaluate", help="measure the five Offsite-Tuning settings on one task")
    evaluate.add_argument("--model", default="smollm2-135m", help="named model, HF folder or .gguf file")
    evaluate.add_argument("--train", type=Path, required=True, help="training data (.jsonl, .csv or .txt)")
    evaluate.add_argument("--test", type=Path, required=True, help="held-out data, same format")
    evaluate.add_argument("--adapter-layers", type=_pair, default=(2, 2), metavar="BOTTOM,TOP")
    evaluate.add_argument("--keep", type=int, default=8, help="middle layers the emulator keeps")
    evaluate.add_argument("--steps", type=int, default=100, help="training steps (adapter and full fine-tune)")
    evaluate.add_argument("--lr", type=float, default=3e-5, help="adapter learning rate")
    evaluate.add_argument("--full-lr", type=float, default=2e-5, help="full fine-tuning learning rate")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--max-length", type=int, default=128, help="token cap per example (LM: block size)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--limit-test", type=int, help="score only the first N test examples")
    evaluate.add_argument("--eval-batch-size", type=int, default=16)
    evaluate.add_argument(
        "--label-word",
        type=_label_word,
        action="append",
        metavar="LABEL=WORD",
        help="word whose first token stands for LABEL (default ' LABEL'); repeat per label",
    )
    evaluate.add_argument("--template", default=None, help="prompt with {text}; default 'Review: {text}\\nSentiment:'")
    evaluate.add_argument("--out", type=Path, default=Path("results.json"), help="results JSON; a PNG goes beside it")
    evaluate.add_argument("--save-adapter", type=Path, help="also write the trained adapter (safetensors)")
    return parser


def _prepare(args: argparse.Namespace) -> None:
    from coordinator.datasets import prepare_datasets
    from coordinator.models import prepare_named_model

    print(f"model {args.model}: {prepare_named_model(args.model)}")
    for name, folder in prepare_datasets(force=args.force).items():
        print(f"dataset {name}: {folder}")


def _emulator(args: argparse.Namespace) -> None:
    from coordinator.emulator import Split, build_emulator
    from coordinator.models import load_model
    from edge_runtime.files import atomic_directory

    loaded = load_model(args.model)
    emulator = build_emulator(loaded.model, Split(*args.adapter_layers, keep=args.keep))
    with atomic_directory(args.out) as staging:
        emulator.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
    print(f"emulator with layers {emulator.config.offsite_emulator['layer_map']} -> {args.out}")


def _evaluate(args: argparse.Namespace) -> None:
    from coordinator.emulator import Split
    from coordinator.evaluation import Experiment, run_five_settings
    from coordinator.models import load_model
    from coordinator.report import format_table, write_results
    from coordinator.tasks import DEFAULT_TEMPLATE, make_task
    from coordinator.train import TrainConfig
    from edge_runtime.data import load_examples

    if args.limit_test is not None and args.limit_test < 1:
        raise ConfigError(f"--limit-test {args.limit_test} must be at least 1")
    adapter_training = TrainConfig(args.steps, args.lr, args.batch_size, args.max_length, seed=args.seed)
    experiment = Experiment(
        Split(*args.adapter_layers, keep=args.keep),
        adapter_training,
        replace(adapter_training, lr=args.full_lr),
        args.eval_batch_size,
    )
    train, test = load_examples(args.train), load_examples(args.test)[: args.limit_test]
    loaded = load_model(args.model)
    experiment.split.check(loaded.model.config.num_hidden_layers)
    label_words = dict(args.label_word) if args.label_word else None
    task = make_task(loaded.tokenizer, train, test, label_words, args.template or DEFAULT_TEMPLATE, args.max_length)
    results = run_five_settings(loaded, task, train, test, experiment, args.save_adapter)
    chart = write_results(results, args.out)
    print(format_table(results))
    print(f"\nresults: {args.out}\nchart:   {chart}")


def main(argv: list[str] | None = None) -> int:
    """Run one `coordinator` command; user errors print one line and exit 2."""
    args = build_parser().parse_args(argv)
    handlers = {"prepare": _prepare, "emulator": _emulator, "evaluate": _evaluate}
    try:
        handlers[args.command](args)
    except OffsiteError as error:
        print(f"coordinator {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
