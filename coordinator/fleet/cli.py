"""`coordinator serve` and `coordinator fleet enroll|devices|dispatch|status|results`: thin commands over the
registry."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.errors import ConfigError
from coordinator.fleet.registry import (
    HEARTBEAT_SECONDS,
    JOB_DONE,
    WORKER_TIMEOUT_SECONDS,
    Registry,
    default_state_directory,
)
from coordinator.options import add_request_options, parse_dp, request_from_args
from coordinator.split.job import SplitJob
from edge_runtime.mqtt import add_tls_options

if TYPE_CHECKING:
    from collections.abc import Callable

    from coordinator.fleet.dashboard import Dashboard
    from coordinator.fleet.jobs import JobSpec

MIB = 2**20


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `serve` and `fleet` on the `coordinator` parser."""
    serve = commands.add_parser("serve", help="run the fleet service (an embedded MQTT broker unless --broker)")
    serve.add_argument("--broker", help="mqtt[s]://[USER[:PASSWORD]@]HOST:PORT of a running broker")
    serve.add_argument("--listen", type=int, default=1883, help="port of the embedded broker (loopback only)")
    serve.add_argument("--tls-cert", type=Path, help="the embedded broker speaks only TLS, with this certificate")
    serve.add_argument("--tls-key", type=Path, help="the private key of --tls-cert")
    serve.add_argument("--username", help="MQTT user (with the password from --password-env)")
    serve.add_argument("--password-env", default="OFFSITE_EDGE_MQTT_PASSWORD", help="env variable with the password")
    serve.add_argument("--key", type=Path, help="signing key (default: coordinator.key where `keys init` put it)")
    serve.add_argument("--prefix", default="offsite", help="topic prefix shared with the devices")
    serve.add_argument("--state", type=Path, help=f"registry and files (default {default_state_directory()})")
    serve.add_argument(
        "--worker", action="store_true", help="one of several services sharing --state (or its files on a shared "
        "disk) and --registry, behind one --broker with MQTT 5 shared subscriptions: each device message goes to one"
    )  # fmt: skip
    serve.add_argument(
        "--worker-timeout", type=float, default=WORKER_TIMEOUT_SECONDS, metavar="SECONDS",
        help="with --worker: a worker silent this long is gone; its jobs and downloads are taken over",
    )  # fmt: skip
    serve.add_argument(
        "--dashboard", type=int, metavar="PORT", help="serve the fleet dashboard (a web page and JSON API) on this "
        "port; its URL, with the token from STATE/dashboard.token, is printed"
    )  # fmt: skip
    serve.add_argument("--dashboard-host", default="127.0.0.1", help="address the dashboard listens on (default "
                       "loopback; reach it from elsewhere through an SSH tunnel or a TLS proxy)")  # fmt: skip
    serve.add_argument("--dashboard-control", action="store_true",
                       help="let the dashboard dispatch and cancel jobs (default: read-only)")  # fmt: skip
    serve.add_argument(
        "--dashboard-no-auth", action="store_true", help="serve the dashboard without its token (loopback only; any "
        "local user can then read it, and with --dashboard-control, use it)"
    )  # fmt: skip
    add_registry_option(serve)
    add_tls_options(serve)

    fleet = commands.add_parser("fleet", help="the fleet registry: devices, dispatch, status, results")
    actions = fleet.add_subparsers(dest="fleet_command", required=True)
    enroll = actions.add_parser("enroll", help="trust a device's key: only enrolled devices are heard")
    enroll.add_argument("device", help="the device id it runs with (edge-runtime run --device-id)")
    enroll.add_argument("--key", type=Path, help="its device.pub (edge-runtime keys prints where)")
    enroll.add_argument("--remove", action="store_true", help="forget the device's key: it is no longer heard")
    devices = actions.add_parser("devices", help="devices that announced themselves, with profile and datasets")
    dispatch = actions.add_parser("dispatch", help="queue a federated job for `coordinator serve` to run")
    add_dispatch_options(dispatch)
    dispatch.add_argument("--wait", action="store_true", help="wait until the job is done, then print its results")
    cancel = actions.add_parser("cancel", help="stop a job: its devices' results are no longer collected")
    cancel.add_argument("job")
    status = actions.add_parser("status", help="jobs and their rounds (one job with JOB)")
    status.add_argument("job", nargs="?")
    status.add_argument("--wait", action="store_true", help="wait until the job is done or failed")
    results = actions.add_parser("results", help="per-device results of a job and each round's aggregate")
    results.add_argument("job")
    for action in (enroll, devices, dispatch, cancel, status, results):
        action.add_argument("--state", type=Path, help=f"the service's --state (default {default_state_directory()})")
        add_registry_option(action)


