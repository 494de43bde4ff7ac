"""OTA end to end against a real mosquitto: the controller's blob server, the signed desired
state, and an agent (in this process, real models, child-process validation) serving the
demo clip while it updates, rejects bad packages, and rolls back a failed trial."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet.blobs import BlobServer, BlobStore
from fleet.cli_package import build_package, init_keys
from fleet.home import FleetHome
from fleet.mqtt import BrokerSettings, FleetClient
from models.desired import build_desired, package_id
from tests.mqtt_broker import Broker, Observer
from tests.ota_support import (
    ONNX_INT8,
    RunningAgent,
    agent_toml,
    fleet_home,
    signed_package,
    signing_key,
    wait_for,
)

DEVICE = "ota-dev"
WATCHED = [f"edge/{DEVICE}/events/ota", f"edge/{DEVICE}/reported"]


class Fleet:
    """The controller side: home, blob store and server, and a client to publish with."""

    def __init__(self, root: Path, broker: Broker) -> None:
        self.root = root
        self.home = fleet_home(root / "home")
        self.store = BlobStore(self.home)
        self.client = FleetClient(BrokerSettings(broker.host, broker.port)).connect()
        self.server = BlobServer(self.client, self.store)
        self.server.start()
        self.revision = 0
        self.key = signing_key(self.home)

    def package(self, version: str, **kwargs: Any) -> tuple[Path, dict[str, Any]]:
        directory, doc = signed_package(self.home, self.root / f"pkg-{version}", version, **kwargs)
        self.store.add_package(directory)
        return directory, doc

    def desire(self, doc: dict[str, Any], allow_downgrade: bool = False) -> str:
        self.revision += 1
        desired = build_desired(DEVICE, self.revision, {"cam": (doc, allow_downgrade)}, self.key)
        self.client.publish(f"edge/{DEVICE}/desired", json.dumps(desired), retain=True)
        return package_id(doc)

    def close(self) -> None:
        self.server.stop()
        self.client.close()


@pytest.fixture
def fleet(tmp_path: Path, broker: Broker) -> Iterator[Fleet]:
    f = Fleet(tmp_path / "fleet", broker)
    yield f
    f.close()


def start_agent(tmp_path: Path, broker: Broker, fleet: Fleet, **ota: Any) -> RunningAgent:
    config = tmp_path / "agent.toml"
    config.write_text(
        agent_toml(broker.host, broker.port, tmp_path / "state", fleet.home.signing_pub, **ota)
    )
    return RunningAgent(config)


def ota_event(watcher: Observer, state: str, package: str, timeout: float = 60) -> dict[str, Any]:
    def match(m: Any) -> bool:
        if m.topic != f"edge/{DEVICE}/events/ota":
            return False
        body = m.json()
        return body["state"] == state and (body["target"] or {}).get("package") == package

    return dict(watcher.next(match, timeout).json())


def test_full_update_while_serving_the_demo_clip(
    tmp_path: Path, broker: Broker, fleet: Fleet, observers: Callable[..., Observer]
) -> None:
    watcher = observers(broker, WATCHED)
    running = start_agent(tmp_path, broker, fleet)
    try:
        pipe = running.pipe()
        wait_for(lambda: pipe.frames > 5, what="frames before the update")
        assert pipe.model_label == "yolox-nano@0.1.0"
        _, doc = fleet.package("0.2.0", source=ONNX_INT8, vector=True)
        pid = fleet.desire(doc)
        states = []
        for state in ("downloading", "verifying", "validating", "activating", "trial"):
            states.append(ota_event(watcher, state, pid)["state"])
        swaps_at_trial = pipe.swaps
        committed = ota_event(watcher, "committed", pid)
        assert committed["revision"] == 1 and states[-1] == "trial" and swaps_at_trial == 1
        assert pipe.model_label == "yolox-nano@0.2.0"
        assert pipe.swap_gap is not None and pipe.swap_gap <= 1, pipe.swap_gap
        print(f"swap: {pipe.swap_gap} camera frame(s) skipped, {pipe.camera.stats.dropped} dropped")
        assert pipe.errors == 0
        reported = wait_for(
            lambda: _reported(
                watcher, lambda r: r["ota"]["pipelines"]["cam"]["state"] == "committed"
            ),
            what="reported committed",
        )
        cam = reported["ota"]["pipelines"]["cam"]
        assert cam["current"] == {"name": "yolox-nano", "version": "0.2.0", "package": pid}
        assert cam["previous"] is None and cam["progress"]["percent"] == 100.0
        assert reported["pipelines"]["cam"]["model"] == "yolox-nano@0.2.0"
        store = tmp_path / "state" / "models"
        assert json.loads((store / "pipelines" / "cam.json").read_text())["current"] == pid
        # the same desired state again (a reconnect re-delivers it): nothing happens
        frames = pipe.frames
        fleet.client.publish(f"edge/{DEVICE}/desired", b"", retain=True)
        wait_for(lambda: pipe.frames > frames + 5, what="frames after the update")
        assert pipe.swaps == 1
    finally:
        running.stop()
    # a restart runs the committed package, not the config's model
    running = start_agent(tmp_path, broker, fleet)
    try:
        assert running.pipe().model_label == "yolox-nano@0.2.0"
    finally:
        running.stop()


def _reported(watcher: Observer, predicate: Callable[[dict[str, Any]], bool]) -> Any:
    """The newest `reported` seen so far, if it satisfies `predicate`."""
    try:
        while True:
            watcher.next(lambda m: False, 0.2)
    except AssertionError:
        pass
    for msg in reversed(watcher.seen):
        if msg.topic == f"edge/{DEVICE}/reported":
            body = msg.json()
            return body if predicate(body) else None
    return None


def test_bad_packages_are_rejected_and_the_old_model_keeps_serving(
    tmp_path: Path,
    broker: Broker,
    fleet: Fleet,
    observers: Callable[..., Observer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    watcher = observers(broker, WATCHED)
    running = start_agent(tmp_path, broker, fleet, validate_timeout_s=10.0)
    pipe = running.pipe()

    def rejected(doc: dict[str, Any], allow_downgrade: bool = False) -> str:
        frames = pipe.frames
        pid = fleet.desire(doc, allow_downgrade)
        reason = str(ota_event(watcher, "rejected", pid)["reason"])
        wait_for(lambda: pipe.frames > frames + 3, what="frames after a rejection")
        assert pipe.model_label == "yolox-nano@0.1.0" and pipe.swaps == 0
        return reason

    try:
        # a file changed on the controller after signing (same size)
        _, doc = fleet.package("0.3.0")
        blob = fleet.home.blobs_dir / doc["files"][0]["sha256"]
        original = blob.read_bytes()
        blob.write_bytes(
            original[:1000] + bytes(b ^ 0xFF for b in original[1000:2000]) + original[2000:]
        )
        assert rejected(doc).startswith("sha256 mismatch: model.onnx")
        blob.write_bytes(original)
        # model.json changed after signing
        forged = {**doc, "version": "0.3.1"}
        assert rejected(forged).startswith("bad_signature:")
        # signed by a key the device does not trust
        other = FleetHome(tmp_path / "other")
        init_keys(other)
        odir, _ = signed_package(other, tmp_path / "pkg-other", "0.4.0")
        odoc = json.loads((odir / "model.json").read_text())
        fleet.store.add_package(odir, trusted=[other.signing_pub])
        assert rejected(odoc).startswith("unknown_key:")
        # a lower version without allow_downgrade
        _, low = fleet.package("0.0.9")
        assert rejected(low) == "downgrade: 0.0.9 <= 0.1.0"
        # the controller's copy is truncated
        _, short = fleet.package("0.5.0", source=ONNX_INT8)
        sblob = fleet.home.blobs_dir / short["files"][0]["sha256"]
        sblob.write_bytes(sblob.read_bytes()[:200_000])
        assert rejected(short).startswith("truncated: model.onnx")
        # expected outputs that the model does not give
        vdir, _ = signed_package(fleet.home, tmp_path / "pkg-0.6.0", "0.6.0", vector=True)
        out = np.load(vdir / "test0_out0.npy")
        out[..., 4] += 0.8
        np.save(vdir / "test0_out0.npy", out)
        vdoc = build_package(
            vdir,
            name="yolox-nano",
            version="0.6.0",
            key_path=fleet.home.signing_key,
            test_vectors=[(vdir / "probe.npy", [vdir / "test0_out0.npy"])],
        )
        fleet.store.add_package(vdir)
        assert rejected(vdoc) == "validation: test vector 0 output 0 off by 0.8"
        # a model that kills the child that validates it, or hangs it
        _, crash = fleet.package("0.7.0")
        monkeypatch.setenv("EDGE_AGENT_OTA_VALIDATE_CRASH", "segv")
        assert rejected(crash) == "validation: the child crashed (SIGSEGV)"
        _, hang = fleet.package("0.7.1")
        monkeypatch.setenv("EDGE_AGENT_OTA_VALIDATE_CRASH", "hang")
        assert "hung" in rejected(hang)
        monkeypatch.delenv("EDGE_AGENT_OTA_VALIDATE_CRASH")
        # a package refused once is not tried again for the same revision; a good one works
        _, good = fleet.package("0.8.0", source=ONNX_INT8)
        pid = fleet.desire(good)
        ota_event(watcher, "committed", pid)
        assert pipe.model_label == "yolox-nano@0.8.0"
        # an explicit, signed downgrade is allowed
        pid = fleet.desire(low, allow_downgrade=True)
        ota_event(watcher, "committed", pid)
        assert pipe.model_label == "yolox-nano@0.0.9"
    finally:
        running.stop()


def test_failed_trial_rolls_back_and_bad_desired_states_are_ignored(
    tmp_path: Path, broker: Broker, fleet: Fleet, observers: Callable[..., Observer]
) -> None:
    watcher = observers(broker, WATCHED)
    running = start_agent(tmp_path, broker, fleet, max_latency_ratio=0.001)
    pipe = running.pipe()
    try:
        wait_for(lambda: pipe.frames > 5, what="frames")
        _, doc = fleet.package("0.2.0", source=ONNX_INT8)
        pid = fleet.desire(doc)
        ota_event(watcher, "trial", pid)
        rolled = ota_event(watcher, "rolled_back", pid)
        assert rolled["reason"].startswith("trial: p95 latency")
        assert pipe.model_label == "yolox-nano@0.1.0" and pipe.swaps == 2
        state = json.loads((tmp_path / "state" / "models" / "pipelines" / "cam.json").read_text())
        assert state == {"current": None, "previous": None}
        # desired states the device must ignore: another device's, unsigned, an old revision
        for bad, why in (
            (build_desired("other-dev", 9, {"cam": (doc, False)}, fleet.key), "addressed to"),
            ({"device": DEVICE, "revision": 9, "models": {}}, "not signed"),
            (build_desired(DEVICE, 0, {"cam": (doc, False)}, fleet.key), "lower than 1"),
        ):
            fleet.client.publish(f"edge/{DEVICE}/desired", json.dumps(bad), retain=True)

            def desired_rejected(m: Any, why: str = why) -> bool:
                body = m.json() if m.topic.endswith("events/ota") else {}
                return body.get("pipeline") is None and why in str(body.get("reason"))

            event = watcher.next(desired_rejected, 20).json()
            assert event["reason"].startswith("bad_desired:")
        assert running.ota().reported()["desired"]["state"] == "rejected"
        assert pipe.swaps == 2
    finally:
        running.stop()
