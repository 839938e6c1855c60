"""Fleet benchmark: N simulated devices (tiny model, one process) on loopback; embedded amqtt vs Mosquitto, each
without and with TLS.

    python -m bench.fleet [--devices 50] [--rounds 2] [--steps 5] [--repeats 2]

Measures, per broker and transport in the same run (plain and TLS interleaved, `repeats` pairs each): seconds from
dispatch to every round aggregated, messages and bytes on the wire (every client's count), results lost (must be
0). Writes a table with TLS's cost as a ratio to plain, and a plot of results arriving.
"""

from __future__ import annotations

import argparse
import getpass
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.markdown import machine_line, write_section
from coordinator.bundles.request import BundleRequest
from coordinator.datasets import write_jsonl
from coordinator.fleet.broker import EmbeddedBroker, free_port
from coordinator.fleet.broker_access import BrokerAccess
from coordinator.fleet.jobs import JobSpec
from coordinator.fleet.registry import Registry
from coordinator.fleet.service import FleetService
from coordinator.train import TrainConfig
from device_profiles import load_profile
from edge_runtime.daemon import DaemonConfig, EdgeDaemon
from edge_runtime.files import atomic_path, write_json_atomic
from edge_runtime.identity import device_key, public_pem
from edge_runtime.mqtt import BrokerAddress, TlsFiles
from edge_runtime.wire import Topics
from tests.certificates import Pki, make_pki
from tests.conftest import make_model, make_tokenizer, sentiment_examples

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results" / "fleet.json"
BROKERS = ("amqtt", "mosquitto")


class _Embedded:
    """The embedded broker as `coordinator serve` runs it: enrolled devices only, TLS with `pki`."""

    def __init__(self, directory: Path, pki: Pki | None) -> None:
        self.enrolled: dict[str, str] = {}
        tls = (pki.server, pki.server_key) if pki else None
        self.broker = EmbeddedBroker(BrokerAccess(self.enrolled.get), port=free_port(), tls=tls).start()
        self.pki = pki

    def address(self, user: str) -> BrokerAddress:
        if user == "coordinator":
            return self.broker.coordinator_address(self.pki.ca if self.pki else None)
        return BrokerAddress("127.0.0.1", self.broker.port, tls=TlsFiles(self.pki.ca) if self.pki else None)

    def stop(self) -> None:
        self.broker.stop()


class _Mosquitto:
    """Mosquitto (any login, loopback) on a free port; TLS only with `pki` (server certificate, no client's)."""

    def __init__(self, directory: Path, pki: Pki | None) -> None:
        self.port, self.pki = free_port(), pki
        tls = f"certfile {pki.server}\nkeyfile {pki.server_key}\ntls_version tlsv1.2\n" if pki else ""
        config = directory / f"mosquitto-{self.port}.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\n{tls}allow_anonymous true\nuser {getpass.getuser()}\nlog_dest none\n"
        )
        self.process = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(config)])
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def address(self, user: str) -> BrokerAddress:
        tls = TlsFiles(self.pki.ca) if self.pki else None
        return BrokerAddress("127.0.0.1", self.port, "coordinator" if user == "coordinator" else None, None, tls)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def _files(root: Path, devices: int) -> dict[str, Any]:
    from coordinator.cli import main as coordinator

    tokenizer = make_tokenizer()
    make_model("llama", vocab_size=len(tokenizer)).save_pretrained(root / "tiny-llama")
    tokenizer.save_pretrained(root / "tiny-llama")
    shards = []
    for i in range(devices):
        shards.append(root / f"shard-{i}.jsonl")
        write_jsonl(shards[-1], sentiment_examples(16 + 8 * (i % 4), seed=i))
    coordinator(["keys", "init", "--out", str(root / "keys")])
    return {"model": root / "tiny-llama", "keys": root / "keys", "shards": shards}


