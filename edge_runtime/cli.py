"""`edge-runtime` command line (device side; torch only with --backend torch): info, profile, keys, verify, train,
run."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import psutil

from device_profiles import GIB, ProfileError
from edge_runtime import __version__
from edge_runtime.backends import BACKENDS, installed_backends
from edge_runtime.errors import OffsiteError
from edge_runtime.mqtt import add_tls_options


def machine_info() -> dict[str, object]:
    """Memory, cores and which training backends are installed (checked without importing them)."""
    memory = psutil.virtual_memory()
    return {
        "version": __version__,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "memory_total_bytes": memory.total,
        "memory_available_bytes": memory.available,
        "backends": {name: name in installed_backends() for name in BACKENDS},
    }


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `edge-runtime` command."""
    parser = argparse.ArgumentParser(prog="edge-runtime", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edge-runtime {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print this machine's memory, cores and installed backends as JSON")

    profile = commands.add_parser("profile", help="measure this machine and write a device profile (YAML)")
    profile.add_argument("--out", type=Path, required=True, help="where to write the profile, e.g. my-device.yaml")
    profile.add_argument("--name", help="profile name (default: from the host name)")

    keys = commands.add_parser("keys", help="make (once) and show this device's key, for the operator to enroll")
    keys.add_argument("--device-id", required=True, help="this device's name on the wire")
    keys.add_argument("--state", type=Path, help="the run command's --state (default ~/.local/state/offsite-edge/ID)")

    verify = commands.add_parser("verify", help="check a bundle's signature and every file's sha256")
    verify.add_argument("bundle", type=Path)
    verify.add_argument("--trust", type=Path, required=True, help="the coordinator's public key (coordinator.pub)")

    train = commands.add_parser("train", help="verify a bundle and train its adapter on local data")
    train.add_argument("bundle", type=Path)
    train.add_argument("--data", type=Path, required=True, help="training data (.jsonl, .csv or .txt); stays here")
    train.add_argument("--out", type=Path, required=True, help="result folder: adapter.safetensors, metrics.json")
    train.add_argument("--trust", type=Path, required=True, help="the coordinator's public key (coordinator.pub)")
    train.add_argument("--steps", type=int, help="training steps (default: the bundle's)")
    train.add_argument("--backend", choices=sorted(BACKENDS), help="default: the bundle's first backend")
    train.add_argument("--threads", type=int, help="compute threads (default: all cores)")
    train.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: the bundle's)")
    train.add_argument("--budget-gb", type=float, help="memory budget (default: the profile's, capped by free memory)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    run = commands.add_parser("run", help="serve training jobs from a coordinator over MQTT until stopped")
    run.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt[s]://[USER[:PASSWORD]@]HOST[:PORT]")
    run.add_argument("--device-id", required=True, help="this device's name on the wire (and its MQTT user)")
    run.add_argument("--profile", required=True, help="a profile name, alias or YAML path (edge-runtime profile)")
    run.add_argument(
        "--dataset", action="append", required=True, metavar="NAME=PATH", help="private data a job may name; repeat"
    )
    run.add_argument("--trust", type=Path, required=True, help="the coordinator's public key (coordinator.pub)")
    run.add_argument("--state", type=Path, help="job state and device key (default ~/.local/state/offsite-edge/ID)")
    run.add_argument("--username", help="MQTT user (default: the device id, logged in by its key)")
    run.add_argument("--password-env", default="OFFSITE_EDGE_MQTT_PASSWORD", help="env variable with the password")
    run.add_argument("--prefix", default="offsite", help="topic prefix shared with the coordinator")
    run.add_argument("--threads", type=int, help="compute threads (default: all cores)")
    run.add_argument("--backend", choices=sorted(BACKENDS), help="default: the bundle's first backend")
    run.add_argument("--budget-gb", type=float, help="memory budget (default: the profile's, capped by free memory)")
    run.add_argument(
        "--privacy-budget",
        type=_epsilon,
        metavar="epsilon=E",
        help="lifetime differential-privacy budget: only DP jobs run, and none once their ε would add up past E "
        "(kept in --state across restarts)",
    )
    add_tls_options(run)
    return parser


def _epsilon(text: str) -> float:
    key, _, value = text.partition("=")
    try:
        if key == "epsilon":
            return float(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not epsilon=E, e.g. --privacy-budget epsilon=8")


def _profile(args: argparse.Namespace) -> None:
    from edge_runtime.files import write_text_atomic
    from edge_runtime.profile import measure_profile

    profile = measure_profile(args.name)
    write_text_atomic(args.out, profile.to_yaml())
    print(profile.to_yaml(), end="")
    print(f"profile -> {args.out}")


def _state(args: argparse.Namespace) -> Path:
    return args.state or Path.home() / ".local" / "state" / "offsite-edge" / args.device_id


def _keys(args: argparse.Namespace) -> None:
    from edge_runtime.identity import DEVICE_PUBLIC_KEY, device_key, public_pem
    from edge_runtime.wire import check_device_id

    check_device_id(args.device_id)
    state = _state(args)
    key = device_key(state)
    print(public_pem(key), end="")
    print(
        f"{args.device_id}'s public key -> {state / DEVICE_PUBLIC_KEY}; the operator enrolls it with\n"
        f"  coordinator fleet enroll {args.device_id} --key {DEVICE_PUBLIC_KEY}"
    )


def _verify(args: argparse.Namespace) -> None:
    from edge_runtime.bundle import verify_bundle

    manifest = verify_bundle(args.bundle, args.trust)
    print(
        f"bundle {args.bundle} verified: {len(manifest.files)} files, {manifest.size / 1e6:,.1f} MB, signed by "
        f"{manifest.signer}; model {manifest.model.name}, profile {manifest.profile.name}, adapter "
        f"{manifest.adapter.kind} ({manifest.adapter.count:,} parameters), backends {', '.join(manifest.backends)}"
    )


def _train(args: argparse.Namespace) -> None:
    from edge_runtime.trainer import TrainOptions, train_bundle

    budget = None if args.budget_gb is None else int(args.budget_gb * GIB)
    options = TrainOptions(args.steps, args.backend, args.threads, args.checkpoint_every, budget, not args.quiet)
    metrics = train_bundle(args.bundle, args.data, args.out, args.trust, options)
    print(
        f"trained {metrics['steps']} steps ({metrics['samples']} samples) with {metrics['backend']}: loss "
        f"{metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f}, {metrics['step_seconds_median']:.2f} s/step, "
        f"peak memory {metrics['peak_memory_bytes'] / 2**20:,.0f} MiB (budget {metrics['budget_bytes'] / 2**20:,.0f}, "
        f"predicted {metrics['predicted_peak_bytes'] / 2**20:,.0f}), micro-batch {metrics['micro_batch']}"
    )
    print(f"result -> {args.out}")


def _datasets(pairs: list[str]) -> dict[str, Path]:
    datasets = {}
    for pair in pairs:
        name, _, path = pair.partition("=")
        if not name or not path:
            raise OffsiteError(f"--dataset {pair!r} is not NAME=PATH, e.g. --dataset reviews=data/reviews.jsonl")
        datasets[name] = Path(path)
    return datasets


def _run(args: argparse.Namespace) -> None:
    import logging
    import signal
    import threading

    from device_profiles import load_profile
    from edge_runtime.daemon import DaemonConfig, EdgeDaemon
    from edge_runtime.mqtt import BrokerAddress, tls_from_args
    from edge_runtime.wire import Topics

    # force: onnxruntime's tools call basicConfig when imported, which would leave INFO unshown
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    password = os.environ.get(args.password_env)
    user = args.username or (args.device_id if password else None)
    address = BrokerAddress.parse(args.broker, user, password, tls_from_args(args))
    state = _state(args)
    budget = None if args.budget_gb is None else int(args.budget_gb * GIB)
    config = DaemonConfig(
        args.device_id,
        load_profile(args.profile),
        _datasets(args.dataset),
        args.trust,
        state,
        Topics(args.prefix),
        args.threads,
        args.backend,
        budget,
        privacy_budget=args.privacy_budget,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    daemon = EdgeDaemon(config, address)
    print(
        f"edge-runtime {args.device_id}: serving jobs from {address} (state and key in {state}; the operator "
        f"enrolls {state / 'device.pub'}); Ctrl-C stops",
        flush=True,
    )
    daemon.run(stop)


def main(argv: list[str] | None = None) -> int:
    """Run one `edge-runtime` command; user errors print one line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            json.dump(machine_info(), sys.stdout, indent=2)
            print()
        else:
            commands = {"profile": _profile, "keys": _keys, "verify": _verify, "train": _train, "run": _run}
            commands[args.command](args)
    except (OffsiteError, ProfileError) as error:
        print(f"edge-runtime {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
