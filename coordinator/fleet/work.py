"""The fleet service's heavy work, run on its worker thread: export bundles per profile, aggregate and evaluate."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors import SafetensorError
from safetensors.numpy import load_file

from coordinator.adapters import plugged_in
from coordinator.adapters.files import load_adapter
from coordinator.adapters.layers import adapter_exits
from coordinator.bundles.export import export_bundle
from coordinator.errors import ConfigError, DataError
from coordinator.fleet.aggregate import write_aggregate
from coordinator.fleet.jobs import JobSpec
from coordinator.fleet.registry import Registry
from coordinator.models import LoadedModel, load_model, source_sha256
from coordinator.results import DeviceResult, read_result
from device_profiles import validate
from edge_runtime.bundle import ADAPTER_FILE
from edge_runtime.data import load_examples
from edge_runtime.trainer import ADAPTER
from edge_runtime.transfer import pack_directory

log = logging.getLogger(__name__)
# A result is an adapter as large as the bundle's initial one, plus its metrics: anything larger is refused.
RESULT_SLACK_BYTES = 8 * 1024**2


@dataclass
class Workshop:
    """What the service's worker thread works with: the registry, the signing key, its files, one loaded model."""

    registry: Registry
    key: Ed25519PrivateKey
    work: Path
    models: dict[str, LoadedModel] = field(default_factory=dict)

    def model(self, name: str) -> LoadedModel:
        if name not in self.models:
            self.models.clear()  # one model in memory at a time
            self.models[name] = load_model(name)
        return self.models[name]


def prepare_job(shop: Workshop, job: str, spec: JobSpec, targets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Export one bundle per distinct device profile (cached by the request's hash) and pack it for the wire."""
    loaded = shop.model(spec.bundle.model)
    sha = source_sha256(loaded)
    bundles: dict[str, str] = {}
    for device, row in targets.items():
        profile = validate(row["profile"], f"the profile {device} announced")
        announced = row["backends"] or profile.backends
        backends = tuple(b for b in profile.backends if b in announced)[:1]
        if spec.bundle.dp is not None:  # DP-SGD has per-example gradients on PyTorch only
            if "torch" not in announced:
                raise ConfigError(f"--dp needs the PyTorch backend, which {device} does not have (it announced "
                                  f"{', '.join(announced)}); leave it out with --devices")  # fmt: skip
            backends = ("torch",)
        request = replace(spec.bundle, backends=backends)
        folder = shop.work / "bundles" / request.cache_key(sha, profile)
        archive = folder / "bundle.tar"
        if not archive.exists():
            log.info("%s: exporting a bundle for %s (%s)", job, profile.name, ",".join(request.backends) or "none")
            export_bundle(loaded, request, profile, folder / "bundle", shop.key)
            pack_directory(folder / "bundle", archive)
        bundles[device] = str(archive)
    return {"kind": "prepared", "bundles": bundles, "model_sha256": sha}


def result_limit(archive: Path) -> int:
    """The most bytes a device's result for the bundle packed at `archive` (by `prepare_job`) may take."""
    return (archive.parent / "bundle" / ADAPTER_FILE).stat().st_size + RESULT_SLACK_BYTES


def check_result_adapter(adapter: Path, archive: Path, what: str) -> None:
    """Refuse a device's adapter that is missing, names other tensors or shapes than the bundle packed at
    `archive` started from, or holds NaN or infinite values (it would poison every aggregate rule)."""
    if not adapter.is_file():
        raise DataError(f"{what} has no {ADAPTER}")
    try:
        got = load_file(str(adapter))
    except (SafetensorError, OSError) as error:
        raise DataError(f"{what}: {ADAPTER} is not a safetensors file ({error})") from None
    initial = load_file(str(archive.parent / "bundle" / ADAPTER_FILE))
    shapes = {name: tensor.shape for name, tensor in got.items()}
    if shapes != {name: tensor.shape for name, tensor in initial.items()}:
        raise DataError(f"{what} holds other tensors than its bundle's adapter ({len(got)} for {len(initial)})")
    bad = next((name for name, tensor in got.items() if not np.isfinite(tensor).all()), None)
    if bad is not None:
        raise DataError(f"{what} holds NaN or infinite values in {bad}")


def _capped(result: DeviceResult, shop: Workshop, device: str, spec: JobSpec) -> DeviceResult:
    """`result` counting no more examples than `device` announced for the job's dataset (FedAvg weighs by them)."""
    announced = ((shop.registry.device(device) or {}).get("datasets") or {}).get(spec.dataset, 0)
    if result.metrics.examples <= announced:
        return result
    log.warning("%s claims %d examples of %s, announced %d: counted as %d", device, result.metrics.examples,
                spec.dataset, announced, announced)  # fmt: skip
    return DeviceResult(result.weights, replace(result.metrics, examples=announced))


def finish_round(shop: Workshop, job: str, round_: int, spec: JobSpec) -> dict[str, Any]:
    """Aggregate the round's results into `round-N/aggregate` by the job's rule, then score the plugged-in
    aggregate on `spec.test`. Each device counts at most the examples its profile announced for the dataset."""
    loaded = shop.model(spec.bundle.model)
    received = [t for t in shop.registry.tasks(job, round_) if t["state"] == "received"]
    results = [_capped(read_result(Path(t["result"]), loaded), shop, t["device"], spec) for t in received]
    out = shop.work / "jobs" / job / f"round-{round_}" / "aggregate"
    start = None
    if spec.clip_norm is not None:  # updates are measured from what the round started from
        previous = shop.work / "jobs" / job / f"round-{round_ - 1}" / "aggregate"
        start_file = previous / ADAPTER if round_ > 1 else Path(received[0]["bundle"]).parent / "bundle" / ADAPTER_FILE
        start = load_adapter(start_file)[0]
    write_aggregate(results, out, round_, spec.rule, start, spec.clip_norm)
    evaluation = None
    if spec.test is not None:
        request = spec.bundle
        task = request.task.build(loaded.tokenizer, request.training.max_length)
        examples = load_examples(spec.test)[: spec.limit_test]
        aggregate = read_result(out, loaded)
        bottom, top = request.adapter_layers
        exits = adapter_exits(loaded.model.config.num_hidden_layers, bottom, top, request.layer_window)
        with plugged_in(request.adapter(), loaded.model, aggregate.weights, bottom, top):
            evaluation = {
                "metric": task.metric,
                "value": task.score(loaded.model, examples, 16, exits),
                "examples": len(examples),
            }
    return {
        "kind": "aggregated",
        "round": round_,
        "rounds": spec.rounds,
        "aggregate": str(out),
        "evaluation": evaluation,
        "devices": len(results),
    }