def run_fleet(broker: _Embedded | _Mosquitto, files: dict[str, Any], root: Path, rounds: int, steps: int) -> dict:
    """One federated job over all devices (each enrolled, signing what it sends); timings and every client's
    traffic."""
    stop = threading.Event()
    registry = Registry(root / "coordinator")
    service = FleetService(
        registry, broker.address("coordinator"), files["keys"] / "coordinator.key", root / "files", Topics()
    )
    threads = [threading.Thread(target=service.run, args=(stop,), daemon=True)]
    daemons = []
    for i, shard in enumerate(files["shards"]):
        device, state = f"sim-{i:03d}", root / f"device-{i}"
        pem = public_pem(device_key(state))
        registry.enroll(device, pem)
        if isinstance(broker, _Embedded):
            broker.enrolled[device] = pem
        config = DaemonConfig(
            device,
            load_profile("laptop-16gb"),
            {"reviews": shard},
            files["keys"] / "coordinator.pub",
            state,
            threads=1,
            isolate=False,  # simulated devices train in this one process, not a child each
        )
        daemons.append(EdgeDaemon(config, broker.address(device)))
        threads.append(threading.Thread(target=daemons[-1].run, args=(stop,), daemon=True))
    for thread in threads:
        thread.start()
    while len([d for d in registry.devices() if d["profile"]]) < len(daemons):
        time.sleep(0.1)
    training = TrainConfig(steps, 1e-3, batch_size=8, max_length=32)
    request = BundleRequest(str(files["model"]), adapter_layers=(1, 1), keep=2, training=training)
    started = time.time()
    job = registry.add_job(JobSpec("reviews", request, rounds).to_dict())
    while registry.job(job)["state"] not in ("done", "failed"):
        time.sleep(0.05)
    finished = time.time()
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    tasks = registry.tasks(job)
    clients = [service.connection.traffic, *(d.connection.traffic for d in daemons)]
    return {
        "state": registry.job(job)["state"],
        "seconds": finished - started,
        "devices": len(daemons),
        "results_expected": len(daemons) * rounds,
        "results_received": sum(t["state"] == "received" for t in tasks),
        "arrivals": sorted(t["finished"] - started for t in tasks if t["state"] == "received"),
        "messages": sum(c.sent_messages + c.received_messages for c in clients),
        "bytes": sum(c.sent_bytes + c.received_bytes for c in clients),
        "rejections": service.refused + sum(d.refused for d in daemons),
    }


def measure(devices: int, rounds: int, steps: int, repeats: int) -> dict[str, Any]:
    """Per broker, `repeats` pairs of (plain, TLS) runs, interleaved so drift hits both alike."""
    results: dict[str, Any] = {"machine": machine_line(), "devices": devices, "rounds": rounds, "steps": steps}
    have_mosquitto = shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        files, pki = _files(root, devices), make_pki(root / "pki")
        for repeat in range(repeats):
            for name in BROKERS if have_mosquitto else BROKERS[:1]:
                for tls in (False, True):
                    kind = _Embedded if name == "amqtt" else _Mosquitto
                    broker = kind(root, pki if tls else None)
                    folder = root / f"{name}-{'tls' if tls else 'plain'}-{repeat}"
                    try:
                        run = run_fleet(broker, files, folder, rounds, steps)
                    finally:
                        broker.stop()
                    runs.append(run | {"broker": name, "tls": tls, "repeat": repeat})
                    print(f"{name} {'TLS' if tls else 'plain'} #{repeat + 1}: {run['state']} in {run['seconds']:.1f} s")
    results["runs"] = runs
    return results


def _runs(results: dict[str, Any], broker: str, tls: bool) -> list[dict[str, Any]]:
    return [r for r in results["runs"] if r["broker"] == broker and r["tls"] == tls]


