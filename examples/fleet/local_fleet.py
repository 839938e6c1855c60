"""A whole fleet on one machine: embedded broker + coordinator service + edge daemons, one federated job.

    python examples/fleet/local_fleet.py --train train.jsonl --test test.jsonl --devices 2 --rounds 2 --steps 40

Every part runs as its own process, exactly as on a real fleet (swap the loopback broker for yours):

    coordinator keys init --out KEYS
    edge-runtime keys --device-id dev-1 --state DEV1                                  # on each device: its key
    coordinator fleet enroll dev-1 --key DEV1/device.pub --state STATE                # the operator trusts it
    coordinator serve --state STATE --listen PORT --key KEYS/coordinator.key \\
        --dashboard 8765                                                            # broker + service + page
    edge-runtime run --broker mqtt://127.0.0.1:PORT --device-id dev-1 --state DEV1 --profile laptop-16gb \\
        --dataset reviews=shard-1.jsonl --trust KEYS/coordinator.pub --threads 1       # on each device
    coordinator fleet dispatch --state STATE --dataset reviews --rounds 2 --steps 40 --test test.jsonl
    coordinator fleet results JOB --state STATE

Each device gets its own private shard of the training data; only adapters cross the wire. The embedded broker
lets in only enrolled devices, each on its own topics, and every record on the wire is signed by its sender.
Prints the fleet table, then the five-setting table with the fleet's aggregate adapter as the offsite adapter,
then writes the aggregate plugged into the full model as a GGUF file and completes a review with llama.cpp:

    coordinator plug --adapter AGGREGATE --gguf tuned.gguf
    coordinator score --gguf tuned.gguf --generate "Review: ...\nSentiment:"
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from coordinator.defaults import DEFAULT_EMULATOR, DEFAULT_KEEP
from coordinator.fleet.broker import free_port
from coordinator.fleet.cli import format_results, format_status
from coordinator.fleet.registry import JOB_DONE, Registry
from coordinator.tasks import DEFAULT_TEMPLATE
from edge_runtime.data import load_examples


def split_shards(train: Path, devices: int, out: Path, seed: int = 0) -> list[Path]:
    """Shuffle `train` and deal it into `devices` shards of unequal size (so FedAvg's weights matter)."""
    examples = load_examples(train)
    random.Random(seed).shuffle(examples)
    weights = [devices + i for i in range(devices)]  # e.g. 2:3 for two devices
    bounds = [round(len(examples) * sum(weights[:i]) / sum(weights)) for i in range(devices + 1)]
    paths = []
    for i in range(devices):
        path = out / f"shard-{i + 1}.jsonl"
        rows = [{"text": e.text, "label": e.label} for e in examples[bounds[i] : bounds[i + 1]]]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        paths.append(path)
    return paths


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until the coordinator listens on `port`: its embedded broker (the daemons would also wait, but say less) or
    its dashboard."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the coordinator did not listen on port {port}; see {log}") from None
            time.sleep(0.2)