def add_dispatch_options(parser: argparse.ArgumentParser) -> None:
    """What a job is: `fleet dispatch`'s options, which the dashboard's dispatch form parses too."""
    add_request_options(parser, steps=50, steps_help="training steps per device per round")
    parser.add_argument("--dataset", required=True, help="the dataset name devices configured (--dataset NAME=…)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--devices", help="comma-separated device ids (default: every online device with it)")
    parser.add_argument("--test", type=Path, help="held-out data the aggregate is scored on after each round")
    parser.add_argument("--limit-test", type=int, help="score only the first N test examples")
    parser.add_argument(
        "--aggregate",
        default="fedavg",
        metavar="RULE",
        help="how a round's device adapters combine: fedavg (weighted by examples), or a rule one bad device cannot "
        "steer: median, trimmed-mean:0.2 (cut 20%% at each end), krum:f=1 (needs 2f+3 devices)",
    )
    parser.add_argument("--clip-norm", type=float, help="clip each device's update to this L2 norm first")
    parser.add_argument(
        "--deadline", type=float, metavar="SECONDS", help="a round waits this long for its devices, then goes on "
        "with those that answered (default: until every device answers or refuses)"
    )  # fmt: skip
    parser.add_argument("--quorum", type=int, default=1, help="fewest results a round aggregates (default 1)")
    parser.add_argument(
        "--per-device", action="store_true", help="choose each device's emulator, adapter rank, micro-batch and "
        "steps to fit its memory and the --deadline, for the best expected accuracy (`fleet status JOB` says why)"
    )  # fmt: skip
    parser.add_argument(
        "--candidate-emulator", action="append", default=[], metavar="SPEC",
        help="with --per-device: another emulator recipe to consider (repeat it); the bundle's own and its int8 "
        "variant always are",
    )  # fmt: skip
    parser.add_argument("--lora-ranks", help="with --per-device and a LoRA adapter: ranks to consider, e.g. 8,4,2")
    parser.add_argument("--min-steps", type=int, help="with --per-device: fewest steps a device may run "
                          "(default a quarter of --steps); a device that cannot is left out")  # fmt: skip
    parser.add_argument(
        "--split-after", type=int, metavar="K", help="split learning (SFPrompt): each device trains a soft prompt "
        "through the model's first K layers and this service runs the rest, every step over the broker "
        "(with --adapter-kind prompt:tokens=N; for devices that cannot hold an emulator)"
    )  # fmt: skip
    parser.add_argument("--prune-fraction", type=float, default=0.0, help="with --split-after: each device "
                          "first drops this share of its easiest examples (EL2N)")  # fmt: skip
    parser.add_argument(
        "--cut-dp", type=parse_dp, metavar="epsilon=E[,delta=D][,clip=C]", help="with --split-after: clip each "
        "example's cut to C and noise it so what crosses is (E, D)-DP (see the README: expect no learning at E = 8)"
    )  # fmt: skip


def add_registry_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--registry", metavar="URL", default=os.environ.get("OFFSITE_EDGE_REGISTRY"),
        help="postgresql://USER@HOST:PORT/DATABASE: the registry on a PostgreSQL server (password from PGPASSWORD or "
        "~/.pgpass; default $OFFSITE_EDGE_REGISTRY, else the SQLite file in --state)",
    )  # fmt: skip


def _embedded_tls(args: argparse.Namespace) -> tuple[Path, Path] | None:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together: the embedded broker needs both")
    if args.tls_cert is not None and args.broker:
        raise ConfigError("--tls-cert/--tls-key configure the embedded broker; with --broker, TLS is that broker's")
    for path in (args.tls_cert, args.tls_key):
        if path is not None and not path.is_file():
            raise ConfigError(f"{path} is not a file")
    return (args.tls_cert, args.tls_key) if args.tls_cert else None


