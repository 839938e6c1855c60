"""The fleet service's heavy work, run on its worker thread: export bundles per profile, aggregate and evaluate."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors import SafetensorError
from safetensors.numpy import load_file

from coordinator.adapters import adapter_kind, adapter_kind_of, plugged_in
from coordinator.adapters.files import load_adapter, save_adapter
from coordinator.adapters.layers import adapter_exits
from coordinator.adapters.lora_ranks import RankedLoRA, factored
from coordinator.bundles.export import export_bundle
from coordinator.bundles.request import BundleRequest
from coordinator.errors import ConfigError, DataError
from coordinator.fleet.aggregate import write_aggregate
from coordinator.fleet.configure import Fleet, configure
from coordinator.fleet.cost import Throughput, measured_throughput, prior_throughput
from coordinator.fleet.jobs import JobSpec
from coordinator.fleet.registry import Registry
from coordinator.models import LoadedModel, load_model, source_sha256
from coordinator.results import DeviceResult, read_result
from coordinator.split.sides import ServerSide
from device_profiles import DeviceProfile, validate
from edge_runtime.bundle import ADAPTER_FILE
from edge_runtime.data import load_examples
from edge_runtime.files import atomic_directory
from edge_runtime.records import to_dict
from edge_runtime.trainer import ADAPTER
from edge_runtime.transfer import pack_directory, sha256_file

log = logging.getLogger(__name__)
# A result is an adapter as large as the bundle's initial one, plus its metrics: anything larger is refused.
RESULT_SLACK_BYTES = 8 * 1024**2
EVAL_BATCH = 16


@dataclass
class Workshop:
    """What the service's worker thread works with: the registry, the signing key, its files, one loaded model."""

    registry: Registry
    key: Ed25519PrivateKey
    work: Path
    models: dict[str, LoadedModel] = field(default_factory=dict)
    zero_shots: dict[str, dict[str, Any]] = field(default_factory=dict)  # by model, task and test file

    def model(self, name: str) -> LoadedModel:
        if name not in self.models:
            self.models.clear()  # one model in memory at a time
            self.models[name] = load_model(name)
        return self.models[name]


def _backend(device: str, row: dict[str, Any], profile: DeviceProfile, spec: JobSpec) -> str:
    """The backend `device` trains the job on: its profile's preferred one among those it announced."""
    announced = row["backends"] or profile.backends
    if spec.bundle.dp is not None:  # DP-SGD has per-example gradients on PyTorch only
        if "torch" not in announced:
            raise ConfigError(f"--dp needs the PyTorch backend, which {device} does not have (it announced "
                              f"{', '.join(announced)}); leave it out with --devices")  # fmt: skip
        return "torch"
    return next((b for b in profile.backends if b in announced), profile.backends[0])


def throughput(registry: Registry, device: str, profile: DeviceProfile) -> Throughput:
    """`device`'s training throughput: measured from its latest result of a per-device job, else its profile's."""
    for task in registry.device_results(device):
        configuration = (registry.job(task["job"])["detail"].get("configurations") or {}).get(device)
        measured = measured_throughput(task, configuration) if configuration else None
        if measured is not None:
            return measured
    return prior_throughput(profile)


def _packed(shop: Workshop, key: str, export: Callable[[Path], None]) -> str:
    """The packed bundle cached as `bundles/key/bundle.tar`; `export(folder)` writes it the first time."""
    folder = shop.work / "bundles" / key
    archive = folder / "bundle.tar"
    if not archive.exists():
        export(folder / "bundle")
        pack_directory(folder / "bundle", archive)
    return str(archive)


def _bundle(
    shop: Workshop, loaded: LoadedModel, sha: str, job: str, request: BundleRequest, profile: DeviceProfile
) -> str:
    """The packed bundle `request` makes for `profile`, exported once (cached by the request's hash)."""

    def export(folder: Path) -> None:
        log.info("%s: exporting a bundle for %s (%s)", job, profile.name, ",".join(request.backends) or "none")
        export_bundle(loaded, request, profile, folder, shop.key)

    return _packed(shop, request.cache_key(sha, profile), export)


