"""`coordinator` command line (prepare, emulator, evaluate, keys, plan, export, plug, score): parse, run, report."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from coordinator.defaults import DEFAULT_KEEP, DEFAULT_LR
from coordinator.fleet.cli import add_commands as add_fleet_commands
from coordinator.fleet.cli import fleet, serve
from coordinator.gguf_commands import (
    add_plug_gguf_options,
    add_score_command,
    check_plug_outputs,
    score,
    write_lora,
    write_model,
)
from coordinator.options import (
    add_adapter_kind_option,
    add_dp_option,
    add_emulator_options,
    add_prompt_options,
    add_request_options,
    add_window_option,
    emulator_specs,
    pair,
    request_from_args,
)
from device_profiles import ProfileError
from edge_runtime.errors import ConfigError, OffsiteError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `coordinator` command."""
    parser = argparse.ArgumentParser(prog="coordinator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="convert the named model and prepare the public datasets (cached)")
    prepare.add_argument("--model", default="smollm2-135m")
    prepare.add_argument("--force", action="store_true", help="rebuild the datasets even if cached")

    emulator = commands.add_parser("emulator", help="build an emulator and save it as a transformers model folder")
    emulator.add_argument("--model", default="smollm2-135m")
    emulator.add_argument("--adapter-layers", type=pair, default=(2, 2), metavar="BOTTOM,TOP")
    emulator.add_argument("--keep", type=int, required=True, help="middle layers the emulator keeps")
    add_emulator_options(emulator)
    emulator.add_argument("--out", type=Path, required=True)

    evaluate = commands.add_parser("evaluate", help="measure the five Offsite-Tuning settings on one task")
    evaluate.add_argument("--model", default="smollm2-135m", help="named model, HF folder or .gguf file")
    evaluate.add_argument("--train", type=Path, required=True, help="training data (.jsonl, .csv or .txt)")
    evaluate.add_argument("--test", type=Path, required=True, help="held-out data, same format")
    evaluate.add_argument("--adapter-layers", type=pair, default=(2, 2), metavar="BOTTOM,TOP")
    evaluate.add_argument("--keep", type=int, default=DEFAULT_KEEP, help="middle layers the emulator keeps")
    add_emulator_options(evaluate, repeatable=True)
    add_window_option(evaluate)
    add_adapter_kind_option(evaluate)
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
    add_dp_option(evaluate)
    evaluate.add_argument(
        "--finetune", action="store_true", help="with several --emulator recipes: also fine-tune the full model"
    )
    add_prompt_options(evaluate)
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
        command.add_argument("--profile", required=True, help="profile name (e.g. jetson-orin) or a .yaml path")
        add_request_options(command)
    plan.add_argument("--backend", choices=("ort", "torch"), help="default: the profile's preferred backend")
    export.add_argument("--out", type=Path, required=True, help="bundle folder (written whole, or not at all)")
    export.add_argument("--backends", help="comma-separated, e.g. ort,torch (default: the profile's preferred)")
    export.add_argument("--key", type=Path, help="signing key (default: coordinator.key where `keys init` put it)")

    plug = commands.add_parser("plug", help="plug a device-trained adapter into the full model and save it")
    plug.add_argument("--model", default="smollm2-135m", help="named model, HF folder or .gguf file")
    plug.add_argument("--adapter", type=Path, required=True, metavar="RESULT_DIR", help="a device's result folder")
    plug.add_argument("--out", type=Path, help="folder for the tuned model (transformers format)")
    add_plug_gguf_options(plug)
    add_score_command(commands)
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

    (spec,) = emulator_specs(args)
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
    from coordinator.evaluation.five_settings import Experiment, run_five_settings
    from coordinator.evaluation.report import format_table, write_results
    from coordinator.evaluation.selection import carve_validation
    from coordinator.evaluation.tradeoff import format_tradeoff, plot_tradeoff, run_tradeoff
    from coordinator.models import load_model
    from coordinator.results import read_result
    from coordinator.tasks import DEFAULT_TEMPLATE, make_task
    from coordinator.train import TrainConfig
    from edge_runtime.data import load_examples

    if args.limit_test is not None and args.limit_test < 1:
        raise ConfigError(f"--limit-test {args.limit_test} must be at least 1")
    specs = emulator_specs(args)
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
        args.adapter_kind,
        args.dp,
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


def _plan(args: argparse.Namespace) -> None:
    from coordinator.bundles.planner import format_plan, make_plan, model_shape
    from coordinator.compression import make_emulator
    from coordinator.models import load_model
    from device_profiles import load_profile

    profile = load_profile(args.profile)
    request = request_from_args(args)
    loaded = load_model(request.model)
    split = request.split()
    split.check(loaded.model.config.num_hidden_layers)
    emulator = make_emulator(loaded.model, split, request.recipe(), loaded.tokenizer)
    adapter = request.adapter().attach(emulator, split.bottom, split.top)
    shape = model_shape(emulator, adapter, private=request.dp is not None, recompute=request.recompute)
    backend = args.backend or request.backends_for(profile)[0]  # with --dp: torch
    training = request.training
    print(format_plan(make_plan(shape, profile, backend, training.batch_size, training.max_length, request.task.kind)))


def _export(args: argparse.Namespace) -> None:
    from coordinator.bundles.export import export_bundle
    from coordinator.bundles.planner import check_backends
    from coordinator.models import load_model
    from device_profiles import load_profile
    from exporters.bundle import PRIVATE_KEY, default_key_directory, load_private_key

    profile = load_profile(args.profile)
    request = request_from_args(args, tuple(args.backends.split(",")) if args.backends else ())
    check_backends(profile, request.backends_for(profile))
    key = load_private_key(args.key or default_key_directory() / PRIVATE_KEY)
    manifest = export_bundle(load_model(request.model), request, profile, args.out, key)
    plan, emulator = manifest.plan, manifest.emulator
    print(
        f"bundle -> {args.out}: {len(manifest.files)} files, {manifest.size / 1e6:,.1f} MB, backends "
        f"{', '.join(manifest.backends)}, signed by {manifest.signer}\n"
        f"emulator {request.emulator}: layers {emulator.layer_map}, middle "
        f"{emulator.details['footprint']['middle_fraction']:.1%} of the full middle; "
        f"adapter {manifest.adapter.kind}, {manifest.adapter.count:,} parameters; plan for {profile.name}: "
        f"micro-batch {plan.micro_batch} of {plan.batch_size}, predicted peak "
        f"{plan.predicted['total'] / 2**20:,.0f} MiB of {plan.budget_bytes / 2**20:,.0f} MiB"
    )
    if manifest.privacy is not None:
        dp = manifest.privacy
        print(
            f"differentially private: each device spends at most ε = {dp.epsilon:g} at δ = {dp.delta:g}, each "
            f"example's gradient clipped to {dp.clip:g}; the device sets the noise for its own example count"
        )


def _plug(args: argparse.Namespace) -> None:
    from coordinator.adapters import adapter_kind_of
    from coordinator.models import load_model
    from coordinator.results import read_result
    from edge_runtime.files import atomic_directory

    loaded = load_model(args.model)
    result = read_result(args.adapter, loaded)
    metrics = result.metrics
    kind = adapter_kind_of(metrics.adapter_kind, metrics.adapter_options)
    check_plug_outputs(args, kind.name)
    written = []
    if args.gguf_lora:  # from the unmerged branches: llama.cpp adds them to the base GGUF at load
        written.append(write_lora(args.gguf_lora, loaded, result.weights, float(metrics.adapter_options["alpha"])))
    kind.merge(loaded.model, result.weights, metrics.emulator.bottom, metrics.emulator.top)
    if args.out:
        with atomic_directory(args.out) as staging:
            loaded.model.save_pretrained(staging)
            loaded.tokenizer.save_pretrained(staging)
        written.append(f"wrote {args.out} (transformers)")
    if args.gguf:
        written.append(write_model(args.gguf, loaded, args.gguf_type))
    notes = {
        "lora": " (LoRA merged into the weights)",
        "prompt": " (the soft prompt is saved with it: load it with `coordinator evaluate --model`, or "
        "edge_runtime.low_rank.load_causal_lm; plain transformers drops it)",
    }
    print(
        f"plugged {len(result.weights)} {kind.name} adapter tensors from {args.adapter} into {loaded.name}"
        + notes.get(kind.name, "")
    )
    print("\n".join(written))


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
        "score": score,
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