def serve(args: argparse.Namespace) -> None:
    from coordinator.fleet.broker import EmbeddedBroker
    from coordinator.fleet.broker_access import BrokerAccess
    from coordinator.fleet.service import FleetService, lock_state
    from edge_runtime.mqtt import BrokerAddress, tls_from_args
    from edge_runtime.wire import Topics
    from exporters.bundle import PRIVATE_KEY, default_key_directory

    # force: onnxruntime's tools call basicConfig when imported, which would leave INFO unshown
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True
    )
    state = args.state or default_state_directory()
    if args.worker and not args.broker:
        raise ConfigError("--worker needs --broker: the workers share an MQTT 5 broker (Mosquitto, EMQX, HiveMQ); "
                          "the embedded one speaks MQTT 3.1.1 only, without shared subscriptions")  # fmt: skip
    if args.worker_timeout <= 2 * HEARTBEAT_SECONDS:
        raise ConfigError(f"--worker-timeout {args.worker_timeout:g} must exceed two heartbeats "
                          f"({2 * HEARTBEAT_SECONDS:g} s)")  # fmt: skip
    if args.dashboard is None and (args.dashboard_control or args.dashboard_no_auth):
        raise ConfigError("--dashboard-control and --dashboard-no-auth configure the dashboard; add --dashboard PORT")
    lock = lock_state(state, shared=args.worker)  # noqa: F841 (held until this process ends)
    registry, topics, tls = Registry(state, args.registry), Topics(args.prefix), _embedded_tls(args)
    broker = None
    if args.broker:
        address = BrokerAddress.parse(
            args.broker, args.username, os.environ.get(args.password_env), tls_from_args(args)
        )
    else:  # first: devices may be waiting
        broker = EmbeddedBroker(BrokerAccess(registry.enrolled_key, topics), port=args.listen, tls=tls).start()
        address = broker.coordinator_address(args.ca)
    dashboard = None
    try:  # the broker (and the dashboard) stop however this ends
        key = args.key or default_key_directory() / PRIVATE_KEY
        service = FleetService(registry, address, key, state / "files", topics, args.worker, args.worker_timeout)
        dashboard = _dashboard(args, state, service.refusals)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        where = f"embedded broker {address}" if broker else str(address)
        role = f"worker {service.worker_id}" if args.worker else "coordinator"
        print(f"{role}: serving the fleet on {where}; registry {registry.db.where}; Ctrl-C stops", flush=True)
        if dashboard is not None:
            print(f"dashboard: {dashboard.url}", flush=True)
        service.run(stop)
    finally:
        if dashboard is not None:
            dashboard.stop()
        if broker is not None:
            broker.stop()


def _dashboard(
    args: argparse.Namespace, state: Path, refusals: Callable[[], tuple[int, list[str]]]
) -> Dashboard | None:
    """The dashboard `serve --dashboard` asks for, started (None without it)."""
    from coordinator.fleet.dashboard import Dashboard, DashboardOptions, dashboard_token

    if args.dashboard is None:
        return None
    token = None if args.dashboard_no_auth else dashboard_token(state)
    options = DashboardOptions(args.dashboard, args.dashboard_host, token, args.dashboard_control)
    try:
        return Dashboard(Registry(state, args.registry), options, refusals).start()
    except OSError as error:
        raise ConfigError(f"--dashboard {args.dashboard}: cannot listen on {args.dashboard_host}:{args.dashboard} "
                          f"({error.strerror}); pick another port") from None  # fmt: skip


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(header, widths, strict=True))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def format_devices(registry: Registry) -> str:
    rows = []
    for d in registry.devices():
        profile = d["profile"] or {}
        datasets = ", ".join(f"{k} ({v})" for k, v in (d["datasets"] or {}).items())
        seen = time.strftime("%H:%M:%S", time.localtime(d["last_seen"]))
        rows.append([d["id"], d["state"], profile.get("name", "?"), ",".join(d["backends"] or []), datasets, seen])
    return _table(rows, ["device", "state", "profile", "backends", "datasets", "last seen"]) if rows else "no devices"


