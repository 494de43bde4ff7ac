"""`edge-agent doctor` on fake device trees (a Jetson Orin Nano, a Raspberry Pi 5, an empty
box) and against real mosquitto listeners: TLS with the right CA, a wrong CA, no client
certificate, plain TCP, a closed port, a silent port; plus the clock rules.
"""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main as cli_main
from agent.doctor import collect, render, run_doctor
from agent.doctor_broker import CertInfo, broker_checks, clock_check, connect_packet
from agent.doctor_checks import Host, Status, l4t_version
from tests.mqtt_broker import Broker, BrokerMissing, CertAuthority, TlsFiles, free_port


def write(root: Path, relative: str, content: str | bytes) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def cpuinfo(count: int, part: str, extra: str = "") -> str:
    block = "processor\t: {n}\nBogoMIPS\t: 62.50\nCPU implementer\t: 0x41\nCPU part\t: {part}\n\n"
    return "".join(block.format(n=n, part=part) for n in range(count)) + extra


def thermal(root: Path, zones: dict[str, int]) -> None:
    for n, (name, milli) in enumerate(zones.items()):
        write(root, f"sys/class/thermal/thermal_zone{n}/type", name + "\n")
        write(root, f"sys/class/thermal/thermal_zone{n}/temp", f"{milli}\n")


@pytest.fixture
def jetson(tmp_path: Path) -> Path:
    root = tmp_path / "orin"
    write(root, "proc/device-tree/model", b"NVIDIA Jetson Orin Nano Developer Kit\0")
    write(
        root,
        "etc/nv_tegra_release",
        "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64,"
        " DATE: Mon May  6 17:34:21 UTC 2024\n",
    )
    write(root, "proc/cpuinfo", cpuinfo(6, "0xd42"))
    write(root, "proc/meminfo", "MemTotal:        7829008 kB\nMemAvailable:    5242880 kB\n")
    thermal(root, {"cpu-thermal": 45500, "gpu-thermal": 44000, "tj-thermal": 47250})
    write(root, "dev/video0", "")
    write(root, "sys/class/video4linux/video0/name", "vi-output, imx219 9-0010\n")
    write(root, "dev/ttyTHS1", "")
    write(root, "usr/lib/aarch64-linux-gnu/tegra/libcuda.so.1.1", "")
    write(root, "usr/lib/aarch64-linux-gnu/libnvinfer.so.10.3.0", "")
    return root


@pytest.fixture
def raspberry_pi(tmp_path: Path) -> Path:
    root = tmp_path / "pi5"
    write(root, "proc/device-tree/model", b"Raspberry Pi 5 Model B Rev 1.0\0")
    write(root, "proc/cpuinfo", cpuinfo(4, "0xd0b", "Model\t\t: Raspberry Pi 5 Model B Rev 1.0\n"))
    write(root, "proc/meminfo", "MemTotal:        8245000 kB\nMemAvailable:    7340032 kB\n")
    write(root, "sys/devices/platform/soc/soc:firmware/get_throttled", "50005\n")
    thermal(root, {"cpu-thermal": 82300})
    write(root, "sys/bus/usb/devices/1-1/idVendor", "1d6b\n")  # a hub
    write(root, "sys/bus/usb/devices/1-1/idProduct", "0002\n")
    write(root, "sys/bus/usb/devices/2-1/idVendor", "1a6e\n")  # Coral, before firmware load
    write(root, "sys/bus/usb/devices/2-1/idProduct", "089a\n")
    write(root, "dev/ttyAMA10", "")
    (root / "dev" / "serial0").symlink_to("ttyAMA10")
    write(root, "dev/video0", "")
    write(root, "sys/class/video4linux/video0/name", "USB Camera: USB Camera\n")
    return root


def checks_by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"] if c["section"] != "runtimes"}


# --- fake trees ---------------------------------------------------------------------


def test_jetson_orin_tree(jetson: Path) -> None:
    report = collect(root=jetson, runtimes=False)
    got = checks_by_name(report)
    assert got["board"]["status"] == "ok"
    assert got["board"]["detail"] == "NVIDIA Jetson Orin Nano Developer Kit, L4T 36.3.0"
    assert got["board"]["data"] == {
        "kind": "jetson",
        "model": "NVIDIA Jetson Orin Nano Developer Kit",
        "l4t": "36.3.0",
    }
    assert "throttling" not in got  # a Raspberry Pi check
    assert got["cpu"]["detail"] == "6 x Cortex-A78AE"
    assert got["memory"]["data"] == {"total_mb": 7645, "available_mb": 5120}
    assert got["temperature"]["status"] == "ok"
    assert got["temperature"]["data"]["celsius"]["tj-thermal"] == 47.2
    assert got["cameras"]["status"] == "ok"
    assert got["cameras"]["detail"] == "/dev/video0 (vi-output, imx219 9-0010)"
    assert got["serial"]["detail"] == "/dev/ttyTHS1"
    assert got["cuda"]["status"] == "ok" and "tegra/libcuda.so.1.1" in got["cuda"]["detail"]
    # JetPack's TensorRT is there, but not importable from a plain venv: say how to fix it
    assert got["tensorrt"]["status"] == "warn"
    assert "--system-site-packages" in got["tensorrt"]["detail"]
    assert got["coral"]["status"] == "absent"
    assert report["platform"]["model"] == "NVIDIA Jetson Orin Nano Developer Kit"
    assert report["platform"]["l4t"].startswith("# R36 (release), REVISION: 3.0")
    assert report["platform"]["cpus"] == 6


