"""`edge-fleet devices|status|cmd|deploy` as a user runs them, against a real `edge-agent
run` subprocess and a real `edge-fleet serve` on a real mosquitto."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.home import FleetHome
from models.desired import package_id, verify_desired
from models.signing import load_trusted_keys
from tests.agent_proc import agent_toml as proc_toml
from tests.agent_proc import demo_pipeline
from tests.fleet_sim import tiny_package
from tests.mqtt_broker import Broker, Observer
from tests.ota_support import fleet_home

BIN = Path(sys.executable).parent
DEVICE = "cam-fleet"


def _toml(broker: Broker, state: Path) -> str:
    return proc_toml(broker, DEVICE, state, demo_pipeline("yolox-nano-tflite-int8"))


@pytest.fixture
def agent(
    broker: Broker, tmp_path: Path, observers: Callable[..., Observer]
) -> Iterator[subprocess.Popen[str]]:
    config = tmp_path / "agent.toml"
    config.write_text(_toml(broker, tmp_path / "state"))
    watch = observers(broker, [f"edge/{DEVICE}/reported"])
    proc = subprocess.Popen(
        [str(BIN / "edge-agent"), "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # the first retained `reported`, or the agent's output if it died
            assert proc.poll() is None, proc.communicate()[0]
            try:
                watch.next(lambda m: m.topic.endswith("/reported"), timeout=0.5)
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.communicate(timeout=20)


def fleet(*args: str, home: FleetHome, broker: Broker | None = None, timeout: float = 60):
    """`edge-fleet ARGS` as a subprocess; returns the CompletedProcess."""
    extra = ["--home", str(home.root)]
    if broker is not None:
        extra += ["--broker", f"mqtt://{broker.host}:{broker.port}"]
    return subprocess.run(
        [str(BIN / "edge-fleet"), *args, *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_status_and_cmd_against_a_real_agent(
    tmp_path: Path, broker: Broker, agent: subprocess.Popen[str]
) -> None:
    home = FleetHome(tmp_path / "home")  # no serve, no registry yet: status reads the broker
    got = fleet("status", DEVICE, home=home, broker=broker)
    assert got.returncode == 0, got.stderr
    body = json.loads(got.stdout)
    assert body["source"] == "broker" and body["online"] is True
    assert "door" in body["reported"]["pipelines"]

    ping = fleet("cmd", DEVICE, "ping", "note=hello", home=home, broker=broker)
    assert ping.returncode == 0, ping.stderr
    assert json.loads(ping.stdout)["ok"] is True
    status = fleet("cmd", DEVICE, "status", "{}", home=home, broker=broker)
    assert status.returncode == 0 and json.loads(status.stdout)["command"] == "status"

    unknown = fleet("cmd", DEVICE, "nosuch", home=home, broker=broker)
    assert unknown.returncode == 1 and "unknown_command" in unknown.stdout
    bad = fleet("cmd", DEVICE, "ping", "oops", home=home, broker=broker)
    assert bad.returncode == 1 and "not key=value" in bad.stderr
    ghost = fleet("cmd", "ghost", "ping", "--timeout", "1", home=home, broker=broker)
    assert ghost.returncode == 1 and "no reply within 1 s" in ghost.stderr
    missing = fleet("status", "ghost", home=home, broker=broker)
    assert missing.returncode == 1 and "unknown device 'ghost'" in missing.stderr


def test_registry_fills_from_a_real_agent_and_deploy_signs(
    tmp_path: Path, broker: Broker, agent: subprocess.Popen[str]
) -> None:
    home = FleetHome(tmp_path / "home")
    nokey = fleet("deploy", "a" * 64, "--device", DEVICE, home=home, broker=broker)
    assert nokey.returncode == 1 and "edge-fleet keys init" in nokey.stderr
    home = fleet_home(tmp_path / "home")
    serve = subprocess.Popen(
        [
            str(BIN / "edge-fleet"),
            "serve",
            "--home",
            str(home.root),
            "--broker",
            f"mqtt://{broker.host}:{broker.port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            got = fleet("devices", "--json", home=home)
            rows = json.loads(got.stdout) if got.returncode == 0 else []
            if rows and rows[0]["fps"] and rows[0]["online"]:
                break
            time.sleep(0.5)
        assert rows and rows[0]["id"] == DEVICE and rows[0]["online"], rows
        assert rows[0]["models"]["door"] and rows[0]["fps"] > 0
        table = fleet("devices", home=home)
        assert table.stdout.splitlines()[0].split() == [
            "ID",
            "ONLINE",
            "MODELS",
            "LAST",
            "SEEN",
            "FPS",
        ]
        assert f"{DEVICE}  yes" in table.stdout
        status = json.loads(fleet("status", DEVICE, home=home, broker=broker).stdout)
        assert status["source"] == "registry" and status["telemetry"]["device"] == DEVICE

        pkg = tiny_package(home.signing_key, tmp_path / "pkg", "9.0.0")
        dep = fleet("deploy", str(pkg), "--device", DEVICE, home=home, broker=broker)
        assert dep.returncode == 0, dep.stderr
        assert "pipeline door, desired revision 1" in dep.stdout
        again = fleet(
            "deploy", str(pkg), "--device", DEVICE, "--pipeline", "other", home=home, broker=broker
        )
        assert "desired revision 2" in again.stdout
        obs = Observer(broker, [f"edge/{DEVICE}/desired"])
        try:
            msg = obs.next(lambda m: True)
        finally:
            obs.close()
        assert msg.retain
        state = verify_desired(msg.json(), load_trusted_keys(home.signing_pub), DEVICE)
        pid = package_id(json.loads((pkg / "model.json").read_text()))
        assert state.revision == 2 and set(state.models) == {"door", "other"}  # door kept
        assert state.models["door"].package_id == pid

        ghost = fleet("deploy", pid, "--device", "ghost", home=home, broker=broker)
        assert ghost.returncode == 1 and "unknown device 'ghost'" in ghost.stderr
        (pkg / "model.onnx").write_bytes(b"tampered")
        tampered = fleet("deploy", str(pkg), "--device", DEVICE, home=home, broker=broker)
        assert tampered.returncode == 1 and "size" in tampered.stderr
    finally:
        serve.terminate()
        log, _ = serve.communicate(timeout=15)
    assert serve.returncode == 0, log
    assert f"device {DEVICE} is online" in log


def test_tag_sets_adds_and_removes(tmp_path: Path) -> None:
    from fleet.registry import Registry

    home = fleet_home(tmp_path / "home")
    with Registry(home.registry) as registry:
        registry.update_status(DEVICE, {"status": "online"})

    def tags(*args: str) -> str:
        done = fleet("tag", DEVICE, *args, home=home)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert tags("lobby", "north") == f"{DEVICE}: lobby, north"
    assert tags("+canary") == f"{DEVICE}: canary, lobby, north"
    assert tags("-north") == f"{DEVICE}: canary, lobby"  # no `--` needed before -TAG
    assert tags("-canary", "+east") == f"{DEVICE}: east, lobby"
    with Registry(home.registry) as registry:
        device = registry.device(DEVICE)
        assert device is not None and device.tags == ["east", "lobby"]
    unknown = fleet("tag", "nobody", "-x", home=home)
    assert unknown.returncode == 1 and "unknown device 'nobody'" in unknown.stderr


def test_rollout_resume_refuses_a_driven_or_finished_rollout(tmp_path: Path) -> None:
    import time as _time

    from fleet.registry import Registry

    home = fleet_home(tmp_path / "home")
    with Registry(home.registry) as registry:
        rows: list[tuple[str, str | None]] = [(DEVICE, None)]
        driven = registry.create_rollout("ab" * 32, "door", "all", [1], 0, 60.0, rows)
        registry.set_rollout(driven, heartbeat=_time.time())
        finished = registry.create_rollout("ab" * 32, "door", "all", [1], 0, 60.0, rows)
        registry.set_rollout(finished, state="completed")
    busy = fleet("rollout", "resume", str(driven), home=home)
    assert busy.returncode == 1 and f"rollout {driven} has a driver" in busy.stderr
    over = fleet("rollout", "resume", str(finished), home=home)
    assert over.returncode == 1 and "is completed: nothing to resume" in over.stderr