def report(results: dict[str, Any]) -> str:
    lines = [
        "| broker | transport | state | dispatch → all aggregated (median) | messages | MB on the wire | results lost "
        "| rejected | TLS ÷ plain time (median of pairs, range) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in BROKERS:
        for tls in (False, True):
            runs = _runs(results, name, tls)
            if not runs:
                continue
            ratio = ""
            if tls:
                pairs = [t["seconds"] / p["seconds"] for p, t in zip(_runs(results, name, False), runs, strict=True)]
                ratio = f"**{statistics.median(pairs):.2f}×** ({min(pairs):.2f}–{max(pairs):.2f})"
            lost = sum(r["results_expected"] - r["results_received"] for r in runs)
            states = ", ".join(sorted({r["state"] for r in runs}))
            lines.append(
                f"| {name} | {'TLS' if tls else 'plain'} | {states} | "
                f"{statistics.median(r['seconds'] for r in runs):.1f} s | "
                f"{statistics.median(r['messages'] for r in runs):,.0f} | "
                f"{statistics.median(r['bytes'] for r in runs) / 1e6:,.1f} | {lost} | "
                f"{sum(r['rejections'] for r in runs)} | {ratio} |"
            )
    plain = {name: _runs(results, name, False) for name in BROKERS}
    if all(plain.values()):
        ratio = statistics.median(r["seconds"] for r in plain["amqtt"]) / statistics.median(
            r["seconds"] for r in plain["mosquitto"]
        )
        lines.append(f"\namqtt ÷ Mosquitto time (plain): **{ratio:.2f}×**.")
    return "\n".join(lines)


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name in BROKERS:
        for tls in (False, True):
            for run in _runs(results, name, tls)[:1]:  # the first of each: the repeats look alike
                arrivals = run["arrivals"]
                label = f"{name} {'TLS' if tls else 'plain'}"
                axis.step(
                    arrivals, range(1, len(arrivals) + 1), where="post", label=label, linestyle="--" if tls else "-"
                )
    axis.set_xlabel("seconds since dispatch")
    axis.set_ylabel("results received")
    axis.set_title(f"{results['devices']} simulated devices, {results['rounds']} rounds of {results['steps']} steps")
    axis.legend()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="pairs of (plain, TLS) runs per broker")
    args = parser.parse_args()
    results = measure(args.devices, args.rounds, args.steps, args.repeats)
    write_json_atomic(OUT, results)
    publish(results)


def publish(results: dict[str, Any]) -> None:
    """Plot, print and write the BENCHMARKS.md section from measured `results`."""
    repeats = 1 + max(r["repeat"] for r in results["runs"])
    args = argparse.Namespace(devices=results["devices"], rounds=results["rounds"], steps=results["steps"])
    _plot(results, OUT.with_suffix(".png"))
    table = report(results)
    print(table)
    body = "\n".join(
        [
            "## Fleet over MQTT: simulated devices on loopback, embedded broker vs Mosquitto, plain vs TLS",
            "",
            f"Command: `python -m bench.fleet --devices {args.devices} --rounds {args.rounds} --steps {args.steps} "
            f"--repeats {repeats}` (part of `make bench-studies`).",
            f"Machine: {results['machine']}.",
            "",
            f"{args.devices} edge daemons (a tiny 6-layer LLaMA bundle, ONNX Runtime, 1 thread each, training in the "
            "daemon's own process rather than a child: lightweight simulated devices) and the "
            "coordinator service run in one process, each with its own MQTT client, against the embedded amqtt "
            "broker (enrolled devices only, per-device topics) and Mosquitto 2.0, each over plain MQTT and over TLS "
            "(TLS 1.2 or later, a test CA's certificate; the runs interleaved plain, TLS, plain, TLS, … and the ratio "
            f"is the median of the {repeats} paired ratios). One federated job: export, signed jobs, every record "
            f"signed by its sender, bundle download in chunks, {args.steps} training steps per device per round, "
            "results back in chunks, FedAvg, next round from the aggregate. Time = from `dispatch` to the last round "
            "aggregated. Messages and bytes count every client's sends and receipts (so a message through the broker "
            "counts twice). Lost = results dispatched but never aggregated.",
            "",
            table,
            "",
            "Reading: every simulated device, the service and (for amqtt) the broker share the same 2 cores, so the "
            "time is mostly CPU: each device job opens two ONNX Runtime sessions (training, optimizer) and trains "
            "(≈0.2 s of CPU each, 100 jobs), and the service handles every message on one thread. The least the wire "
            "could carry is the 0.8 MB bundle and two rounds of 0.1 MB adapters per device, counted at both ends: ≈100"
            " MB; the rest is chunks asked for again after a 5 s stall while the service was busy (duplicates are "
            "stored once). TLS costs Mosquitto nothing measurable (its encryption is native code; the paired ratios "
            "straddle 1); the embedded broker's TLS runs through asyncio's SSL layer (Python code around OpenSSL) on "
            "the same two cores as the 50 devices, which slows it and makes more transfers stall and be asked for "
            "again (more messages and bytes). Signing every record (Ed25519, tens of microseconds) is inside all four "
            "numbers. amqtt drops a few client sessions under 50 concurrent connects (its own internal errors); the "
            "clients reconnected and nothing was lost.",
            "",
            f"![results arriving over time](bench/results/{OUT.with_suffix('.png').name})",
        ]
    )
    write_section("fleet", body)


if __name__ == "__main__":
    main()
