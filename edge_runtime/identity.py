"""A device's own Ed25519 key: it signs what the device sends and logs it in to the embedded broker."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime.errors import ConfigError
from edge_runtime.files import atomic_path

DEVICE_KEY = "device.key"
DEVICE_PUBLIC_KEY = "device.pub"
_LOGIN = b"offsite-edge mqtt login:"  # what a device signs to make its broker password (never a wire record)


def public_pem(key: Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def parse_public_key(pem: str | bytes, where: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM text, or ConfigError naming `where` it came from."""
    try:
        key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except ValueError:
        raise ConfigError(f"{where} is not a PEM public key; give the device.pub `edge-runtime keys` wrote") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{where} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def device_key(state: Path) -> Ed25519PrivateKey:
    """The device's key in `state/device.key`, made (owner-only, with `device.pub` beside it) on first use."""
    path = state / DEVICE_KEY
    if path.is_file():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 key; remove it to make a new one")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with atomic_path(state / DEVICE_PUBLIC_KEY) as temporary:
        temporary.write_text(public_pem(key), encoding="ascii")
    with atomic_path(path) as temporary:
        os.chmod(temporary, 0o600)
        temporary.write_bytes(pem)
    return key


def login_password(key: Ed25519PrivateKey, device_id: str) -> str:
    """The device's password for the embedded broker: its signature of its own id (Ed25519 signs deterministically,
    so the password is fixed per key, and only the key's holder can make it)."""
    return base64.b64encode(key.sign(_LOGIN + device_id.encode())).decode()


def check_login(key: Ed25519PublicKey, device_id: str, password: str) -> bool:
    try:
        key.verify(base64.b64decode(password, validate=True), _LOGIN + device_id.encode())
    except (InvalidSignature, ValueError):
        return False
    return True
