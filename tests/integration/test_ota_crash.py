"""Crash safety of OTA: `edge-agent run` as a real subprocess, killed with SIGKILL in every OTA
state (a fault hook makes it kill itself there, three agents at a time), then started again:
it serves a valid model, old or new, and converges. Also: a broker restart mid-transfer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.ota.service import OtaService
from fleet.blobs import BlobServer, BlobStore
from fleet.mqtt import BrokerSettings, FleetClient, Message
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

EDGE_AGENT = Path(sys.executable).parent / "edge-agent"
RUNS = 3
# state to kill in -> the state the pipeline must settle in after the restart
KILLS = {
    "downloading:12": "committed",
    "verifying": "committed",
    "validating": "committed",
    "activating": "rolled_back",
    "trial": "rolled_back",
    "committed": "committed",
}


class Controller:
    def __init__(self, root: Path, broker: Broker) -> None:
        self.home = fleet_home(root / "home")
        self.store = BlobStore(self.home)
        _, self.doc = signed_package(self.home, root / "pkg", "0.2.0", source=ONNX_INT8)
        self.pid = package_id(self.doc)
        self.store.add_package(root / "pkg")
        self.client = FleetClient(BrokerSettings(broker.host, broker.port)).connect()
        self.server = BlobServer(self.client, self.store)
        self.server.start()
        self.key = signing_key(self.home)

    def desire(self, device: str) -> None:
        desired = build_desired(device, 1, {"cam": (self.doc, False)}, self.key)
        self.client.publish(f"edge/{device}/desired", json.dumps(desired), retain=True)

    def close(self) -> None:
        self.server.stop()
        self.client.close()


@pytest.fixture
def controller(tmp_path: Path, broker: Broker) -> Iterator[Controller]:
    c = Controller(tmp_path / "fleet", broker)
    yield c
    c.close()


def spawn(config: Path, fault: str | None = None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_OTA")}
    if fault:
        env["EDGE_AGENT_OTA_FAULT"] = fault
    log = open(config.with_suffix(".log"), "ab")  # noqa: SIM115 - closed below, after the process
    try:
        return subprocess.Popen(
            [str(EDGE_AGENT), "run", "--config", str(config)], stdout=log, stderr=log, env=env
        )
    finally:
        log.close()


def latest(watcher: Observer, device: str, suffix: str) -> dict[str, Any] | None:
    try:
        while True:
            watcher.next(lambda m: False, 0.1)
    except AssertionError:
        pass
    for msg in reversed(watcher.seen):
        if msg.topic == f"edge/{device}/{suffix}":
            return dict(msg.json())
    return None


@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(KILLS))
def test_sigkill_in_every_ota_state_leaves_a_valid_model(
    fault: str,
    tmp_path: Path,
    broker: Broker,
    controller: Controller,
    observers: Callable[..., Observer],
) -> None:
    state = fault.partition(":")[0]
    devices = [f"kill-{state}-{run}" for run in range(RUNS)]
    watcher = observers(
        broker, [f"edge/{d}/{t}" for d in devices for t in ("reported", "telemetry")]
    )
    configs = []
    for device in devices:
        config = tmp_path / f"{device}.toml"
        config.write_text(
            agent_toml(
                broker.host,
                broker.port,
                tmp_path / device,
                controller.home.signing_pub,
                device=device,
                chunk_bytes=32768,
                window=2,
            )
        )
        configs.append(config)
        controller.desire(device)
    procs = [spawn(c, fault) for c in configs]
    try:
        for device, proc in zip(devices, procs):
            assert proc.wait(90) == -signal.SIGKILL, (device, proc.returncode)
            record = json.loads((tmp_path / device / "ota" / "cam.json").read_text())
            assert record["state"] == state, (device, record)
        procs = [spawn(c) for c in configs]
        want = KILLS[fault]
        label = "yolox-nano@0.2.0" if want == "committed" else "yolox-nano@0.1.0"
        for device in devices:

            def settled(device: str = device) -> bool:
                body = latest(watcher, device, "reported")
                if body is None or "ota" not in body:
                    return False
                cam = body["ota"]["pipelines"]["cam"]
                return cam["state"] == want and body["pipelines"]["cam"]["model"] == label

            wait_for(settled, 90, f"{device} to settle in {want}")
            telemetry = wait_for(
                lambda device=device: (
                    (latest(watcher, device, "telemetry") or {})
                    .get("pipelines", {})
                    .get("cam", {})
                    .get("frames")
                ),
                30,
                f"{device} to process frames",
            )
            assert telemetry > 0
            record = json.loads((tmp_path / device / "ota" / "cam.json").read_text())
            assert record["state"] == want
            if want == "rolled_back":
                assert record["reason"].startswith("restarted during")
                assert controller.pid in record["refused"]
        if state == "downloading":  # resumed: what was written before the kill is not asked again
            served = controller.server.stats()["devices"]
            size = controller.doc["files"][0]["size"]
            for device in devices:
                # every chunk written before the kill is in the chunk log: only those in
                # flight at the kill (the window of 2) come again
                assert size <= served[device] <= size + 3 * 32768, (device, served[device], size)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


class SlowServer(BlobServer):
    """The real server, answering at most ~25 chunks a second (so a restart lands mid-transfer)."""

    def _on_request(self, msg: Message) -> None:
        time.sleep(0.04)
        super()._on_request(msg)


def test_broker_restart_mid_transfer_resumes_the_download(
    tmp_path: Path, broker: Broker, observers: Callable[..., Observer]
) -> None:
    home = fleet_home(tmp_path / "home")
    pkg, doc = signed_package(home, tmp_path / "pkg", "0.2.0", source=ONNX_INT8)
    store = BlobStore(home)
    pid = store.add_package(pkg)
    client = FleetClient(BrokerSettings(broker.host, broker.port)).connect()
    server = SlowServer(client, store)
    server.start()
    chunk = 32768
    config = tmp_path / "agent.toml"
    config.write_text(
        agent_toml(
            broker.host,
            broker.port,
            tmp_path / "state",
            home.signing_pub,
            chunk_bytes=chunk,
            window=4,
            request_timeout_s=1.5,
        )
    )
    running = RunningAgent(config)
    try:
        records = tmp_path / "state" / "ota" / "cam.json"
        desired = build_desired("ota-dev", 1, {"cam": (doc, False)}, signing_key(home))
        client.publish("edge/ota-dev/desired", json.dumps(desired), retain=True)
        ota = running.ota()
        assert isinstance(ota, OtaService)
        size = doc["files"][0]["size"]
        wait_for(lambda: ota.records["cam"].progress.bytes > size // 4, 60, "a quarter of the file")
        held_before = ota.records["cam"].progress.bytes
        broker.restart()
        wait_for(lambda: ota.records["cam"].state.value == "committed", 120, "the commit")
        assert json.loads(records.read_text())["target"]["package"] == pid
        progress = ota.reported()["pipelines"]["cam"]["progress"]
        assert progress["bytes"] == progress["total"] == size and held_before < size
        served = server.stats()["bytes"]
        # Only what was in flight at the restart comes twice: asked again by the device
        # (served twice) or delivered again by the broker (QoS 1); the device counts both.
        limit = 2 * 4 * chunk
        assert 0 <= served - size <= limit, served - size
        assert 0 <= progress["refetched_bytes"] <= limit, progress
        assert running.agent.link.status().connects >= 2
        print(
            f"broker restart at {held_before}/{size} bytes: served {served - size} bytes "
            f"twice, device received {progress['refetched_bytes']} twice, "
            f"{progress['retries']} retries"
        )
    finally:
        running.stop()
        server.stop()
        client.close()
