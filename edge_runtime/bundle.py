"""The bundle a coordinator ships a device: its layout, and verification of every byte before anything loads."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime import __version__
from edge_runtime.errors import OffsiteError
from edge_runtime.files import atomic_path
from edge_runtime.manifest import FileDigest, Manifest
from edge_runtime.records import RecordError, from_dict, json_object
from edge_runtime.tensor_file import write_safetensors

BUNDLE_FORMAT = "offsite-edge/bundle"
BUNDLE_SCHEMA = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
ORT_DIRECTORY = "ort"
TORCH_DIRECTORY = "torch"
TOKENIZER_FILE = "tokenizer/tokenizer.json"
ADAPTER_FILE = "adapter.safetensors"
# Adapter weights files (bundle's initial adapter, device results): safetensors with this metadata format.
ADAPTER_FORMAT = "offsite-edge/layer-adapter"
ADAPTER_SCHEMA = 1


def write_adapter_file(path: Path, tensors: Mapping[str, np.ndarray], metadata: dict[str, object]) -> None:
    """Write adapter weights (full-model names) as safetensors, atomically, with `metadata` stored as JSON strings.

    The tensors are read from `tensors` one at a time as they are written: a backend's WeightView of its live
    weights never has the whole adapter copied out beside them (14.2 M floats, 54 MiB, for SmolLM2's 2+2 layers)."""
    header = {"format": ADAPTER_FORMAT, "schema": str(ADAPTER_SCHEMA), "tool_version": __version__}
    header |= {key: json.dumps(value) for key, value in metadata.items()}
    with atomic_path(path) as temporary:
        write_safetensors(temporary, tensors, header)


class BundleError(OffsiteError):
    """A bundle is incomplete, altered, or not signed by the trusted coordinator key."""


def file_digest(path: Path) -> FileDigest:
    """sha256 (hex) and size in bytes of one file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return FileDigest(digest.hexdigest(), path.stat().st_size)


def key_fingerprint(key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw public key: short enough to read, compare and log."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The coordinator's Ed25519 public key from a PEM file (`coordinator keys init` writes coordinator.pub)."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"trusted key {str(path)!r} does not exist; copy the coordinator's coordinator.pub here")
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except ValueError:
        raise BundleError(
            f"{path} is not a PEM public key; pass the coordinator.pub `coordinator keys init` made"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def bundle_files(directory: Path) -> list[str]:
    """Every file under `directory` except the manifest and its signature, as sorted POSIX relative paths."""
    names = (path.relative_to(directory).as_posix() for path in directory.rglob("*") if path.is_file())
    return sorted(name for name in names if name not in (MANIFEST, SIGNATURE))


def _check_signature(directory: Path, key: Ed25519PublicKey) -> bytes:
    for name in (MANIFEST, SIGNATURE):
        if not (directory / name).is_file():
            raise BundleError(f"{directory} has no {name}; it is not a complete bundle (export it again)")
    manifest = (directory / MANIFEST).read_bytes()
    try:
        signature = base64.b64decode((directory / SIGNATURE).read_text(encoding="ascii").strip(), validate=True)
        key.verify(signature, manifest)
    except (InvalidSignature, ValueError):
        raise BundleError(
            f"{directory}/{MANIFEST} is not signed by the trusted key {key_fingerprint(key)}: it was changed, or "
            "signed by another coordinator; get the bundle again or trust that coordinator's key"
        ) from None
    return manifest


def verify_bundle(directory: str | Path, trusted_key: str | Path) -> Manifest:
    """Check the signature, the schema, every record's fields and every file's size and sha256; return the manifest.

    Nothing from the bundle is parsed before its manifest's signature verifies.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"bundle {str(directory)!r} is not a directory; pass the folder `coordinator export` wrote")
    text = _check_signature(directory, load_public_key(trusted_key))
    try:
        data = json_object(text, "manifest")
        found = (data.get("format"), data.get("schema"))
        if found != (BUNDLE_FORMAT, BUNDLE_SCHEMA):
            raise BundleError(
                f"{directory} is a {found[0]!r} schema {found[1]!r} bundle; this runtime "
                f"reads {BUNDLE_FORMAT!r} schema {BUNDLE_SCHEMA}: upgrade the runtime or export again"
            )
        manifest = from_dict(Manifest, data, "manifest")
    except RecordError as error:
        raise BundleError(f"{directory}/{MANIFEST} is signed but malformed: {error}") from None
    extra = sorted(set(bundle_files(directory)) - set(manifest.files))
    if extra:
        raise BundleError(f"{directory} holds files the manifest does not list: {extra}; remove them")
    for name, expected in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise BundleError(f"{directory} is missing {name}; the bundle is incomplete (export or copy it again)")
        actual = file_digest(path)
        if actual != expected:
            raise BundleError(
                f"{directory}/{name} does not match the manifest (size {actual.size} vs {expected.size}, "
                f"sha256 {actual.sha256[:12]}… vs {expected.sha256[:12]}…): it was altered or damaged"
            )
    return manifest
