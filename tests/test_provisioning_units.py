"""The renewal units in systemd/ (verified by systemd-analyze with the binary stubbed), the
`renew --check` exit codes their ExecCondition relies on, and the ACL's renewal lines."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent.cli import main as agent_main
from fleet.ca import FleetCA
from fleet.home import FleetHome
from provisioning.config_writer import render_config, write_config
from provisioning.identity import IdentityPaths, atomic_write, generate_key, key_pem

SYSTEMD = Path(__file__).resolve().parents[1] / "systemd"
BIN = "/opt/edge-agent/bin/edge-agent "


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_renew_units_verify(tmp_path: Path) -> None:
    stub = tmp_path / "edge-agent"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    service = (SYSTEMD / "edge-agent-renew.service").read_text()
    assert service.count(BIN) == 2
    (tmp_path / "edge-agent-renew.service").write_text(service.replace(BIN, f"{stub} "))
    shutil.copy(SYSTEMD / "edge-agent-renew.timer", tmp_path)
    for unit in ("edge-agent-renew.service", "edge-agent-renew.timer"):
        result = subprocess.run(
            ["systemd-analyze", "verify", str(tmp_path / unit)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert not [line for line in output.splitlines() if "edge-agent-renew" in line], output


def test_renew_check_exit_codes(tmp_path: Path) -> None:
    ca = FleetCA.init(FleetHome(tmp_path / "home"))
    paths = IdentityPaths(tmp_path / "state")
    key = generate_key()
    cert = ca.sign(key.public_key(), "cam-1", usage="client", days=40)
    atomic_write(paths.key, key_pem(key))
    atomic_write(paths.cert, cert.public_bytes(serialization.Encoding.PEM))
    atomic_write(paths.ca, ca.cert_pem())
    config = tmp_path / "agent.toml"
    write_config(config, render_config("cam-1", paths, "127.0.0.1", 1))
    base = ["renew", "--check", "--config", str(config), "--if-expiring-within"]
    assert agent_main([*base, "30d"]) == 1  # 40 days left: not due
    assert agent_main([*base, "60d"]) == 0  # due
    assert agent_main([*base[:3], str(tmp_path / "missing.toml"), base[4], "30d"]) == 0


def test_the_acl_lets_a_device_renew_only_itself() -> None:
    lines = (SYSTEMD / "mosquitto" / "edge.acl").read_text().splitlines()
    assert "pattern write edge/%u/renew/request" in lines
    assert "pattern read edge/%u/renew/reply" in lines
