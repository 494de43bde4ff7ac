"""Ed25519 signatures over canonical JSON: how model packages and desired-state documents
are signed by the fleet key and checked on the device.

A signed document is a JSON object with a `signature` member:
`{"alg": "ed25519", "key_id": "<16 hex>", "value": "<base64>"}`. The signature covers the
canonical JSON (sorted keys, no spaces, UTF-8) of the object *without* `signature`, exactly as
it was read (never a re-serialised model with defaults filled in). The key id is the first 16
hex digits of the sha256 of the raw 32-byte public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runtimes.errors import PackageError

ALG = "ed25519"
PUBLIC_SUFFIX = ".pub"


class SignatureError(PackageError):
    """A document is unsigned, signed by a key we do not trust, or its signature is wrong.
    `reason` is one of: unsigned, bad_format, unknown_key, bad_signature."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def save_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """PEM (PKCS#8, unencrypted), mode 0600, written atomically."""
    _write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def save_public_key(path: Path, public: Ed25519PublicKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(public_pem(public))
    tmp.replace(path)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise PackageError(f"{path}: cannot read the signing key: {exc.strerror}") from exc
    except (ValueError, TypeError) as exc:
        raise PackageError(f"{path}: not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise PackageError(f"{path}: expected an Ed25519 key, found {type(key).__name__}")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise PackageError(f"{path}: cannot read the public key: {exc.strerror}") from exc
    except ValueError as exc:
        raise PackageError(f"{path}: not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise PackageError(f"{path}: expected an Ed25519 key, found {type(key).__name__}")
    return key


def load_trusted_keys(*paths: Path) -> dict[str, Ed25519PublicKey]:
    """Public keys from `.pub` files and directories of them, by key id."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        files = sorted(path.glob(f"*{PUBLIC_SUFFIX}")) if path.is_dir() else [path]
        for file in files:
            if not file.exists():
                continue
            key = load_public_key(file)
            keys[key_id(key)] = key
    return keys


def sign_document(doc: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """A copy of `doc` with its `signature` (any old one is replaced)."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    value = key.sign(canonical_json(body))
    return {
        **body,
        "signature": {
            "alg": ALG,
            "key_id": key_id(key.public_key()),
            "value": base64.b64encode(value).decode("ascii"),
        },
    }


def verify_document(
    doc: dict[str, Any], trusted: dict[str, Ed25519PublicKey], what: str = "document"
) -> str:
    """Check `doc`'s signature against the trusted keys; returns the key id that signed it."""
    sig = doc.get("signature")
    if sig is None:
        raise SignatureError("unsigned", f"{what} is not signed")
    if (
        not isinstance(sig, dict)
        or sig.get("alg") != ALG
        or not isinstance(sig.get("key_id"), str)
        or not isinstance(sig.get("value"), str)
    ):
        raise SignatureError(
            "bad_format", f"{what}: signature must be {{alg: ed25519, key_id, value}}"
        )
    public = trusted.get(sig["key_id"])
    if public is None:
        known = ", ".join(sorted(trusted)) or "none"
        raise SignatureError(
            "unknown_key", f"{what} is signed by key {sig['key_id']}, not a trusted one ({known})"
        )
    try:
        value = base64.b64decode(sig["value"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError("bad_format", f"{what}: signature is not base64") from exc
    body = {k: v for k, v in doc.items() if k != "signature"}
    try:
        public.verify(value, canonical_json(body))
    except InvalidSignature as exc:
        raise SignatureError(
            "bad_signature", f"{what}: signature by key {sig['key_id']} does not match"
        ) from exc
    return str(sig["key_id"])