def format_status(registry: Registry, job: str | None) -> str:
    jobs = [registry.job(job)] if job else registry.jobs()
    rows = []
    for j in jobs:
        spec = j["spec"]
        tasks = registry.tasks(j["id"], j["round"]) if j["round"] else []
        progress = ", ".join(
            f"{t['device']}: {t['state']}"
            + (f" {t['detail']['step']}/{t['detail']['steps']}" if t["state"] == "training" else "")
            for t in tasks
        )
        reason = j["detail"].get("reason", "")
        state = j["state"] + (f" by {j['owner']}" if j["owner"] else "")
        rows.append([j["id"], state, f"{j['round']}/{spec['rounds']}", spec["dataset"], progress or reason])
    table = _table(rows, ["job", "state", "round", "dataset", "devices"]) if rows else "no jobs"
    return "\n".join([table, *format_workers(registry)])


def format_workers(registry: Registry, recent: float = 600.0) -> list[str]:
    """A line on the services heard from in the last `recent` seconds, when more than one was."""
    now = time.time()
    workers = [w for w in registry.workers() if now - w["heartbeat"] < recent]
    if len(workers) < 2:
        return []
    states = []
    for worker in workers:
        silent = now - worker["heartbeat"]
        states.append(f"{worker['id']} ({'alive' if silent < WORKER_TIMEOUT_SECONDS else f'silent {silent:.0f} s'})")
    return [f"service workers: {', '.join(states)}"]


def _mib(value: Any) -> str:
    return f"{value / MIB:,.0f}" if value else "-"


def _epsilon(metrics: dict[str, Any]) -> str:
    """A run's ε spent ("∞": trained without differential privacy; "-": no result)."""
    if not metrics:
        return "-"
    epsilon = (metrics.get("privacy") or {}).get("epsilon")
    return "∞" if epsilon is None else f"{epsilon:.2f}"


def format_results(registry: Registry, job: str) -> str:
    """The fleet table: per device and round, what it trained and what crossed the wire."""
    rows = []
    for t in registry.tasks(job):
        m = t["metrics"] or {}
        rows.append(
            [
                t["device"],
                str(t["round"]),
                t["state"],
                str(m.get("steps", "-")),
                str(t["examples"] or "-"),
                f"{m['final_loss']:.3f}" if m else "-",
                _mib(m.get("peak_memory_bytes")),
                f"{m['wall_seconds']:.0f}" if m else "-",
                f"{t['bytes_sent'] / 1e6:,.1f}",
                f"{t['bytes_received'] / 1e6:,.2f}",
                _epsilon(m),
            ]
        )
    header = ["device", "round", "state", "steps", "examples", "loss", "peak MiB", "wall s", "MB sent", "MB received"]
    header.append("ε")
    lines = [_table(rows, header), ""]
    for r in registry.rounds(job):
        score = f"plug-in {_score(r['evaluation'])}" if r["evaluation"] else "not scored (dispatch --test)"
        lines.append(f"round {r['round']}: {r['state']}; aggregate {r['aggregate'] or '-'}; {score}")
    if zero_shot := registry.job(job)["detail"].get("zero_shot"):
        lines.append(f"full model zero-shot: {_score(zero_shot)}")
    return "\n".join(lines)


def _score(evaluation: dict[str, Any]) -> str:
    value = evaluation["value"]
    shown = f"{100 * value:.1f} %" if evaluation["metric"] == "accuracy" else f"{value:.2f}"
    return f"{evaluation['metric']} {shown} on {evaluation['examples']} examples"


def enroll(registry: Registry, device: str, key: Path | None, remove: bool) -> str:
    """Record (or with `remove`, forget) `device`'s public key; only enrolled devices' messages are read."""
    from edge_runtime.identity import parse_public_key
    from edge_runtime.wire import WireError, check_device_id

    try:
        check_device_id(device)
    except WireError as error:
        raise ConfigError(str(error)) from None
    if device == "coordinator":
        raise ConfigError("'coordinator' is the service's own broker user; give the device another id")
    if remove:
        return f"{device} removed" if registry.unenroll(device) else f"{device} was not enrolled"
    if key is None or not key.is_file():
        raise ConfigError(f"--key {key} is not a file; give the device.pub that `edge-runtime keys` printed")
    pem = key.read_text(encoding="ascii", errors="replace")
    parse_public_key(pem, str(key))
    registry.enroll(device, pem)
    return f"{device} enrolled; its signed messages are heard from now on"