def test_raspberry_pi_5_tree_flags_power_and_coral(raspberry_pi: Path) -> None:
    got = checks_by_name(collect(root=raspberry_pi, runtimes=False))
    assert got["board"]["status"] == "ok"
    assert got["board"]["detail"] == "Raspberry Pi 5 Model B Rev 1.0"
    throttling = got["throttling"]
    assert throttling["status"] == "warn"
    assert throttling["data"]["now"] == ["under-voltage", "throttled"]
    assert throttling["data"]["since_boot"] == ["under-voltage", "throttled"]
    assert throttling["detail"].startswith("0x50005: now: under-voltage, throttled;")
    assert "power supply" in throttling["detail"]
    assert got["cpu"]["detail"] == "4 x Cortex-A76"
    assert got["temperature"]["status"] == "warn"  # 82.3 °C
    assert got["coral"]["status"] == "warn"  # the stick is there, its library is not
    assert "1a6e:089a" in got["coral"]["detail"] and "libedgetpu" in got["coral"]["detail"]
    assert got["serial"]["detail"] == "/dev/serial0 -> ttyAMA10, /dev/ttyAMA10"
    assert got["cameras"]["detail"] == "/dev/video0 (USB Camera: USB Camera)"
    assert got["cuda"]["status"] == "absent"


def test_coral_ok_with_library_and_pcie(raspberry_pi: Path) -> None:
    write(raspberry_pi, "usr/lib/aarch64-linux-gnu/libedgetpu.so.1.0", "")
    write(raspberry_pi, "dev/apex_0", "")
    coral = checks_by_name(collect(root=raspberry_pi, runtimes=False))["coral"]
    assert coral["status"] == "ok" and "PCIe /dev/apex_0" in coral["detail"]


def test_throttling_through_vcgencmd_and_clean_board() -> None:
    class LivePi(Host):
        def read(self, relative: str) -> str | None:
            return "Raspberry Pi 4 Model B Rev 1.4" if relative.endswith("model") else None

        def which(self, command: str) -> str | None:
            return "/usr/bin/vcgencmd"

    from agent.doctor_checks import throttling_check

    host = LivePi(Path("/"), run=lambda argv: "throttled=0x0\n")
    check = throttling_check(host)
    assert check is not None and check.status is Status.OK and check.data["source"] == "vcgencmd"


def test_empty_tree_is_all_absent_not_failed(tmp_path: Path) -> None:
    report = collect(root=tmp_path, runtimes=False)
    got = checks_by_name(report)
    assert got["board"]["data"]["kind"] == "generic"
    for name in ("cpu", "memory", "temperature", "cuda", "tensorrt", "coral", "cameras", "serial"):
        assert got[name]["status"] == "absent", got[name]
    assert report["summary"]["fail"] == 0


def test_json_structure_and_exit_status(jetson: Path) -> None:
    out = io.StringIO()
    assert run_doctor(True, out, root=jetson) == 0
    report = json.loads(out.getvalue())
    assert set(report) == {"platform", "runtimes", "checks", "summary"}
    assert {r["name"] for r in report["runtimes"]} == {"tflite", "onnx", "tensorrt"}
    sections = [c["section"] for c in report["checks"]]
    order = ["platform", "accelerators", "runtimes", "devices", "clock"]
    assert sorted(set(sections), key=order.index) == order
    assert sections == sorted(sections, key=order.index)  # grouped, in order
    for check in report["checks"]:
        assert set(check) == {"section", "name", "status", "detail", "data"}
        assert check["status"] in ("ok", "warn", "fail", "absent")
        assert check["detail"] and "\n" not in check["detail"]
    assert sum(report["summary"].values()) == len(report["checks"])
    table = render(report)
    assert "L4T 36.3.0" in table and "providers:" in table and "delegates:" in table
    # a failing check turns the exit status to 1
    write(jetson, "sys/class/thermal/thermal_zone0/temp", "97000\n")
    assert run_doctor(False, io.StringIO(), root=jetson) == 1