def _split_bundle(shop: Workshop, loaded: LoadedModel, sha: str, job: str, spec: JobSpec, request: BundleRequest,
                  profile: DeviceProfile) -> str:  # fmt: skip
    """The packed device bundle of split job `spec` (as `request` for one backend) for `profile`, exported once
    (cached by what decides it)."""
    from coordinator.split.bundle import export_split_bundle

    assert spec.split is not None
    split = spec.split

    def export(folder: Path) -> None:
        log.info("%s: exporting a split bundle for %s (first %d layers)", job, profile.name, split.cut_after)
        export_split_bundle(loaded, request, split, profile, folder, shop.key)

    identity = json.dumps([request.cache_key(sha, profile), to_dict(split)], sort_keys=True)
    return _packed(shop, f"split-{hashlib.sha256(identity.encode()).hexdigest()[:16]}", export)


def split_server(shop: Workshop, spec: JobSpec) -> tuple[ServerSide, torch.Tensor]:
    """Split job `spec`'s server side (the layers after the cut and the head, a copy of their own) and the label
    words' token ids it answers the logits of."""
    from coordinator.split.bundle import split_sides

    assert spec.split is not None
    loaded = shop.model(spec.bundle.model)
    _, server = split_sides(loaded, spec.bundle, spec.split)
    task = spec.bundle.task.build(loaded.tokenizer, spec.bundle.training.max_length)
    return server, task.label_token_ids  # type: ignore[union-attr]