def _command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--train", type=Path, required=True, help="split into one private shard per device")
    parser.add_argument("--test", type=Path, required=True, help="the model owner's held-out data")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="steps per device per round")
    parser.add_argument("--adapter-layers", default="2,2")
    parser.add_argument("--emulator", default=DEFAULT_EMULATOR, help="emulator recipe, as for `coordinator export`")
    parser.add_argument("--keep", type=int, default=DEFAULT_KEEP, help="middle layers the emulator keeps")
    parser.add_argument("--limit-test", type=int, default=500)
    parser.add_argument("--full-steps", type=int, default=100, help="steps of the full fine-tuning baseline")
    parser.add_argument("--profile", default="laptop-16gb")
    parser.add_argument("--out", type=Path, default=Path("runs/fleet-demo"))
    parser.add_argument("--dashboard", type=int, help="the service's dashboard port (default: a free one)")
    parser.add_argument(
        "--no-gguf", action="store_true", help="skip the GGUF and llama.cpp step (a folder model has no GGUF source)"
    )
    args = parser.parse_args(argv)

    shutil.rmtree(args.out, ignore_errors=True)
    (args.out / "logs").mkdir(parents=True)
    state, keys = args.out / "coordinator", args.out / "keys"
    subprocess.run(_command("coordinator.cli", "keys", "init", "--out", str(keys)), check=True, capture_output=True)
    shards = split_shards(args.train, args.devices, args.out)
    port, dashboard = free_port(), args.dashboard or free_port()
    threads = str(max(1, (os.cpu_count() or 2) // args.devices))  # the daemons share the cores, never oversubscribe
    processes = []

    def start(name: str, command: list[str]) -> None:
        log = (args.out / "logs" / f"{name}.log").open("w")
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))

    try:
        start(
            "coordinator",
            _command(
                "coordinator.cli",
                "serve",
                "--state",
                str(state),
                "--listen",
                str(port),
                "--key",
                str(keys / "coordinator.key"),
                "--dashboard",
                str(dashboard),
            ),
        )
        _wait_for_port(port, processes[0], args.out / "logs" / "coordinator.log")
        _wait_for_port(dashboard, processes[0], args.out / "logs" / "coordinator.log")
        token = (state / "dashboard.token").read_text().strip()
        print(f"dashboard (live while the demo runs): http://127.0.0.1:{dashboard}/?token={token}", flush=True)
        for i in range(1, args.devices + 1):  # each device makes its key; the operator enrolls it
            device, folder = f"device-{i}", str(args.out / f"device-{i}")
            subprocess.run(_command("edge_runtime.cli", "keys", "--device-id", device, "--state", folder),
                           check=True, capture_output=True)  # fmt: skip
            enroll = ("fleet", "enroll", device, "--key", f"{folder}/device.pub", "--state", str(state))
            subprocess.run(_command("coordinator.cli", *enroll), check=True, capture_output=True)
        for i, shard in enumerate(shards, 1):
            start(
                f"device-{i}",
                _command(
                    "edge_runtime.cli",
                    "run",
                    "--broker",
                    f"mqtt://127.0.0.1:{port}",
                    "--device-id",
                    f"device-{i}",
                    "--profile",
                    args.profile,
                    "--dataset",
                    f"reviews={shard}",
                    "--trust",
                    str(keys / "coordinator.pub"),
                    "--state",
                    str(args.out / f"device-{i}"),
                    "--threads",
                    threads,
                ),
            )
        registry = Registry(state)
        deadline = time.monotonic() + 120
        while len([d for d in registry.devices() if d["profile"]]) < args.devices:
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise SystemExit(f"the fleet did not come up; see {args.out / 'logs'}")
            time.sleep(0.5)
        print(f"fleet up: embedded broker on 127.0.0.1:{port}, {args.devices} devices; logs in {args.out / 'logs'}")
        dispatch = subprocess.run(
            _command(
                "coordinator.cli",
                "fleet",
                "dispatch",
                "--state",
                str(state),
                "--model",
                args.model,
                "--dataset",
                "reviews",
                "--rounds",
                str(args.rounds),
                "--steps",
                str(args.steps),
                "--adapter-layers",
                args.adapter_layers,
                "--keep",
                str(args.keep),
                "--emulator",
                args.emulator,
                "--test",
                str(args.test),
                "--limit-test",
                str(args.limit_test),
            ),
            check=True,
            capture_output=True,
            text=True,
        )
        job = dispatch.stdout.split()[1].rstrip(":")
        started, shown, shown_at = time.monotonic(), "", 0.0
        while registry.job(job)["state"] not in JOB_DONE:
            line = " ".join(format_status(registry, job).splitlines()[-1].split())
            phases = re.sub(r" \d+/\d+,?", "", line)  # the line without step counts
            if phases != shown or time.monotonic() - shown_at > 15:  # a new phase, else every 15 s
                print(f"[{time.monotonic() - started:5.0f} s] {line}", flush=True)
                shown, shown_at = phases, time.monotonic()
            if any(p.poll() is not None for p in processes):
                raise SystemExit(f"a fleet process stopped; see {args.out / 'logs'}")
            time.sleep(2)
        record = registry.job(job)
        if record["state"] != "done":
            raise SystemExit(f"{job} failed: {record['detail'].get('reason')}")
        print(f"\n{job} done in {time.monotonic() - started:.0f} s\n\n{format_results(registry, job)}\n", flush=True)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=30)

    subprocess.run(
        _command(
            "coordinator.cli",
            "evaluate",
            "--model",
            args.model,
            "--train",
            str(args.train),
            "--test",
            str(args.test),
            "--adapter-layers",
            args.adapter_layers,
            "--keep",
            str(args.keep),
            "--emulator",
            args.emulator,
            "--steps",
            str(args.full_steps),
            "--limit-test",
            str(args.limit_test),
            "--adapter",
            record["detail"]["aggregate"],
            "--out",
            str(args.out / "results.json"),
        ),
        check=True,
    )
    if args.no_gguf:
        return
    tuned = args.out / "tuned.gguf"
    plug = ("plug", "--model", args.model, "--adapter", record["detail"]["aggregate"], "--gguf", str(tuned))
    subprocess.run(_command("coordinator.cli", *plug), check=True)
    prompt = DEFAULT_TEMPLATE.format(text=load_examples(args.test)[0].text)
    print(f"\nllama.cpp completes a test review with the tuned model ({tuned}):", flush=True)
    score = ("score", "--gguf", str(tuned), "--generate", prompt, "--max-tokens", "1")
    subprocess.run(_command("coordinator.cli", *score), check=True)


if __name__ == "__main__":
    main()