def test_l4t_version() -> None:
    assert l4t_version("# R35 (release), REVISION: 5.0, GCID: 35550185") == "35.5.0"
    assert l4t_version("garbage") is None


# --- broker -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("doctor-pki")
    ca = CertAuthority(work / "ca", "fleet-ca", days=90)
    server = ca.issue("server", "127.0.0.1", server=True, days=60)
    short = ca.issue("short", "127.0.0.1", server=True, days=3)
    device = ca.issue("cam-a", "cam-a", days=60)
    other = CertAuthority(work / "other", "other-ca")
    return {"ca": ca, "server": server, "short": short, "device": device, "other": other.cert}


def start_broker(workdir: Path, tls: TlsFiles | None) -> Broker:
    try:
        broker = Broker(workdir, tls=tls)
    except BrokerMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    broker.start()
    return broker


@pytest.fixture
def tls_broker(tmp_path: Path, pki: dict[str, Any]) -> Iterator[Broker]:
    cert, key = pki["server"]
    broker = start_broker(tmp_path / "broker", TlsFiles(pki["ca"].cert, cert, key))
    yield broker
    broker.stop()


def agent_toml(path: Path, port: int, tls: dict[str, Path] | None, host: str = "127.0.0.1") -> Path:
    text = f'[device]\nid = "cam-a"\nstate_dir = "{path.parent}"\n\n'
    text += f'[mqtt]\nhost = "{host}"\nport = {port}\n'
    if tls is not None:
        text += "\n[mqtt.tls]\n" + "".join(f'{k} = "{v}"\n' for k, v in tls.items())
    path.write_text(text)
    return path


def by_name(checks: list) -> dict[str, Any]:
    return {c.name: c for c in checks}


def test_tls_broker_with_the_right_ca(tmp_path: Path, tls_broker: Broker, pki) -> None:
    cert, key = pki["device"]
    config = agent_toml(
        tmp_path / "agent.toml",
        tls_broker.port,
        {"ca_file": pki["ca"].cert, "cert_file": cert, "key_file": key},
    )
    checks, certs = broker_checks(config, timeout=2.0)
    got = by_name(checks)
    assert [c.status for c in checks] == [Status.OK] * 5, [(c.name, c.detail) for c in checks]
    assert list(got) == ["config", "client-certificate", "tcp", "tls", "mqtt"]
    tls = got["tls"]
    assert tls.data["subject"] == "CN=127.0.0.1" and tls.data["issuer"] == "CN=fleet-ca"
    assert 58 <= tls.data["days_left"] <= 60
    assert tls.data["version"] in ("TLSv1.2", "TLSv1.3")
    assert "broker certificate CN=127.0.0.1, issued by CN=fleet-ca, valid until" in tls.detail
    assert got["client-certificate"].data["subject"] == "CN=cam-a"
    assert got["mqtt"].detail.startswith("CONNACK success")
    assert [label for label, _ in certs] == ["client certificate", "broker certificate"]
    clock = clock_check(Host(tmp_path), certs)
    assert clock.status is Status.OK and "within the validity of the client" in clock.detail


def test_tls_broker_with_a_wrong_ca_fails_clearly(tmp_path: Path, tls_broker: Broker, pki) -> None:
    cert, key = pki["device"]
    config = agent_toml(
        tmp_path / "agent.toml",
        tls_broker.port,
        {"ca_file": pki["other"], "cert_file": cert, "key_file": key},
    )
    checks, certs = broker_checks(config)
    tls = by_name(checks)["tls"]
    assert tls.status is Status.FAIL and "mqtt" not in by_name(checks)
    assert tls.detail.startswith("TLS handshake failed: ")  # OpenSSL's words, then ours:
    assert f"not signed by the CA in {pki['other']}" in tls.detail
    assert "it presented CN=127.0.0.1 issued by CN=fleet-ca" in tls.detail
    assert certs[-1][0] == "broker certificate"  # still known, for the clock check


def test_tls_broker_refuses_a_device_without_certificate(
    tmp_path: Path, tls_broker: Broker, pki
) -> None:
    config = agent_toml(tmp_path / "agent.toml", tls_broker.port, {"ca_file": pki["ca"].cert})
    got = by_name(broker_checks(config)[0])
    assert got["tls"].status is Status.OK  # the broker's side is fine...
    assert got["mqtt"].status is Status.FAIL  # ...but it turns this device away
    assert "wants a client certificate and none is configured" in got["mqtt"].detail


