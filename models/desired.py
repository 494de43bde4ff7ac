"""The signed desired-state document (`edge/<id>/desired`) and the package id, shared by the
agent and the controller: build and sign one, or check one and read it (docs/ota-protocol.md).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from models.package import Manifest
from models.signing import SignatureError, canonical_json, sign_document, verify_document
from runtimes.errors import PackageError

__all__ = [
    "DesiredError",
    "DesiredModel",
    "DesiredState",
    "build_desired",
    "package_id",
    "verify_desired",
]


class DesiredError(PackageError):
    """A desired-state document the device must ignore. `reason` is always `bad_desired`;
    `detail` says which check failed (unsigned, unknown_key, bad_signature, bad_format,
    wrong_device, stale_revision)."""

    reason = "bad_desired"

    def __init__(self, detail: str, message: str) -> None:
        super().__init__(message)
        self.detail = detail


def package_id(manifest_doc: dict[str, Any]) -> str:
    """The package id: hex sha256 of the canonical JSON of the whole signed model.json."""
    return hashlib.sha256(canonical_json(manifest_doc)).hexdigest()


@dataclass(frozen=True)
class DesiredModel:
    """What one pipeline should run."""

    pipeline: str
    manifest_doc: dict[str, Any]  # the signed model.json, verbatim
    manifest: Manifest
    package_id: str
    allow_downgrade: bool
    url: str | None = None  # optional https:// base: files at <url><sha256>, with Range


@dataclass(frozen=True)
class DesiredState:
    """A checked desired-state document."""

    device: str
    revision: int
    issued_at: float
    models: dict[str, DesiredModel]
    key_id: str  # the key that signed it
    doc: dict[str, Any]


def build_desired(
    device_id: str,
    revision: int,
    models: dict[str, tuple[dict[str, Any], bool]],
    key: Ed25519PrivateKey,
    issued_at: float | None = None,
    urls: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The signed document: `models` maps pipeline -> (signed model.json, allow_downgrade);
    `urls` optionally gives a pipeline an https:// base its files can be fetched from."""
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
        raise PackageError(f"desired revision must be an integer >= 0, not {revision!r}")
    body: dict[str, Any] = {
        "device": device_id,
        "revision": revision,
        "issued_at": round(time.time() if issued_at is None else issued_at, 3),
        "models": {
            pipeline: {"manifest": manifest, "allow_downgrade": bool(allow)}
            for pipeline, (manifest, allow) in models.items()
        },
    }
    for pipeline, url in (urls or {}).items():
        if pipeline not in body["models"] or not url.startswith("https://"):
            raise PackageError(f"url for {pipeline!r} must be https:// and name a listed pipeline")
        body["models"][pipeline]["url"] = url
    return sign_document(body, key)


def verify_desired(
    doc: Any,
    trusted: dict[str, Ed25519PublicKey],
    device_id: str,
    min_revision: int | None = None,
) -> DesiredState:
    """Check the signature, the device and the shape; with `min_revision`, a revision lower
    than it is refused. Raises DesiredError saying what is wrong. The manifests' own
    signatures are not checked here (the device checks each package before use)."""
    if not isinstance(doc, dict):
        raise DesiredError("bad_format", f"desired state must be a JSON object, not {_kind(doc)}")
    try:
        signer = verify_document(doc, trusted, "desired state")
    except SignatureError as exc:
        raise DesiredError(exc.reason, str(exc)) from exc
    device = doc.get("device")
    if device != device_id:
        raise DesiredError(
            "wrong_device", f"desired state is addressed to {device!r}, not {device_id!r}"
        )
    revision = doc.get("revision")
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
        raise DesiredError("bad_format", f"desired revision must be an integer >= 0: {revision!r}")
    if min_revision is not None and revision < min_revision:
        raise DesiredError(
            "stale_revision",
            f"desired revision {revision} is lower than {min_revision}, already accepted",
        )
    issued = doc.get("issued_at", 0.0)
    if (
        not isinstance(issued, (int, float))
        or isinstance(issued, bool)
        or not math.isfinite(issued)
    ):
        raise DesiredError("bad_format", f"desired issued_at must be a number: {issued!r}")
    raw_models = doc.get("models", {})
    if not isinstance(raw_models, dict):
        raise DesiredError("bad_format", "desired models must be an object by pipeline name")
    models: dict[str, DesiredModel] = {}
    for pipeline, entry in raw_models.items():
        models[pipeline] = _model(pipeline, entry)
    return DesiredState(
        device=device_id,
        revision=revision,
        issued_at=float(issued),
        models=models,
        key_id=signer,
        doc=doc,
    )


def _model(pipeline: str, entry: Any) -> DesiredModel:
    where = f"desired models.{pipeline}"
    if not isinstance(entry, dict) or not isinstance(entry.get("manifest"), dict):
        raise DesiredError(
            "bad_format", f"{where}: expected {{manifest: {{...}}, allow_downgrade}}"
        )
    unknown = set(entry) - {"manifest", "allow_downgrade", "url"}
    if unknown:
        raise DesiredError("bad_format", f"{where}: unknown member(s) {sorted(unknown)}")
    allow = entry.get("allow_downgrade", False)
    if not isinstance(allow, bool):
        raise DesiredError("bad_format", f"{where}.allow_downgrade must be true or false")
    url = entry.get("url")
    if url is not None and (not isinstance(url, str) or not url.startswith("https://")):
        raise DesiredError("bad_format", f"{where}.url must be an https:// URL")
    doc = entry["manifest"]
    try:
        manifest = Manifest.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise DesiredError("bad_format", f"{where}.manifest: {problems}") from exc
    return DesiredModel(pipeline, doc, manifest, package_id(doc), allow, url)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
