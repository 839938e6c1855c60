"""A device bundle on disk: tokenizer, initial adapter, ONNX training graphs per layer window and the emulator for
PyTorch, written whole or not at all, then sealed and signed. `coordinator.bundles.export` decides what goes in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.adapter_modules import add_adapter
from edge_runtime.bundle import ADAPTER_FILE, ORT_DIRECTORY, TOKENIZER_FILE, TORCH_DIRECTORY, write_adapter_file
from edge_runtime.files import atomic_directory
from edge_runtime.manifest import Manifest
from edge_runtime.quantized import quantized_state, storage_record
from edge_runtime.torch_graph import truncated
from exporters.bundle import seal_bundle
from exporters.onnx_training import PREFIX, ExportCheck, OptimizerSettings, export_training_artifacts


@dataclass(frozen=True)
class BundleContents:
    """Everything a bundle holds. `manifest` has every record but the export check, signer and file list.

    `emulator` is the plain emulator, saved as it is for the PyTorch backend; the ONNX graphs are traced after
    adding what the adapter kind trains (LoRA branches, zero biases) from the manifest's names, as the device does.

    `initial_adapter` is the adapter's starting weights under full-model names; `sample_batch` (ids, mask,
    labels) is what each exported graph is checked on against PyTorch; `check_encoding` is given the saved
    tokenizer.json and raises if the device would encode differently from the coordinator.
    """

    manifest: Manifest
    emulator: torch.nn.Module
    tokenizer: Any
    initial_adapter: dict[str, torch.Tensor]
    sample_batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    check_encoding: Callable[[Path], None]


def _export_windows(contents: BundleContents, staging: Path) -> ExportCheck:
    """One set of ONNX training graphs per layer window, each through its exit; the last window's check."""
    manifest = contents.manifest
    architecture, optimizer = manifest.architecture, manifest.training.optimizer
    settings = OptimizerSettings(optimizer.weight_decay, optimizer.max_grad_norm, optimizer.eps)
    layers = len(contents.emulator.get_submodule(architecture.layers))
    check = None
    for window in manifest.adapter.training_windows(ORT_DIRECTORY):
        (staging / window.ort).mkdir(parents=True)
        check = export_training_artifacts(
            truncated(contents.emulator, architecture.layers, layers if window.exit is None else window.exit + 1),
            architecture.backbone,
            architecture.head,
            manifest.task.kind,
            [name.removeprefix(PREFIX) for name in window.parameters],
            contents.sample_batch,
            staging / window.ort,
            settings,
            recompute=architecture.layers if manifest.plan.shape.recompute_layers else None,
            replaced=[name.removeprefix(PREFIX) for name in set(manifest.adapter.parameters) - set(window.parameters)],
        )
    assert check is not None  # every adapter has at least one window
    return check


def _add_adapter(contents: BundleContents) -> None:
    """Add the adapter kind's parameters to the emulator from the manifest's names and set their initial values."""
    local = add_adapter(contents.emulator, contents.manifest.adapter)
    parameters = dict(contents.emulator.named_parameters())
    with torch.no_grad():
        for name, full in local.items():
            parameters[name].copy_(contents.initial_adapter[full])


def _save_emulator(emulator: torch.nn.Module, folder: Path) -> None:
    """The emulator as a transformers folder; int8-stored matrices as saved (a tied head's rows once)."""
    state = quantized_state(emulator) if storage_record(emulator) else None
    emulator.save_pretrained(folder, state_dict=state)


def write_bundle(contents: BundleContents, out: Path, key: Ed25519PrivateKey) -> Manifest:
    """Write the bundle into `out` (whole, or not at all) for the manifest's backends; return the sealed manifest."""
    manifest = contents.manifest
    with atomic_directory(out) as staging:
        contents.tokenizer.save_pretrained(staging / Path(TOKENIZER_FILE).parent)
        contents.check_encoding(staging / TOKENIZER_FILE)
        adapter = {name: tensor.detach().cpu().numpy() for name, tensor in contents.initial_adapter.items()}
        origin = {"model": manifest.model.name, "bottom": manifest.adapter.bottom, "top": manifest.adapter.top}
        write_adapter_file(staging / ADAPTER_FILE, adapter, origin)
        if "torch" in manifest.backends:  # first: the PyTorch backend gets the plain emulator
            _save_emulator(contents.emulator, staging / TORCH_DIRECTORY)
        _add_adapter(contents)
        check = _export_windows(contents, staging) if "ort" in manifest.backends else None
        sealed = seal_bundle(staging, replace(manifest, export_check=check.to_dict() if check else None), key)
    return sealed
