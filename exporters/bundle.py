"""Signing keys and bundle sealing: list every file's sha256 in the manifest, then sign the manifest (Ed25519)."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import replace
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_SCHEMA,
    MANIFEST,
    SIGNATURE,
    bundle_files,
    file_digest,
    key_fingerprint,
)
from edge_runtime.errors import ConfigError
from edge_runtime.files import write_text_atomic
from edge_runtime.manifest import Manifest

PRIVATE_KEY = "coordinator.key"
PUBLIC_KEY = "coordinator.pub"


def default_key_directory() -> Path:
    """Where `coordinator keys init` writes by default: $OFFSITE_EDGE_KEYS or ~/.config/offsite-edge."""
    return Path(os.environ.get("OFFSITE_EDGE_KEYS", Path.home() / ".config" / "offsite-edge"))


def generate_keys(directory: Path, force: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: coordinator.key (PEM, owner-only) and coordinator.pub (PEM, for devices)."""
    private_path, public_path = directory / PRIVATE_KEY, directory / PUBLIC_KEY
    if private_path.exists() and not force:
        raise ConfigError(f"{private_path} already exists; pass --force to replace it (devices must then re-trust)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(public_path, public_pem.decode("ascii"))
    write_text_atomic(private_path, private_pem.decode("ascii"))
    private_path.chmod(0o600)
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The coordinator's signing key (PEM)."""
    if not path.is_file():
        raise ConfigError(f"no signing key at {path}; run `coordinator keys init` or pass --key PATH")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}; bundles are signed with Ed25519 keys")
    return key


def seal_bundle(directory: Path, manifest: Manifest, key: Ed25519PrivateKey) -> Manifest:
    """Stamp `manifest` with the format, signer and every file's sha256 and size; write it and its signature."""
    sealed = replace(
        manifest,
        format=BUNDLE_FORMAT,
        schema=BUNDLE_SCHEMA,
        signer=key_fingerprint(key.public_key()),
        files={name: file_digest(directory / name) for name in bundle_files(directory)},
    )
    text = json.dumps(sealed.to_dict(), indent=2, sort_keys=True) + "\n"
    (directory / MANIFEST).write_text(text, encoding="utf-8")
    signature = key.sign(text.encode("utf-8"))
    (directory / SIGNATURE).write_text(base64.b64encode(signature).decode("ascii") + "\n", encoding="ascii")
    return sealed
