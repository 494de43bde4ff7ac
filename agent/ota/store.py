"""The device's content-addressed model store under `<state_dir>/models/`: files by sha256,
staged packages by package id, and each pipeline's `current`/`previous` pointer (atomic JSON).

    models/blobs/<sha256>             complete files, checked against the signed manifest
    models/downloads/<sha256>.part    partial files, with <sha256>.part.json (chunks held)
    models/packages/<package id>/     model.json (the signed one, verbatim) + hard links
    models/pipelines/<pipeline>.json  {"current": <package id> | null, "previous": ...}
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.atomic import fsync_dir
from agent.ota.state import atomic_write_json, read_json
from models.package import MANIFEST, Manifest

if TYPE_CHECKING:
    from agent.config import AgentConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pointer:
    current: str | None = None
    previous: str | None = None


class ModelStore:
    """Where OTA packages live on the device; every write is atomic and synced."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "models"
        self.blobs = self.root / "blobs"
        self.downloads = self.root / "downloads"
        self.packages = self.root / "packages"
        self.pointers = self.root / "pipelines"

    def ensure(self) -> ModelStore:
        for d in (self.blobs, self.downloads, self.packages, self.pointers):
            d.mkdir(parents=True, exist_ok=True)
        return self

    # --- files ------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256

    def has_blob(self, sha256: str, size: int) -> bool:
        path = self.blob_path(sha256)
        return path.is_file() and path.stat().st_size == size

    # --- packages -----------------------------------------------------------------------

    def package_dir(self, package_id: str) -> Path:
        return self.packages / package_id

    def has_package(self, package_id: str) -> bool:
        return (self.package_dir(package_id) / MANIFEST).is_file()

    def stage(self, package_id: str, manifest_doc: dict[str, Any], manifest: Manifest) -> Path:
        """Make `packages/<id>/` from the blobs (hard links) and the verbatim model.json."""
        final = self.package_dir(package_id)
        if self.has_package(package_id):
            return final
        tmp = self.packages / f".{package_id}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for entry in manifest.files:
            dest = tmp / entry.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(self.blob_path(entry.sha256), dest)
            except OSError:
                shutil.copyfile(self.blob_path(entry.sha256), dest)
        body = json.dumps(manifest_doc, indent=2, sort_keys=True).encode()
        fd = os.open(tmp / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(self.packages)
        return final

    def manifest_doc(self, package_id: str) -> dict[str, Any] | None:
        doc = read_json(self.package_dir(package_id) / MANIFEST)
        return doc if isinstance(doc, dict) else None

    # --- pointers -------------------------------------------------------------------------

    def pointer(self, pipeline: str) -> Pointer:
        data = read_json(self.pointers / f"{pipeline}.json")
        if not isinstance(data, dict):
            return Pointer()
        return Pointer(data.get("current"), data.get("previous"))

    def set_pointer(self, pipeline: str, pointer: Pointer) -> None:
        atomic_write_json(
            self.pointers / f"{pipeline}.json",
            {"current": pointer.current, "previous": pointer.previous},
        )

    def activate(self, pipeline: str, package_id: str) -> Pointer:
        """current := package_id, previous := the old current (one atomic write)."""
        old = self.pointer(pipeline)
        new = Pointer(package_id, old.current if old.current != package_id else old.previous)
        self.set_pointer(pipeline, new)
        return new

    def rollback(self, pipeline: str, failed: str) -> Pointer:
        """current := previous when current is `failed` (None means the config's model)."""
        old = self.pointer(pipeline)
        if old.current != failed:
            return old
        new = Pointer(old.previous, None)
        self.set_pointer(pipeline, new)
        return new

    def startup_models(self, pipeline: str) -> list[Path]:
        """The package directories to try at start, best first: current, then previous."""
        pointer = self.pointer(pipeline)
        return [
            self.package_dir(pid)
            for pid in (pointer.current, pointer.previous)
            if pid is not None and self.has_package(pid)
        ]

    # --- clean-up ---------------------------------------------------------------------------

    def collect_garbage(self, keep: set[str], max_packages: int) -> list[str]:
        """Remove the oldest packages beyond `max_packages` (never those in `keep`), then the
        blobs no remaining package uses. Returns the package ids removed."""
        if not self.packages.is_dir():
            return []
        staged = sorted(
            (p for p in self.packages.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        removed: list[str] = []
        kept = 0
        for path in staged:
            if path.name in keep or kept < max_packages - len(keep):
                kept += path.name not in keep
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
        if removed:
            used: set[str] = set()
            for path in self.packages.iterdir():
                doc = read_json(path / MANIFEST) if path.is_dir() else None
                for entry in (doc or {}).get("files", []):
                    used.add(entry.get("sha256", ""))
            for blob in self.blobs.iterdir():
                if blob.name not in used:
                    blob.unlink(missing_ok=True)
            log.info("OTA store: removed old packages %s", removed)
        return removed


def startup_models(config: AgentConfig, pipeline: str) -> list[Path]:
    """For the daemon: OTA packages a pipeline should try before its config `model`."""
    if not config.ota.enabled:
        return []
    return ModelStore(config.device.state_dir).startup_models(pipeline)