def _ranks(text: str | None) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",")) if text else ()
    except ValueError:
        raise ConfigError(f"--lora-ranks {text!r} is not a comma-separated list of ranks, e.g. 8,4,2") from None


def _split_job(args: argparse.Namespace) -> SplitJob | None:
    if args.split_after is None:
        if args.prune_fraction or args.cut_dp is not None:
            raise ConfigError("--prune-fraction and --cut-dp belong to split jobs; add --split-after K")
        return None
    return SplitJob(args.split_after, args.prune_fraction, cut_dp=args.cut_dp)


def format_configurations(detail: dict[str, Any]) -> str:
    """A per-device job's choices, one device a line, with why; what one configuration for all would have been."""
    from coordinator.fleet.configure import Candidate

    lines = []
    for device, choice in sorted((detail.get("configurations") or {}).items()):
        lines.append(f"  {device} ({choice['profile']}): {choice['why']}")
    for device, why in sorted((detail.get("left_out") or {}).items()):
        lines.append(f"  {device}: left out, {why}")
    fixed = detail.get("fixed") or {}
    if fixed:
        one = next(iter(fixed.values()))
        label = Candidate(**one["candidate"]).label()
        expected = one["utility"]["accuracy"]
        utility = f" ({100 * expected:.1f} % expected)" if expected is not None else ""
        lines.append(f"  one configuration for all would be: {label}, {one['steps']} steps each{utility}")
    elif detail.get("configurations"):
        lines.append("  no single configuration fits every device")
    return "\n".join(["per-device configuration:", *lines]) if lines else ""


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    """The job `fleet dispatch`'s options describe, checked (ConfigError names the bad option)."""
    from coordinator.fleet.jobs import JobSpec

    return JobSpec(
        args.dataset,
        request_from_args(args),
        args.rounds,
        args.devices.split(",") if args.devices else None,
        test=str(args.test.resolve()) if args.test else None,
        limit_test=args.limit_test,
        aggregate=args.aggregate,
        clip_norm=args.clip_norm,
        deadline_s=args.deadline,
        quorum=args.quorum,
        per_device=args.per_device,
        candidate_emulators=tuple(args.candidate_emulator),
        lora_ranks=_ranks(args.lora_ranks),
        min_steps=args.min_steps,
        split=_split_job(args),
    )


def cancel_job(registry: Registry, job: str) -> str:
    """Fail `job` as cancelled by the operator; ConfigError when it is unknown or already done or failed."""
    state = registry.job(job)["state"]
    if state in JOB_DONE or not registry.fail_job(job, "cancelled by the operator"):
        raise ConfigError(f"{job} is already {registry.job(job)['state']}; there is nothing to cancel")
    return f"{job} cancelled (it was {state}); its devices' results are no longer collected"


def fleet(args: argparse.Namespace) -> None:
    registry = Registry(args.state or default_state_directory(), args.registry)
    if args.fleet_command == "enroll":
        print(enroll(registry, args.device, args.key, args.remove))
        return
    if args.fleet_command == "devices":
        print(format_devices(registry))
        return
    if args.fleet_command == "cancel":
        print(cancel_job(registry, args.job))
        return
    job = getattr(args, "job", None)
    if args.fleet_command == "dispatch":
        spec = spec_from_args(args)
        job = registry.add_job(spec.to_dict())
        print(f"queued {job}: {args.rounds} rounds of {args.steps} steps on {args.dataset}", flush=True)
    if getattr(args, "wait", False):
        while registry.job(job)["state"] not in JOB_DONE:
            time.sleep(2)
    if args.fleet_command == "results" or (args.fleet_command == "dispatch" and args.wait):
        print(format_results(registry, job))
    else:
        print(format_status(registry, job))
        if job is not None and (chosen := format_configurations(registry.job(job)["detail"])):
            print(chosen)
