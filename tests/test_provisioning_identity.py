"""Device identity on disk (atomic 0600 writes, keys, CSRs, checks of what comes back), the
agent.toml writer, and the renew steps that need no broker."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.config import load_config
from fleet.ca import FleetCA
from fleet.home import FleetHome
from provisioning.config_writer import render_config, write_config
from provisioning.device import finish_interrupted, renew
from provisioning.identity import (
    IdentityError,
    IdentityPaths,
    ProvisioningError,
    atomic_write,
    check_device_id,
    check_issued,
    generate_key,
    key_pem,
    load_key,
    make_csr,
    parse_duration,
    pending_key_path,
)
from runtimes.errors import ConfigError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_is_0600_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "device.key"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two" and mode(target) == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["device.key"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "device.pem"
    atomic_write(target, b"old")

    def broken(_src: object, _dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["device.pem"]


@pytest.mark.parametrize("good", ["cam-1", "a", "Cam_2.yard", "x" * 64])
def test_good_device_ids(good: str) -> None:
    assert check_device_id(good) == good


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("cam/1", "use 1-64"),
        ("cam+", "use 1-64"),
        ("#", "use 1-64"),
        ("-cam", "use 1-64"),
        ("x" * 65, "use 1-64"),
        ("claim", "reserved"),
        ("fleet-controller", "reserved"),
    ],
)
def test_bad_device_ids(bad: str, why: str) -> None:
    with pytest.raises(IdentityError, match=why):
        check_device_id(bad)


def test_parse_duration() -> None:
    assert parse_duration("30d") == dt.timedelta(days=30)
    assert parse_duration("12h") == dt.timedelta(hours=12)
    assert parse_duration("90m") == dt.timedelta(minutes=90)
    assert parse_duration("2w") == dt.timedelta(days=14)
    assert parse_duration("7") == dt.timedelta(days=7)
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration("soon")


def test_load_key_wants_p256(tmp_path: Path) -> None:
    good = tmp_path / "good.key"
    good.write_bytes(key_pem(generate_key()))
    assert isinstance(load_key(good), ec.EllipticCurvePrivateKey)
    p384 = ec.generate_private_key(ec.SECP384R1())
    other = tmp_path / "p384.key"
    other.write_bytes(
        p384.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(IdentityError, match="P-256"):
        load_key(other)
    (tmp_path / "junk.key").write_text("not a key")
    with pytest.raises(IdentityError, match="not an unencrypted PEM"):
        load_key(tmp_path / "junk.key")
    with pytest.raises(IdentityError, match="does not exist"):
        load_key(tmp_path / "missing.key")


@pytest.fixture
def ca(tmp_path: Path) -> FleetCA:
    return FleetCA.init(FleetHome(tmp_path / "home"))


def test_check_issued_catches_a_wrong_certificate(ca: FleetCA, tmp_path: Path) -> None:
    key = generate_key()
    mine = ca.sign(key.public_key(), "cam-1", usage="client")
    check_issued(mine, key, "cam-1", ca.cert)
    other_key = generate_key()
    with pytest.raises(IdentityError, match="not for this device's key"):
        check_issued(
            ca.sign(other_key.public_key(), "cam-1", usage="client"), key, "cam-1", ca.cert
        )
    with pytest.raises(IdentityError, match="is for 'cam-2'"):
        check_issued(ca.sign(key.public_key(), "cam-2", usage="client"), key, "cam-1", ca.cert)
    stranger = FleetCA.init(FleetHome(tmp_path / "stranger"))
    with pytest.raises(IdentityError, match="not signed by the CA we trust"):
        check_issued(
            stranger.sign(key.public_key(), "cam-1", usage="client"), key, "cam-1", ca.cert
        )
    assert b"CERTIFICATE REQUEST" in make_csr(key, "cam-1")


def test_config_writer_validates_and_never_overwrites(tmp_path: Path) -> None:
    paths = IdentityPaths(tmp_path / "state")
    out = tmp_path / "etc" / "agent.toml"
    write_config(out, render_config("cam-1", paths, "broker.lan", 8883), check_files=False)
    config = load_config(out, check_files=False)
    assert config.device.id == "cam-1" and config.device.state_dir == paths.state_dir
    assert config.mqtt.tls is not None and config.mqtt.tls.cert_file == paths.cert
    assert mode(out) == 0o640
    with pytest.raises(ProvisioningError, match="--force"):
        write_config(out, render_config("cam-2", paths, "b", 8883), check_files=False)
    assert load_config(out, check_files=False).device.id == "cam-1"
    with pytest.raises(ConfigError, match=r"device\.id"):
        write_config(out, render_config("bad/id", paths, "b", 8883), force=True, check_files=False)
    assert load_config(out, check_files=False).device.id == "cam-1"
    assert sorted(p.name for p in out.parent.iterdir()) == ["agent.toml"]


def _device(ca: FleetCA, tmp_path: Path, **sign: object) -> tuple[Path, IdentityPaths]:
    paths = IdentityPaths(tmp_path / "state")
    key = generate_key()
    cert = ca.sign(key.public_key(), "cam-1", usage="client", **sign)  # type: ignore[arg-type]
    atomic_write(paths.key, key_pem(key))
    atomic_write(paths.cert, cert.public_bytes(serialization.Encoding.PEM))
    atomic_write(paths.ca, ca.cert_pem())
    config = tmp_path / "agent.toml"
    write_config(config, render_config("cam-1", paths, "127.0.0.1", 1))
    return config, paths


def test_renew_not_due_and_expired_need_no_broker(ca: FleetCA, tmp_path: Path) -> None:
    config, paths = _device(ca, tmp_path, days=90)
    outcome = renew(config, within=dt.timedelta(days=30))
    assert not outcome.renewed and not pending_key_path(paths.key).exists()
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=91)
    with pytest.raises(IdentityError, match=r"expired .* provision --force"):
        renew(config, now=later)


def test_an_interrupted_renewal_is_finished(ca: FleetCA, tmp_path: Path) -> None:
    _config, paths = _device(ca, tmp_path)
    new_key = generate_key()
    atomic_write(pending_key_path(paths.key), key_pem(new_key))
    assert not finish_interrupted(paths.cert, paths.key)  # pending key does not fit the cert
    new_cert = ca.sign(new_key.public_key(), "cam-1", usage="client")
    atomic_write(paths.cert, new_cert.public_bytes(serialization.Encoding.PEM))  # crash here
    assert finish_interrupted(paths.cert, paths.key)
    assert not pending_key_path(paths.key).exists()
    check_issued(new_cert, load_key(paths.key), "cam-1", ca.cert)
