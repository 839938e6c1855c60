"""Command-line options shared by `coordinator` commands, declared once, and the BundleRequest they build."""

from __future__ import annotations

import argparse
from pathlib import Path

from coordinator.adapters import KINDS
from coordinator.bundles.request import BundleRequest, TaskSpec
from coordinator.defaults import DEFAULT_EMULATOR, DEFAULT_KEEP, DEFAULT_LR
from coordinator.tasks import DEFAULT_LABEL_WORDS, DEFAULT_TEMPLATE
from coordinator.train import TrainConfig
from edge_runtime.manifest import TASK_KINDS
from edge_runtime.privacy import parse_dp


def pair(text: str) -> tuple[int, int]:
    """BOTTOM,TOP as two integers."""
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


def add_prompt_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--label-word",
        type=_label_word,
        action="append",
        metavar="LABEL=WORD",
        help="word whose first token stands for LABEL (default ' LABEL'); repeat per label",
    )
    command.add_argument("--template", default=None, help="prompt with {text}; default 'Review: {text}\\nSentiment:'")


def add_emulator_options(command: argparse.ArgumentParser, repeatable: bool = False) -> None:
    command.add_argument(
        "--emulator",
        action="append" if repeatable else "store",
        metavar="RECIPE[:KEY=VALUE,...]",
        help=f"emulator recipe (default {DEFAULT_EMULATOR}): uniform, importance, greedy, share, luc:size=F, "
        "lowrank:energy=E|size=F; keys keep, select, distill, harmonize, mode (share|drop, for share) "
        "(e.g. greedy:keep=16,harmonize=64)"
        + ("; repeat to compare recipes in one privacy-utility table" if repeatable else ""),
    )
    command.add_argument(
        "--distill",
        type=int,
        default=0,
        metavar="STEPS",
        help="distill the emulator toward the full model's middle for STEPS steps on the calibration text",
    )
    command.add_argument(
        "--calibration",
        type=Path,
        metavar="FILE",
        help="public text the recipes measure, distill and harmonize on (.jsonl, .csv, .txt); default: prepared "
        "Wikipedia",
    )


def emulator_specs(args: argparse.Namespace) -> list:
    """The EmulatorSpec of each --emulator given (the default recipe if none)."""
    from coordinator.compression import EmulatorSpec

    texts = args.emulator if isinstance(args.emulator, list) else [args.emulator or DEFAULT_EMULATOR]
    calibration = str(args.calibration) if args.calibration else None
    return [EmulatorSpec.parse(text, args.keep, args.distill, calibration) for text in texts]


def add_window_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--layer-window",
        type=int,
        metavar="LAYERS",
        help="adaptive layer tuning: train this many adapter layers at a time, each window through its own early "
        "exit (bottom windows first), and vote across the exits when scoring",
    )


def add_adapter_kind_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--adapter-kind",
        default="layers",
        metavar="KIND[:KEY=VALUE,...]",
        help=f"what trains on the device: {', '.join(KINDS)} (default layers: every weight of the adapter layers; "
        "lora:r=8,alpha=16,targets=q_proj+v_proj: low-rank branches on them; bias: their bias terms, "
        "zero-initialized where missing; prompt:tokens=20: soft-prompt vectors in front of every input)",
    )


def add_request_options(command: argparse.ArgumentParser, steps: int = 100, steps_help: str = "") -> None:
    """Every option of a BundleRequest: model, split, emulator, adapter kind, task, device training defaults."""
    command.add_argument("--model", default="smollm2-135m", help="named model, HF folder or .gguf file")
    command.add_argument("--adapter-layers", type=pair, default=(2, 2), metavar="BOTTOM,TOP")
    command.add_argument("--keep", type=int, default=DEFAULT_KEEP, help="middle layers the emulator keeps")
    add_emulator_options(command)
    add_adapter_kind_option(command)
    command.add_argument("--task", choices=TASK_KINDS, default="classification")
    add_prompt_options(command)
    command.add_argument("--batch-size", type=int, default=8)
    command.add_argument("--max-length", type=int, default=128, help="token cap per example (LM: block size)")
    command.add_argument("--steps", type=int, default=steps, help=steps_help or "default training steps on the device")
    command.add_argument("--lr", type=float, default=DEFAULT_LR, help="adapter learning rate")
    command.add_argument("--seed", type=int, default=0, help="data order seed")
    command.add_argument("--checkpoint-every", type=int, default=10, help="steps between device checkpoints")
    add_dp_option(command)
    add_window_option(command)
    command.add_argument(
        "--recompute",
        action="store_true",
        help="recompute each layer's activations in the backward pass instead of keeping them from the forward "
        "pass: the device holds one layer's activations, not every layer's, for about a third more compute",
    )


def add_dp_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--dp",
        type=parse_dp,
        metavar="epsilon=E[,delta=D][,clip=C]",
        help="differentially private training (DP-SGD: per-example clipping to C, Gaussian noise set for the "
        "trainer's own example count so the run spends at most (E, D)); bias or lora adapters, PyTorch",
    )


def request_from_args(args: argparse.Namespace, backends: tuple[str, ...] = ()) -> BundleRequest:
    """The BundleRequest the options of `add_request_options` describe."""
    task = TaskSpec(
        args.task,
        dict(args.label_word) if args.label_word else dict(DEFAULT_LABEL_WORDS),
        args.template or DEFAULT_TEMPLATE,
    )
    (recipe,) = emulator_specs(args)
    return BundleRequest(
        model=args.model,
        adapter_layers=args.adapter_layers,
        keep=args.keep,
        emulator=recipe.label(),
        distill=args.distill,
        calibration=str(args.calibration) if args.calibration else None,
        adapter_kind=args.adapter_kind,
        task=task,
        training=TrainConfig(args.steps, args.lr, args.batch_size, args.max_length, seed=args.seed),
        checkpoint_every=args.checkpoint_every,
        layer_window=args.layer_window,
        backends=backends,
        dp=args.dp,
        recompute=args.recompute,
    )
