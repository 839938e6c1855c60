"""The fleet service's heavy work, run on its worker thread: export bundles per profile, aggregate and evaluate."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.adapters import plugged_in
from coordinator.adapters.layers import adapter_exits
from coordinator.bundles.export import export_bundle
from coordinator.fleet.aggregate import write_aggregate
from coordinator.fleet.jobs import JobSpec
from coordinator.fleet.registry import Registry
from coordinator.models import LoadedModel, load_model, source_sha256
from coordinator.results import read_result
from device_profiles import validate
from edge_runtime.data import load_examples
from edge_runtime.transfer import pack_directory

log = logging.getLogger(__name__)


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
        request = replace(spec.bundle, backends=tuple(b for b in profile.backends if b in announced)[:1])
        folder = shop.work / "bundles" / request.cache_key(sha, profile)
        archive = folder / "bundle.tar"
        if not archive.exists():
            log.info("%s: exporting a bundle for %s (%s)", job, profile.name, ",".join(request.backends) or "none")
            export_bundle(loaded, request, profile, folder / "bundle", shop.key)
            pack_directory(folder / "bundle", archive)
        bundles[device] = str(archive)
    return {"kind": "prepared", "bundles": bundles, "model_sha256": sha}


def finish_round(shop: Workshop, job: str, round_: int, spec: JobSpec) -> dict[str, Any]:
    """FedAvg the round's results into `round-N/aggregate`, then score the plugged-in aggregate on `spec.test`."""
    loaded = shop.model(spec.bundle.model)
    received = [t for t in shop.registry.tasks(job, round_) if t["state"] == "received"]
    results = [read_result(Path(t["result"]), loaded) for t in received]
    out = shop.work / "jobs" / job / f"round-{round_}" / "aggregate"
    write_aggregate(results, out, round_)
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