def test_short_lived_broker_certificate_warns(tmp_path: Path, pki) -> None:
    cert, key = pki["short"]
    broker = start_broker(tmp_path / "broker", TlsFiles(pki["ca"].cert, cert, key))
    try:
        dev_cert, dev_key = pki["device"]
        config = agent_toml(
            tmp_path / "agent.toml",
            broker.port,
            {"ca_file": pki["ca"].cert, "cert_file": dev_cert, "key_file": dev_key},
        )
        tls = by_name(broker_checks(config)[0])["tls"]
    finally:
        broker.stop()
    assert tls.status is Status.WARN and tls.detail.startswith("expires soon:")


def test_plain_tcp_broker_warns_about_tls(tmp_path: Path) -> None:
    broker = start_broker(tmp_path / "broker", None)
    try:
        got = by_name(broker_checks(agent_toml(tmp_path / "a.toml", broker.port, None))[0])
    finally:
        broker.stop()
    assert got["tcp"].status is Status.OK and got["mqtt"].status is Status.OK
    assert got["tls"].status is Status.WARN and "neither encrypted" in got["tls"].detail


def test_closed_port_fails_fast(tmp_path: Path) -> None:
    config = agent_toml(tmp_path / "agent.toml", free_port(), None)
    started = time.monotonic()
    got = by_name(broker_checks(config, timeout=2.0)[0])
    assert time.monotonic() - started < 2.0
    assert got["tcp"].status is Status.FAIL and "refused" in got["tcp"].detail.lower()
    assert "tls" not in got


def test_silent_port_times_out_within_the_timeout(tmp_path: Path, pki) -> None:
    with socket.socket() as silent:  # accepts TCP (backlog), never speaks TLS
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        config = agent_toml(
            tmp_path / "agent.toml", silent.getsockname()[1], {"ca_file": pki["ca"].cert}
        )
        started = time.monotonic()
        got = by_name(broker_checks(config, timeout=0.5)[0])
        elapsed = time.monotonic() - started
    assert elapsed < 2.0
    assert got["tcp"].status is Status.OK
    assert got["tls"].status is Status.FAIL and "no TLS answer within 0.5 s" in got["tls"].detail


def test_unroutable_address_fails_within_the_timeout(tmp_path: Path) -> None:
    config = agent_toml(tmp_path / "agent.toml", 8883, None, host="192.0.2.1")  # TEST-NET-1
    started = time.monotonic()
    tcp = by_name(broker_checks(config, timeout=1.0)[0])["tcp"]
    assert time.monotonic() - started < 2.0 and tcp.status is Status.FAIL


def test_bad_config_is_one_failed_check(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[device]\nid = "cam a"\n[mqtt]\nhost = "x"\n')
    (check,) = broker_checks(config)[0]
    assert check.status is Status.FAIL and f"{config}:2" in check.detail


def test_cli_doctor_with_config(tmp_path: Path, tls_broker: Broker, pki, capsys) -> None:
    cert, key = pki["device"]
    config = agent_toml(
        tmp_path / "agent.toml",
        tls_broker.port,
        {"ca_file": pki["ca"].cert, "cert_file": cert, "key_file": key},
    )
    assert cli_main(["doctor", "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    broker = {c["name"]: c["status"] for c in report["checks"] if c["section"] == "broker"}
    assert broker == dict.fromkeys(["config", "client-certificate", "tcp", "tls", "mqtt"], "ok")
    config.write_text(config.read_text().replace(str(tls_broker.port), str(free_port())))
    assert cli_main(["doctor", "--config", str(config)]) == 1
    assert "FAIL" in capsys.readouterr().out


# --- clock --------------------------------------------------------------------------


def cert(days_from_now: tuple[int, int]) -> CertInfo:
    now = datetime.now(timezone.utc)
    return CertInfo(
        "CN=b",
        "CN=ca",
        now + timedelta(days=days_from_now[0]),
        now + timedelta(days=days_from_now[1]),
    )


def test_clock_rules(tmp_path: Path) -> None:
    host = Host(tmp_path)
    epoch = datetime(1970, 1, 1, 0, 5, tzinfo=timezone.utc)
    check = clock_check(host, [], epoch)
    assert check.status is Status.FAIL and "1970-01-01" in check.detail and "NTP" in check.detail
    assert clock_check(host, [("broker certificate", cert((1, 30)))]).status is Status.FAIL
    expired = clock_check(host, [("client certificate", cert((-30, -1)))])
    assert expired.status is Status.FAIL and "client certificate expired" in expired.detail
    write(tmp_path, "run/systemd/timesync/synchronized", "")
    fine = clock_check(host, [("broker certificate", cert((-1, 30)))])
    assert fine.status is Status.OK and "NTP synchronised" in fine.detail


def test_connect_packet_is_mqtt5() -> None:
    packet = connect_packet("", "cam-a", None)
    assert packet[0] == 0x10 and packet[2:8] == b"\x00\x04MQTT" and packet[8] == 5
    assert packet[9] == 0x82  # user name, clean start
    assert packet[1] == len(packet) - 2
