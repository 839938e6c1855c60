"""`coordinator` command line: prepare, emulator, evaluate, keys, plan, export, plug. Parse, build, run, report."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from coordinator.defaults import DEFAULT_EMULATOR, DEFAULT_KEEP, DEFAULT_LR
from coordinator.fleet.cli import add_commands as add_fleet_commands
from coordinator.fleet.cli import fleet, serve
from device_profiles import ProfileError
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


def _add_prompt_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--label-word",
        type=_label_word,
        action="append",
        metavar="LABEL=WORD",
        help="word whose first token stands for LABEL (default ' LABEL'); repeat per label",
    )
    command.add_argument("--template", default=None, help="prompt with {text}; default 'Review: {text}\\nSentiment:'")


def _add_emulator_options(command: argparse.ArgumentParser, repeatable: bool = False) -> None:
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


def _emulator_specs(args: argparse.Namespace) -> list:
    from coordinator.compression import EmulatorSpec

    texts = args.emulator if isinstance(args.emulator, list) else [args.emulator or DEFAULT_EMULATOR]
    calibration = str(args.calibration) if args.calibration else None
    return [EmulatorSpec.parse(text, args.keep, args.distill, calibration) for text in texts]


def _add_window_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--layer-window",
        type=int,
        metavar="LAYERS",
        help="adaptive layer tuning: train this many adapter layers at a time, each window through its own early "
        "exit (bottom windows first), and vote across the exits when scoring",
    )


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
    _add_emulator_options(emulator)
    emulator.add_argument("--out", type=Path, required=True)

    evaluate = commands.add_parser("evaluate", help="measure the five Offsite-Tuning settings on one task")
    evaluate.add_argument("--model", default="smollm2-135m", help="named model, HF folder or .gguf file")
    evaluate.add_argument("--train", type=Path, required=True, help="training data (.jsonl, .csv or .txt)")
    evaluate.add_argument("--test", type=Path, required=True, help="held-out data, same format")
    evaluate.add_argument("--adapter-layers", type=_pair, default=(2, 2), metavar="BOTTOM,TOP")
    evaluate.add_argument("--keep", type=int, default=DEFAULT_KEEP, help="middle layers the emulator keeps")
    _add_emulator_options(evaluate, repeatable=True)
    _add_window_option(evaluate)
    evaluate.add_argument("--steps", type=int, default=100, help="training steps (adapter and full fine-tune)")
    evaluate.add_argument("--lr", type=float, default=DEFAULT_LR, help="adapter learning rate")
    evaluate.add_argument("--full-lr", type=float, default=2e-5, help="full fine-tuning learning rate")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--max-length", type=int, default=128, help="token cap per example (LM: block size)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--limit-test", type=int, help="score only the first N test examples")
    evaluate.add_argument("--eval-batch-size", type=int, default=16)
    evaluate.add_argument(
        "--validation",
        type=int,
        default=0,
        metavar="N",
        help="carve N examples from --train (never one in --test) and keep the adapter's and the fine-tune's best "
        "checkpoint by them; 0: keep the last",
    )
    evaluate.add_argument("--check-every", type=int, default=50, help="steps between validation checkpoints")
    evaluate.add_argument(
        "--finetune", action="store_true", help="with several --emulator recipes: also fine-tune the full model"
    )
    _add_prompt_options(evaluate)
    evaluate.add_argument("--out", type=Path, default=Path("results.json"), help="results JSON; a PNG goes beside it")
    evaluate.add_argument("--save-adapter", type=Path, help="also write the trained adapter (safetensors)")
    evaluate.add_argument(
        "--adapter", type=Path, metavar="RESULT_DIR", help="use the adapter a device trained instead of training one"
    )

    keys = commands.add_parser("keys", help="manage the coordinator's signing key")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    init = keys_commands.add_parser("init", help="make an Ed25519 key pair: coordinator.key and coordinator.pub")
    init.add_argument("--out", type=Path, help="folder (default $OFFSITE_EDGE_KEYS or ~/.config/offsite-edge)")
    init.add_argument("--force", action="store_true", help="replace an existing key")

    plan = commands.add_parser("plan", help="predict training memory for a device profile and choose a micro-batch")
    export = commands.add_parser("export", help="write a signed training bundle for a device profile")
    for command in (plan, export):
        command.add_argument("--model", default="smollm2-135m", help="named model, HF folder or .gguf file")
        command.add_argument("--profile", required=True, help="profile name (e.g. jetson-orin) or a .yaml path")
        command.add_argument("--adapter-layers", type=_pair, default=(2, 2), metavar="BOTTOM,TOP")
        command.add_argument("--keep", type=int, default=DEFAULT_KEEP, help="middle layers the emulator keeps")
        _add_emulator_options(command)
        command.add_argument("--task", choices=("classification", "language-model"), default="classification")
        command.add_argument("--batch-size", type=int, default=8)
        command.add_argument("--max-length", type=int, default=128, help="token cap per example (LM: block size)")
    plan.add_argument("--backend", choices=("ort", "torch"), help="default: the profile's preferred backend")
    export.add_argument("--out", type=Path, required=True, help="bundle folder (written whole, or not at all)")
    export.add_argument("--backends", help="comma-separated, e.g. ort,torch (default: the profile's preferred)")
    _add_prompt_options(export)
    export.add_argument("--steps", type=int, default=100, help="default training steps on the device")
    export.add_argument("--lr", type=float, default=DEFAULT_LR)
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--checkpoint-every", type=int, default=10)
    _add_window_option(export)
    export.add_argument("--key", type=Path, help="signing key (default: coordinator.key where `keys init` put it)")

    plug = commands.add_parser("plug", help="plug a device-trained adapter into the full model and save it")
    plug.add_argument("--model", default="smollm2-135m", help="named model, HF folder or .gguf file")
    plug.add_argument("--adapter", type=Path, required=True, metavar="RESULT_DIR", help="a device's result folder")
    plug.add_argument("--out", type=Path, required=True, help="folder for the tuned model (transformers format)")
    add_fleet_commands(commands)
    return parser


def _prepare(args: argparse.Namespace) -> None:
    from coordinator.datasets import prepare_datasets
    from coordinator.models import prepare_named_model

    print(f"model {args.model}: {prepare_named_model(args.model)}")
    for name, folder in prepare_datasets(force=args.force).items():
        print(f"dataset {name}: {folder}")


def _emulator(args: argparse.Namespace) -> None:
    from coordinator.compression import make_emulator
    from coordinator.emulator import Split, emulator_record
    from coordinator.models import load_model
    from edge_runtime.files import atomic_directory

    (spec,) = _emulator_specs(args)
    loaded = load_model(args.model)
    emulator = make_emulator(loaded.model, Split(*args.adapter_layers, keep=args.keep), spec, loaded.tokenizer)
    with atomic_directory(args.out) as staging:
        emulator.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
    record = emulator_record(emulator)
    size = record.details["footprint"]["middle_fraction"]
    print(f"emulator {spec.label()}: layers {record.layer_map}, middle {size:.1%} of the full middle -> {args.out}")


def _evaluate(args: argparse.Namespace) -> None:
    from coordinator.emulator import Split
    from coordinator.evaluation import Experiment, run_five_settings
    from coordinator.models import load_model
    from coordinator.report import format_table, write_results
    from coordinator.results import read_result
    from coordinator.selection import carve_validation
    from coordinator.tasks import DEFAULT_TEMPLATE, make_task
    from coordinator.tradeoff import format_tradeoff, plot_tradeoff, run_tradeoff
    from coordinator.train import TrainConfig
    from edge_runtime.data import load_examples

    if args.limit_test is not None and args.limit_test < 1:
        raise ConfigError(f"--limit-test {args.limit_test} must be at least 1")
    specs = _emulator_specs(args)
    if len(specs) > 1 and (args.adapter or args.save_adapter):
        raise ConfigError("--adapter and --save-adapter take one --emulator recipe, not a comparison of several")
    adapter_training = TrainConfig(args.steps, args.lr, args.batch_size, args.max_length, seed=args.seed)
    experiment = Experiment(
        Split(*args.adapter_layers, keep=args.keep),
        adapter_training,
        replace(adapter_training, lr=args.full_lr),
        args.eval_batch_size,
        specs[0],
        args.layer_window,
        args.check_every,
    )
    train, test = load_examples(args.train), load_examples(args.test)[: args.limit_test]
    validation: list = []
    if args.validation:
        train, validation = carve_validation(train, load_examples(args.test), args.validation)
    loaded = load_model(args.model)
    for spec in specs:
        spec.split_for(experiment.split).check(loaded.model.config.num_hidden_layers)
    label_words = dict(args.label_word) if args.label_word else None
    task = make_task(loaded.tokenizer, train, test, label_words, args.template or DEFAULT_TEMPLATE, args.max_length)
    if len(specs) > 1:
        results = run_tradeoff(loaded, task, train, test, experiment, specs, validation, args.finetune)
        chart, table = write_results(results, args.out, plot_tradeoff), format_tradeoff(results)
    else:
        device = read_result(args.adapter, loaded) if args.adapter else None
        results = run_five_settings(loaded, task, train, test, experiment, args.save_adapter, device, validation)
        chart, table = write_results(results, args.out), format_table(results)
    print(table)
    print(f"\nresults: {args.out}\nchart:   {chart}")


def _keys(args: argparse.Namespace) -> None:
    from exporters.bundle import default_key_directory, generate_keys

    private, public = generate_keys(args.out or default_key_directory(), args.force)
    print(f"signing key: {private} (keep it here)\npublic key:  {public} (give it to devices: --trust {public})")


def _task_for_export(args: argparse.Namespace, tokenizer: object) -> object:
    from coordinator.tasks import DEFAULT_LABEL_WORDS, DEFAULT_TEMPLATE, ClassificationTask, LanguageModelTask

    if args.task == "language-model":
        return LanguageModelTask(tokenizer, args.max_length)
    label_words = dict(args.label_word) if getattr(args, "label_word", None) else DEFAULT_LABEL_WORDS
    template = getattr(args, "template", None) or DEFAULT_TEMPLATE
    return ClassificationTask(tokenizer, label_words, template, args.max_length)


def _plan(args: argparse.Namespace) -> None:
    from coordinator.adapter import adapter_parameters
    from coordinator.compression import make_emulator
    from coordinator.emulator import Split
    from coordinator.models import load_model
    from coordinator.planner import format_plan, make_plan, model_shape
    from device_profiles import load_profile

    profile = load_profile(args.profile)
    (spec,) = _emulator_specs(args)
    loaded = load_model(args.model)
    split = spec.split_for(Split(*args.adapter_layers, keep=args.keep))
    split.check(loaded.model.config.num_hidden_layers)
    emulator = make_emulator(loaded.model, split, spec, loaded.tokenizer)
    shape = model_shape(emulator, adapter_parameters(emulator, split.bottom, split.top))
    backend = args.backend or profile.backends[0]
    print(format_plan(make_plan(shape, profile, backend, args.batch_size, args.max_length, args.task)))


def _export(args: argparse.Namespace) -> None:
    from coordinator.emulator import Split
    from coordinator.export import export_bundle
    from coordinator.models import load_model
    from coordinator.planner import check_backends
    from coordinator.train import TrainConfig
    from device_profiles import load_profile
    from exporters.bundle import PRIVATE_KEY, default_key_directory, load_private_key

    profile = load_profile(args.profile)
    backends = tuple(args.backends.split(",")) if args.backends else profile.backends[:1]
    check_backends(profile, backends)
    key = load_private_key(args.key or default_key_directory() / PRIVATE_KEY)
    training = TrainConfig(args.steps, args.lr, args.batch_size, args.max_length, seed=args.seed)
    (spec,) = _emulator_specs(args)
    loaded = load_model(args.model)
    task = _task_for_export(args, loaded.tokenizer)
    split = Split(*args.adapter_layers, keep=args.keep)
    manifest = export_bundle(
        loaded, split, task, profile, backends, training, args.checkpoint_every, args.out, key, spec, args.layer_window
    )
    size = sum(entry["size"] for entry in manifest["files"].values())
    plan = manifest["plan"]
    print(
        f"bundle -> {args.out}: {len(manifest['files'])} files, {size / 1e6:,.1f} MB, backends "
        f"{', '.join(backends)}, signed by {manifest['signer']}\n"
        f"emulator {spec.label()}: layers {manifest['emulator']['layer_map']}, middle "
        f"{manifest['emulator']['details']['footprint']['middle_fraction']:.1%} of the full middle; "
        f"adapter {manifest['adapter']['count']:,} parameters; plan for {profile.name}: micro-batch "
        f"{plan['micro_batch']} of {plan['batch_size']}, predicted peak "
        f"{plan['predicted']['total'] / 2**20:,.0f} MiB of {plan['budget_bytes'] / 2**20:,.0f} MiB"
    )


def _plug(args: argparse.Namespace) -> None:
    from coordinator.adapter import plug_in
    from coordinator.models import load_model
    from coordinator.results import read_result
    from edge_runtime.files import atomic_directory

    loaded = load_model(args.model)
    result = read_result(args.adapter, loaded)
    plug_in(loaded.model, result.weights)
    with atomic_directory(args.out) as staging:
        loaded.model.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
    print(f"plugged {len(result.weights)} adapter tensors from {args.adapter} into {loaded.name} -> {args.out}")


def main(argv: list[str] | None = None) -> int:
    """Run one `coordinator` command; user errors print one line and exit 2."""
    args = build_parser().parse_args(argv)
    handlers = {
        "prepare": _prepare,
        "emulator": _emulator,
        "evaluate": _evaluate,
        "keys": _keys,
        "plan": _plan,
        "export": _export,
        "plug": _plug,
        "serve": serve,
        "fleet": fleet,
    }
    try:
        handlers[args.command](args)
    except (OffsiteError, ProfileError) as error:
        print(f"coordinator {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
