"""`edge-fleet serve` (a real subprocess) + deploy and staged rollouts through the CLI,
over 20 simulated devices (tests/fleet_sim.py) on a real mosquitto."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.cli import main
from fleet.home import FleetHome
from fleet.registry import Registry
from models.desired import package_id, verify_desired
from models.signing import load_trusted_keys
from tests.fleet_sim import SimFleet, tiny_package
from tests.mqtt_broker import Broker, Observer
from tests.ota_support import fleet_home

EDGE_FLEET = Path(sys.executable).parent / "edge-fleet"
IDS = [f"sim-{i:02d}" for i in range(20)]


def _wait(pred: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def serve(tmp_path: Path, broker: Broker) -> Iterator[tuple[FleetHome, subprocess.Popen[str]]]:
    home = fleet_home(tmp_path / "home")
    proc = subprocess.Popen(
        [
            str(EDGE_FLEET),
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
        yield home, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def _registry_devices(home: FleetHome) -> dict[str, dict[str, Any]]:
    with Registry(home.registry) as reg:
        return {d.id: d.as_json() for d in reg.devices()}


def _wait_registered(home: FleetHome, proc: subprocess.Popen[str], n: int) -> None:
    """Until serve's registry holds `n` devices; serve's output if it died meanwhile."""
    _wait(
        lambda: proc.poll() is not None or len(_registry_devices(home)) == n,
        what=f"serve to register {n} devices",
    )
    assert proc.poll() is None, proc.communicate()[0]


def test_staged_rollout_halts_at_the_threshold_and_reverts(
    tmp_path: Path,
    broker: Broker,
    serve: tuple[FleetHome, subprocess.Popen[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    home, proc = serve
    url = f"mqtt://{broker.host}:{broker.port}"
    common = ["--home", str(home.root), "--broker", url]
    v1 = tiny_package(home.signing_key, tmp_path / "v1", "1.0.0", 300_000)
    v2 = tiny_package(home.signing_key, tmp_path / "v2", "2.0.0", 300_000)
    faulty = {"sim-05", "sim-08"}  # both in stage 2 (devices 3..10 of 20)
    with SimFleet(
        broker.host,
        broker.port,
        IDS,
        home.signing_pub,
        faulty=faulty,
        faulty_versions={"2.0.0"},
        chunk=65536,
    ) as sim:
        _wait_registered(home, proc, 20)
        devs = [arg for d in IDS for arg in ("--device", d)]
        assert main(["deploy", str(v1), *devs, "--wait", "--timeout", "60", *common]) == 0
        out = capsys.readouterr().out
        assert all(f"{d}: committed\n" in out for d in IDS) and "desired revision 1" in out
        assert "sim-00: downloading" in out
        p1 = package_id(json.loads((v1 / "model.json").read_text()))
        _wait(
            lambda: all(
                d["models"].get("cam") == "sim-model@1.0.0"
                for d in _registry_devices(home).values()
            ),
            what="v1 everywhere",
        )

        rc = main(
            [
                "rollout",
                "start",
                str(v2),
                "--select",
                "all",
                "--stages",
                "10,50,100",
                "--max-failures",
                "5%",
                "--device-timeout",
                "30",
                *common,
            ]
        )
        out = capsys.readouterr().out
        assert rc == 1, out
        assert "stages [2, 10, 20], at most 1 failure(s)" in out
        assert "halted: 2 failure(s), more than the 1 allowed, in stage 2" in out
        assert "validation: simulated fault" in out
        with Registry(home.registry) as reg:
            r = reg.rollout(1)
        assert r["state"] == "halted"
        states = {d["device"]: d["state"] for d in r["devices"]}
        assert all(states[d] == "committed" for d in IDS[:2]), (states, out)  # stage 1: v2
        assert all(states[d] == "reverted" for d in IDS[2:10])
        assert all(states[d] == "waiting" for d in IDS[10:])  # stage 3 never started
        # the reverted stage runs v1 again; stage 3 never saw v2
        _wait(
            lambda: all((sim.devices[d].current or {}).get("package") == p1 for d in IDS[2:10]),
            what="stage 2 back on v1",
        )
        assert all(sim.devices[d].revision == 1 for d in IDS[10:])
        assert all(
            sim.devices[d].current["version"] == "2.0.0"  # type: ignore[index]
            for d in IDS[:2]
        )
        obs = Observer(broker, ["edge/sim-03/desired"])
        try:
            doc = obs.next(lambda m: True).json()
        finally:
            obs.close()
        state = verify_desired(doc, load_trusted_keys(home.signing_pub), "sim-03")
        assert state.revision == 3 and state.models["cam"].allow_downgrade
        assert state.models["cam"].package_id == p1

        assert main(["rollout", "status", "1", "--home", str(home.root)]) == 0
        out = capsys.readouterr().out
        assert "rollout 1: halted" in out and "sim-05: reverted" in out
        assert main(["rollout", "abort", "1", "--home", str(home.root)]) == 0
        assert "already halted" in capsys.readouterr().out
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, log
    assert "SIGTERM: stopping" in log and "device sim-00 is online" in log


def test_serve_drives_a_detached_rollout_and_resume_then_refuses_it(
    tmp_path: Path,
    broker: Broker,
    serve: tuple[FleetHome, subprocess.Popen[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    home, proc = serve
    common = ["--home", str(home.root), "--broker", f"mqtt://{broker.host}:{broker.port}"]
    ids = IDS[:3]
    v1 = tiny_package(home.signing_key, tmp_path / "v1", "1.0.0", 100_000)
    with SimFleet(broker.host, broker.port, ids, home.signing_pub, chunk=32768):
        _wait_registered(home, proc, 3)
        start = ["rollout", "start", str(v1), "--select", "all", "--stages", "100", "--detach"]
        assert main([*start, *common]) == 0  # recorded, not driven: no heartbeat yet
        assert "rollout 1:" in capsys.readouterr().out

        def state() -> str:
            with Registry(home.registry) as reg:
                return str(reg.rollout(1)["state"])

        _wait(lambda: state() == "completed", timeout=60, what="serve to drive rollout 1")
        assert all(
            d["models"].get("cam") == "sim-model@1.0.0" for d in _registry_devices(home).values()
        )
        assert main(["rollout", "resume", "1", *common]) == 1
        assert "is completed: nothing to resume" in capsys.readouterr().err
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=15)
    assert "rollout 1: resuming" in log, log
