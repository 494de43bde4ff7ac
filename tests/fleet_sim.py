"""A protocol-level device simulator for the controller's tests and benchmarks: many
devices on one MQTT 5 connection, speaking the wire contract (status, reported with `ota`,
desired -> chunked blob/get with sha256 checks -> committed, or rejected when faulty).
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from models.desired import DesiredError, package_id, verify_desired
from models.signing import load_trusted_keys


@dataclass
class SimDevice:
    """One simulated device's state."""

    id: str
    pipeline: str = "cam"
    faulty: bool = False
    revision: int = 0
    current: dict[str, Any] | None = None
    previous: dict[str, Any] | None = None
    ota: dict[str, Any] = field(default_factory=lambda: {"state": "idle"})
    inbox: queue.Queue[tuple[str, Any]] = field(default_factory=queue.Queue)
    transfers: list[float] = field(default_factory=list)  # seconds per package download
    retries: int = 0
    fetched_bytes: int = 0  # chunk bytes accepted (duplicates included)


class SimFleet:
    """`SimFleet(host, port, ids, trusted=..., faulty={...})`; start() / stop()."""

    def __init__(
        self,
        host: str,
        port: int,
        ids: list[str],
        trusted: Path,
        *,
        faulty: set[str] | None = None,
        faulty_versions: set[str] | None = None,
        chunk: int = 256 << 10,
        window: int = 8,
        telemetry_fps: float = 10.0,
    ) -> None:
        self.devices = {i: SimDevice(i, faulty=i in (faulty or set())) for i in ids}
        self.trusted = load_trusted_keys(trusted)
        self.faulty_versions = faulty_versions or set()  # empty: every version fails
        self.chunk, self.window, self.fps = chunk, window, telemetry_fps
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"sim-{time.monotonic_ns()}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.max_inflight_messages_set(1000)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.host, self.port = host, port

    # --- network thread: hand over only ----------------------------------------------

    def _on_connect(self, client: paho.Client, *_a: Any) -> None:
        client.subscribe([("edge/+/desired", 1), ("edge/+/blob/data", 1)])

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        dev = self.devices.get(msg.topic.split("/")[1])
        if dev is None:
            return
        kind = "desired" if msg.topic.endswith("/desired") else "blob"
        dev.inbox.put((kind, msg))

    # --- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> SimFleet:
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            raise RuntimeError("simulator: no SUBACK")
        for dev in self.devices.values():
            status = {"status": "online", "version": "sim-1", "boot_time": None}
            self._pub(f"edge/{dev.id}/status", status, retain=True)
            self._report(dev)
            self._pub(
                f"edge/{dev.id}/telemetry",
                {"device": dev.id, "pipelines": {dev.pipeline: {"fps": self.fps}}},
                qos=0,
            )
            t = threading.Thread(target=self._run, args=(dev,), name=f"sim-{dev.id}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        for dev in self.devices.values():
            info = self._pub(
                f"edge/{dev.id}/status", {"status": "offline", "clean": True}, retain=True
            )
            info.wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> SimFleet:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # --- a device ----------------------------------------------------------------------

    def _pub(
        self,
        topic: str,
        body: Any,
        qos: int = 1,
        retain: bool = False,
        props: Properties | None = None,
    ) -> paho.MQTTMessageInfo:
        return self.client.publish(
            topic, json.dumps(body), qos=qos, retain=retain, properties=props
        )

    def _report(self, dev: SimDevice) -> None:
        label = f"{dev.current['name']}@{dev.current['version']}" if dev.current else "none"
        body = {
            "agent_version": "sim-1",
            "pipelines": {dev.pipeline: {"model": label}},
            "ota": {
                "desired_revision": dev.revision,
                "pipelines": {
                    dev.pipeline: {
                        **dev.ota,
                        "current": dev.current,
                        "previous": dev.previous,
                        "updated_at": time.time(),
                    }
                },
            },
            "ts": time.time(),
        }
        self._pub(f"edge/{dev.id}/reported", body, retain=True)

    def _set(
        self,
        dev: SimDevice,
        state: str,
        target: dict[str, Any] | None,
        reason: str | None = None,
        progress: dict[str, Any] | None = None,
    ) -> None:
        dev.ota = {"state": state, "target": target, "reason": reason, "progress": progress}
        self._report(dev)

    def _run(self, dev: SimDevice) -> None:
        while not self._stop.is_set():
            try:
                kind, msg = dev.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if kind != "desired" or not msg.payload:
                continue
            try:
                state = verify_desired(json.loads(msg.payload), self.trusted, dev.id)
            except (DesiredError, ValueError) as exc:
                self._set(dev, "rejected", None, f"bad_desired: {exc}")
                continue
            if state.revision <= dev.revision:
                continue
            dev.revision = state.revision
            entry = state.models.get(dev.pipeline)
            if entry is None:
                continue
            doc = entry.manifest_doc
            target = {"name": doc["name"], "version": doc["version"], "package": package_id(doc)}
            if dev.current and dev.current["package"] == target["package"]:
                continue
            self._update(dev, doc, target)

    def _update(self, dev: SimDevice, doc: dict[str, Any], target: dict[str, Any]) -> None:
        total = sum(int(f["size"]) for f in doc["files"])
        self._set(dev, "downloading", target, progress={"bytes": 0, "total": total, "percent": 0.0})
        started = time.monotonic()
        try:
            for f in doc["files"]:
                self._fetch(dev, f["sha256"], int(f["size"]))
        except RuntimeError as exc:
            self._set(dev, "rejected", target, f"download: {exc}")
            return
        dev.transfers.append(time.monotonic() - started)
        self._set(dev, "verifying", target)
        if dev.faulty and (not self.faulty_versions or doc["version"] in self.faulty_versions):
            self._set(dev, "rejected", target, "validation: simulated fault")
            return
        dev.previous, dev.current = dev.current, target
        self._set(dev, "committed", target)

    def _fetch(self, dev: SimDevice, sha: str, size: int) -> None:
        offsets = list(range(0, size, self.chunk)) or [0]
        digest = hashlib.sha256()
        got: dict[int, bytes] = {}
        sent: dict[bytes, tuple[int, float]] = {}
        nxt = 0
        n = 0
        later: list[tuple[str, Any]] = []
        while len(got) < len(offsets):
            while nxt < len(offsets) and len(sent) < self.window:
                n += 1
                corr = f"{dev.id}:{n}".encode()
                self._request(dev, sha, offsets[nxt], corr)
                sent[corr] = (offsets[nxt], time.monotonic())
                nxt += 1
            try:
                _kind, msg = dev.inbox.get(timeout=0.5)
            except queue.Empty:
                msg = None
            if self._stop.is_set():
                raise RuntimeError("stopped")
            if msg is not None and _kind == "blob":
                corr = bytes(msg.properties.CorrelationData)
                props = dict(getattr(msg.properties, "UserProperty", []) or [])
                if corr in sent:
                    off, _t = sent.pop(corr)
                    if props.get("error"):
                        raise RuntimeError(f"{sha}: {props['error']}")
                    data = bytes(msg.payload)
                    if hashlib.sha256(data).hexdigest() != props.get("chunk_sha256"):
                        raise RuntimeError(f"{sha}@{off}: chunk sha256 mismatch")
                    got[off] = data
                    dev.fetched_bytes += len(data)
            elif msg is not None:
                later.append((_kind, msg))  # a new desired: handled after this download
            now = time.monotonic()
            for corr, (off, t) in list(sent.items()):
                if now - t > 5.0:  # unanswered: ask again
                    dev.retries += 1
                    del sent[corr]
                    n += 1
                    c2 = f"{dev.id}:{n}".encode()
                    self._request(dev, sha, off, c2)
                    sent[c2] = (off, now)
        for item in later:
            dev.inbox.put(item)
        for off in offsets:
            digest.update(got[off])
        if digest.hexdigest() != sha or sum(len(b) for b in got.values()) != size:
            raise RuntimeError(f"sha256 mismatch: {sha}")

    def _request(self, dev: SimDevice, sha: str, offset: int, corr: bytes) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = f"edge/{dev.id}/blob/data"
        props.CorrelationData = corr
        self._pub(
            f"edge/{dev.id}/blob/get",
            {"sha256": sha, "offset": offset, "length": self.chunk},
            props=props,
        )


def tiny_package(key_path: Path, dest: Path, version: str, size: int = 64 << 10) -> Path:
    """A signed package whose one file is `size` random-ish bytes (no real model: the
    simulator never loads it)."""
    from models.package import MANIFEST
    from models.signing import load_private_key, sign_document

    dest.mkdir(parents=True)
    data = hashlib.sha256(version.encode()).digest() * (size // 32 + 1)
    (dest / "model.onnx").write_bytes(data[:size])
    doc = {
        "schema": 1,
        "name": "sim-model",
        "version": version,
        "task": "detection",
        "family": "yolox",
        "runtime": "onnx",
        "precision": "fp32",
        "model": "model.onnx",
        "files": [
            {"path": "model.onnx", "sha256": hashlib.sha256(data[:size]).hexdigest(), "size": size}
        ],
    }
    signed = sign_document(doc, load_private_key(key_path))
    (dest / MANIFEST).write_text(json.dumps(signed, indent=2), encoding="utf-8")
    return dest
