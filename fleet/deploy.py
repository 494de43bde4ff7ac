"""Deploying a package to devices: resolve the package, build the next signed desired
document per device (keeping other pipelines' entries), publish it retained, follow `ota`.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet.blobs import BlobStore
from fleet.home import FleetHome
from fleet.mqtt import FleetClient, Message
from fleet.registry import Device, Registry
from models.desired import build_desired
from models.signing import load_private_key
from runtimes.errors import EdgeAgentError

FINAL_STATES = ("committed", "rejected", "rolled_back")
_PACKAGE_ID = re.compile(r"^[0-9a-f]{64}$")


class DeployError(EdgeAgentError):
    """A deployment cannot be made: no key, unknown device or package, no answer."""


def signing_key(home: FleetHome) -> Ed25519PrivateKey:
    if not home.signing_key.is_file():
        raise DeployError(
            f"no fleet signing key at {home.signing_key}: run `edge-fleet keys init` first"
        )
    return load_private_key(home.signing_key)


def resolve_package(store: BlobStore, spec: str) -> tuple[str, dict[str, Any]]:
    """A package directory (verified and published now) or a published package id."""
    path = Path(spec)
    if path.is_dir():
        pid = store.add_package(path)
        return pid, store.manifest(pid)
    if _PACKAGE_ID.match(spec):
        return spec, store.manifest(spec)
    raise DeployError(f"{spec!r} is neither a package directory nor a published package id")


def fetch_retained(
    client: FleetClient, topic_filters: list[str], quiet_s: float = 0.4, max_s: float = 3.0
) -> dict[str, dict[str, Any]]:
    """The retained JSON messages on the filters, by topic (waits until `quiet_s` passes with
    nothing new, at most `max_s`)."""
    got: dict[str, dict[str, Any]] = {}
    last = [time.monotonic()]
    lock = threading.Lock()

    def on(msg: Message) -> None:
        if not msg.retain or not msg.payload:
            return
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(body, dict):
            with lock:
                got[msg.topic] = body
                last[0] = time.monotonic()

    start = time.monotonic()
    for f in topic_filters:
        client.subscribe(f, on)
    last[0] = time.monotonic()
    while time.monotonic() - start < max_s:
        with lock:
            if time.monotonic() - last[0] >= quiet_s:
                break
        time.sleep(0.05)
    with lock:
        return dict(got)


def ota_entry(reported: dict[str, Any], pipeline: str) -> dict[str, Any]:
    entry = ((reported.get("ota") or {}).get("pipelines") or {}).get(pipeline)
    return entry if isinstance(entry, dict) else {}


def outcome(reported: dict[str, Any], pipeline: str, pid: str) -> str | None:
    """`committed`/`rejected`/`rolled_back` once the device has finished with `pid`."""
    entry = ota_entry(reported, pipeline)
    target = (entry.get("target") or {}).get("package")
    current = (entry.get("current") or {}).get("package")
    state = entry.get("state")
    if target == pid and state in FINAL_STATES:
        return str(state)
    if current == pid and state in ("committed", "idle", None):
        return "committed"
    return None


class Deployer:
    """Builds and publishes desired documents; the registry keeps the last one per device."""

    def __init__(
        self, client: FleetClient, registry: Registry, store: BlobStore, key: Ed25519PrivateKey
    ) -> None:
        self.client = client
        self.registry = registry
        self.store = store
        self.key = key

    def known_device(self, device_id: str) -> Device:
        """The registry's record, else what the broker keeps retained for the device."""
        device = self.registry.device(device_id)
        if device is not None and device.reported:
            return device
        found = fetch_retained(
            self.client, [f"edge/{device_id}/status", f"edge/{device_id}/reported"], 0.3, 2.0
        )
        if f"edge/{device_id}/status" in found:
            self.registry.update_status(device_id, found[f"edge/{device_id}/status"])
        if f"edge/{device_id}/reported" in found:
            self.registry.update_reported(device_id, found[f"edge/{device_id}/reported"])
        device = self.registry.device(device_id)
        if device is None:
            raise DeployError(
                f"unknown device {device_id!r}: not in the registry and no retained "
                f"status on the broker"
            )
        return device

    @staticmethod
    def default_pipeline(device: Device | None) -> str:
        names = device.pipelines() if device else []
        return names[0] if names else "default"

    def deploy(
        self,
        device_id: str,
        pipeline: str,
        pid: str,
        manifest: dict[str, Any],
        allow_downgrade: bool = False,
        device: Device | None = None,
    ) -> int:
        """Publish the next desired revision for the device; returns the revision."""
        last = self.registry.desired(device_id)
        models: dict[str, tuple[dict[str, Any], bool]] = {}
        revision = 1
        if last is not None:
            revision = last[0] + 1
            for name, entry in (last[1].get("models") or {}).items():
                models[name] = (entry["manifest"], bool(entry.get("allow_downgrade")))
        if device is not None:  # a device that saw higher revisions (another controller)
            seen = (device.reported.get("ota") or {}).get("desired_revision")
            if isinstance(seen, int) and seen >= revision:
                revision = seen + 1
        models[pipeline] = (manifest, allow_downgrade)
        doc = build_desired(device_id, revision, models, self.key)
        self.client.publish(f"edge/{device_id}/desired", json.dumps(doc), qos=1, retain=True)
        self.registry.save_desired(device_id, revision, doc)
        return revision


class OutcomeWatcher:
    """Follows `edge/<id>/reported` (subscribe before deploying, so no state is missed)
    until each watched device is done with `pid`."""

    def __init__(
        self,
        client: FleetClient,
        pid: str,
        progress: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.pid = pid
        self.progress = progress
        self._devices: dict[str, str] = {}
        self._results: dict[str, str] = {}
        self._lock = threading.Lock()
        self._changed = threading.Event()
        client.subscribe("edge/+/reported", self._on)

    def watch(self, device_id: str, pipeline: str) -> None:
        with self._lock:
            self._devices[device_id] = pipeline

    def _on(self, msg: Message) -> None:
        dev = msg.topic.split("/")[1]
        with self._lock:
            pipeline = self._devices.get(dev)
        if pipeline is None or not msg.payload:
            return
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        entry = ota_entry(body, pipeline)
        if self.progress is not None and entry:
            self.progress(dev, entry)
        out = outcome(body, pipeline, self.pid)
        with self._lock:
            if out is not None and dev not in self._results:
                self._results[dev] = out
                self._changed.set()

    def wait(self, timeout: float) -> dict[str, str]:
        """id -> committed / rejected / rolled_back, or `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if len(self._results) >= len(self._devices):
                    break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._changed.wait(min(left, 0.5))
            self._changed.clear()
        with self._lock:
            return {d: self._results.get(d, "timeout") for d in self._devices}
