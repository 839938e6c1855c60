"""The fleet service's heavy work, run on its worker thread: export bundles per profile, aggregate and evaluate."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.adapter import adapter_exits, plugged_in
from coordinator.compression import EmulatorSpec
from coordinator.emulator import Split
from coordinator.export import export_bundle
from coordinator.fleet.aggregate import write_aggregate
from coordinator.models import LoadedModel, load_model, source_sha256
from coordinator.results import read_result
from coordinator.tasks import ClassificationTask, LanguageModelTask
from coordinator.train import TrainConfig
from device_profiles import validate
from edge_runtime.data import load_examples
from edge_runtime.transfer import pack_directory

if TYPE_CHECKING:
    from coordinator.fleet.service import FleetService, JobSpec

log = logging.getLogger(__name__)


def _model(service: FleetService, name: str) -> LoadedModel:
    if name not in service.models:
        service.models.clear()  # one model in memory at a time
        service.models[name] = load_model(name)
    return service.models[name]


def _task(spec: JobSpec, loaded: LoadedModel) -> ClassificationTask | LanguageModelTask:
    if spec.task == "language-model":
        return LanguageModelTask(loaded.tokenizer, spec.max_length)
    return ClassificationTask(loaded.tokenizer, spec.label_words, spec.template, spec.max_length)


def prepare_job(service: FleetService, job: str, spec: JobSpec, targets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Export one bundle per distinct device profile (cached by content of the request) and pack it for the wire."""
    loaded = _model(service, spec.model)
    sha = source_sha256(loaded)
    training = TrainConfig(spec.steps, spec.lr, spec.batch_size, spec.max_length, seed=spec.seed)
    split = Split(*spec.adapter_layers, keep=spec.keep)
    bundles: dict[str, str] = {}
    for device, row in targets.items():
        profile = validate(row["profile"], f"the profile {device} announced")
        backends = tuple(b for b in profile.backends if b in (row["backends"] or profile.backends))[:1]
        request = json.dumps(
            [
                sha,
                row["profile"],
                backends,
                training.__dict__,
                spec.adapter_layers,
                spec.keep,
                spec.task,
                spec.label_words,
                spec.template,
                spec.checkpoint_every,
                spec.emulator,
                spec.distill,
                spec.layer_window,
            ],
            sort_keys=True,
        )
        folder = service.work / "bundles" / hashlib.sha256(request.encode()).hexdigest()[:16]
        archive = folder / "bundle.tar"
        if not archive.exists():
            log.info("%s: exporting a bundle for %s (%s)", job, profile.name, ",".join(backends) or "none")
            export_bundle(
                loaded,
                split,
                _task(spec, loaded),
                profile,
                backends or profile.backends[:1],
                training,
                spec.checkpoint_every,
                folder / "bundle",
                service.key,
                EmulatorSpec.parse(spec.emulator, spec.keep, spec.distill),
                spec.layer_window,
            )
            pack_directory(folder / "bundle", archive)
        bundles[device] = str(archive)
    return {"kind": "prepared", "bundles": bundles, "model_sha256": sha}


def finish_round(service: FleetService, job: str, round_: int, spec: JobSpec) -> dict[str, Any]:
    """FedAvg the round's results into `round-N/aggregate`, then score the plugged-in aggregate on `spec.test`."""
    loaded = _model(service, spec.model)
    received = [t for t in service.registry.tasks(job, round_) if t["state"] == "received"]
    results = [read_result(Path(t["result"]), loaded) for t in received]
    out = service.work / "jobs" / job / f"round-{round_}" / "aggregate"
    write_aggregate(results, out, round_)
    evaluation = None
    if spec.test is not None:
        task = _task(spec, loaded)
        examples = load_examples(spec.test)[: spec.limit_test]
        aggregate = read_result(out, loaded)
        bottom, top = spec.adapter_layers
        exits = adapter_exits(loaded.model.config.num_hidden_layers, bottom, top, spec.layer_window)
        with plugged_in(loaded.model, aggregate.weights, bottom, top):
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