def prepare_job(shop: Workshop, job: str, spec: JobSpec, targets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Export one bundle per distinct request and device profile (cached) and pack it for the wire. A per-device
    job first chooses each device's configuration (coordinator/fleet/configure.py) and records why; a split job
    exports the device side of its cut."""
    loaded = shop.model(spec.bundle.model)
    sha = source_sha256(loaded)
    profiles = {device: validate(row["profile"], f"the profile {device} announced") for device, row in targets.items()}
    backends = {device: _backend(device, row, profiles[device], spec) for device, row in targets.items()}
    if spec.split is not None:
        requests = {d: replace(spec.bundle, backends=(backends[d],)) for d in targets}
        bundles = {d: _split_bundle(shop, loaded, sha, job, spec, requests[d], profiles[d]) for d in targets}
        return {"kind": "prepared", "bundles": bundles, "model_sha256": sha, **_zero_shot(shop, loaded, sha, spec)}
    detail: dict[str, Any] = _zero_shot(shop, loaded, sha, spec)
    if spec.per_device:
        speeds = {device: throughput(shop.registry, device, profile) for device, profile in profiles.items()}
        chosen = configure(loaded, spec, Fleet(profiles, backends, speeds))
        if len(chosen.chosen) < spec.quorum:
            reasons = "; ".join(f"{device}: {why}" for device, why in chosen.left_out.items())
            raise ConfigError(f"{len(chosen.chosen)} devices can run this job, fewer than --quorum {spec.quorum}: "
                              f"{reasons}")  # fmt: skip
        requests = {device: choice.request(spec.bundle) for device, choice in chosen.chosen.items()}
        detail |= {
            "configurations": {device: choice.to_dict() for device, choice in chosen.chosen.items()},
            "left_out": chosen.left_out,
            "fixed": {device: choice.to_dict() for device, choice in chosen.fixed.items()},
        }
    else:
        requests = {device: replace(spec.bundle, backends=(backends[device],)) for device in targets}
    bundles = {d: _bundle(shop, loaded, sha, job, request, profiles[d]) for d, request in requests.items()}
    return {"kind": "prepared", "bundles": bundles, "model_sha256": sha, **detail}


def _zero_shot(shop: Workshop, loaded: LoadedModel, sha: str, spec: JobSpec) -> dict[str, Any]:
    """{"zero_shot": the untrained full model's score on the job's test file}, what each round's plug-in is
    measured against ({} without --test); scored once per model, task, file and limit."""
    if spec.test is None:
        return {}
    key = json.dumps([sha, to_dict(spec.bundle.task), spec.bundle.training.max_length, sha256_file(Path(spec.test)),
                      spec.limit_test])  # fmt: skip
    if key not in shop.zero_shots:
        log.info("scoring %s zero-shot on %s", loaded.name, spec.test)
        shop.zero_shots[key] = evaluate(loaded, spec)
    return {"zero_shot": shop.zero_shots[key]}


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


def start_adapter(work: Path, job: str, round_: int, configuration: dict[str, Any] | None = None) -> Path | None:
    """The adapter a device starts round `round_` from: none in round 1, else the round before's aggregate or, for
    a device of a per-device LoRA job, that aggregate cut to the device's rank (written beside it)."""
    if round_ == 1:
        return None
    folder = work / "jobs" / job / f"round-{round_ - 1}"
    if configuration is not None and configuration["candidate"]["adapter_kind"].startswith("lora"):
        return folder / "starts" / f"{_slug(configuration['candidate']['adapter_kind'])}.safetensors"
    return folder / "aggregate" / ADAPTER


def _slug(kind: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in kind)


def _ranked_file(path: Path) -> RankedLoRA:
    weights, metadata = load_adapter(path)
    return RankedLoRA(weights, int(metadata["lora_r"]), float(metadata["lora_alpha"]))


def _per_device_lora(spec: JobSpec) -> bool:
    return spec.per_device and spec.bundle.adapter().name == "lora"


def _write_cut_starts(
    work: Path, job: str, round_: int, configurations: dict[str, Any], aggregate: Path, model: str
) -> None:
    """Each LoRA rank the job's devices train, cut from this round's aggregate: what they start the next from."""
    whole = _ranked_file(aggregate / ADAPTER).dense()
    with atomic_directory(work / "jobs" / job / f"round-{round_}" / "starts") as staging:
        for kind_text in sorted({c["candidate"]["adapter_kind"] for c in configurations.values()}):
            kind = adapter_kind(kind_text)
            cut = factored(whole, kind.r, kind.alpha)  # type: ignore[attr-defined]
            metadata = {"model": model, "lora_r": cut.r, "lora_alpha": cut.alpha}
            save_adapter(cut.weights, staging / f"{_slug(kind_text)}.safetensors", metadata)


def finish_round(shop: Workshop, job: str, round_: int, spec: JobSpec) -> dict[str, Any]:
    """Aggregate the round's results into `round-N/aggregate` by the job's rule, then score the plugged-in
    aggregate on `spec.test`. Each device counts at most the examples its profile announced for the dataset.
    A per-device LoRA job's devices may train different ranks: they are averaged as dense updates, each from the
    start it was sent, and each rank's start for the next round is cut from the aggregate."""
    loaded = shop.model(spec.bundle.model)
    received = [t for t in shop.registry.tasks(job, round_) if t["state"] == "received"]
    results = [_capped(read_result(Path(t["result"]), loaded), shop, t["device"], spec) for t in received]
    out = shop.work / "jobs" / job / f"round-{round_}" / "aggregate"
    previous = shop.work / "jobs" / job / f"round-{round_ - 1}" / "aggregate"
    start, starts = None, None
    configurations = shop.registry.job(job)["detail"].get("configurations") or {}
    if _per_device_lora(spec):
        sent = [start_adapter(shop.work, job, round_, configurations[t["device"]]) for t in received]
        before = _ranked_file(previous / ADAPTER) if round_ > 1 else None  # its file records its rank and alpha
        starts = ([_ranked_file(path) if path else None for path in sent], before)
    elif spec.clip_norm is not None:  # updates are measured from what the round started from
        start_file = previous / ADAPTER if round_ > 1 else Path(received[0]["bundle"]).parent / "bundle" / ADAPTER_FILE
        start = load_adapter(start_file)[0]
    write_aggregate(results, out, round_, spec.rule, start, spec.clip_norm, starts)
    if _per_device_lora(spec) and round_ < spec.rounds:
        _write_cut_starts(shop.work, job, round_, configurations, out, loaded.name)
    evaluation = evaluate(loaded, spec, read_result(out, loaded)) if spec.test is not None else None
    return {
        "kind": "aggregated",
        "round": round_,
        "rounds": spec.rounds,
        "aggregate": str(out),
        "evaluation": evaluation,
        "devices": len(results),
    }


def evaluate(loaded: LoadedModel, spec: JobSpec, adapter: DeviceResult | None = None) -> dict[str, Any]:
    """The full model's score on `spec.test`, with `adapter` plugged in (None: zero-shot, the job's baseline)."""
    assert spec.test is not None
    request = spec.bundle
    task = request.task.build(loaded.tokenizer, request.training.max_length)
    examples = load_examples(spec.test)[: spec.limit_test]
    if adapter is None:
        value = task.score(loaded.model, examples, EVAL_BATCH)
    else:
        bottom, top = request.adapter_layers
        exits = adapter_exits(loaded.model.config.num_hidden_layers, bottom, top, request.layer_window)
        kind = adapter_kind_of(adapter.metrics.adapter_kind, adapter.metrics.adapter_options)
        with plugged_in(kind, loaded.model, adapter.weights, bottom, top):
            value = task.score(loaded.model, examples, EVAL_BATCH, exits)
    return {"metric": task.metric, "value": value, "examples": len(examples)}
