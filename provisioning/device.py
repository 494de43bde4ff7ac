"""The device's provisioning steps: `provision` (first boot: key, CSR, claim, certificate,
trust keys, agent.toml) and `renew` (new key and certificate before the old one expires).

Nothing is replaced half-way: the new key waits as `<key>.pending` until its certificate is
in place, so an interrupted run is finished by the next one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.atomic import fsync_dir
from agent.config import load_config
from provisioning.config_writer import render_config, write_config
from provisioning.enrol_client import BrokerAddress, RequestClient
from provisioning.identity import (
    IdentityError,
    IdentityPaths,
    ProvisioningError,
    atomic_write,
    cert_matches_key,
    check_device_id,
    check_issued,
    common_name,
    generate_key,
    key_pem,
    load_cert,
    load_key,
    make_csr,
    parse_cert,
    pending_key_path,
    public_der,
)

_TRUST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\.pub$")


@dataclass(frozen=True)
class Outcome:
    device_id: str
    cert: Path
    not_after: dt.datetime
    renewed: bool = True
    config: Path | None = None
    trust: tuple[Path, ...] = ()


def _pending_key(key_file: Path) -> ec.EllipticCurvePrivateKey:
    """The key of an unfinished request if there is one, else a new one saved as pending."""
    pending = pending_key_path(key_file)
    if pending.exists():
        return load_key(pending)
    key = generate_key()
    atomic_write(pending, key_pem(key), 0o600)
    return key


def _install(cert_file: Path, key_file: Path, cert_pem: bytes) -> None:
    """Certificate first, then the pending key over the old one (each atomic)."""
    atomic_write(cert_file, cert_pem, 0o600)
    os.replace(pending_key_path(key_file), key_file)
    fsync_dir(key_file.parent)


def _write_trust(trust_dir: Path, trust: Any) -> tuple[Path, ...]:
    if not isinstance(trust, dict):
        return ()
    written: list[Path] = []
    for name, pem in sorted(trust.items()):
        if not isinstance(name, str) or not _TRUST_NAME.match(name) or not isinstance(pem, str):
            raise IdentityError(f"the controller sent a trust key with a bad name: {name!r}")
        if "PUBLIC KEY" not in pem:
            raise IdentityError(f"trust key {name} is not a PEM public key")
        path = trust_dir / name
        atomic_write(path, pem.encode(), 0o600)
        written.append(path)
    return tuple(written)


def provision(
    *,
    broker: str,
    token: str,
    ca_file: Path,
    claim_cert: Path,
    claim_key: Path,
    device_id: str,
    state_dir: Path,
    config_out: Path,
    force: bool = False,
    timeout: float = 30.0,
) -> Outcome:
    """Enrol this device with a claim token; see docs/provisioning.md."""
    check_device_id(device_id)
    address = BrokerAddress.parse(broker)
    paths = IdentityPaths(state_dir)
    if not force:
        for existing in (paths.cert, paths.key, config_out):
            if existing.exists():
                raise ProvisioningError(
                    f"{existing} exists: this device looks provisioned already "
                    "(use --force to enrol it again)"
                )
    ca = load_cert(ca_file, "CA file")
    for path, what in ((claim_cert, "claim certificate"), (claim_key, "claim key")):
        if not path.is_file():
            raise IdentityError(f"{what} {path} does not exist (edge-fleet ca issue-client claim)")
    config_text = render_config(device_id, paths, address.host, address.port)
    key = _pending_key(paths.key)
    client_id = "claim-" + hashlib.sha256(public_der(key)).hexdigest()[:20]
    reply = RequestClient(
        address, ca=ca_file, cert=claim_cert, key=claim_key, client_id=client_id, timeout=timeout
    ).request(
        f"enrol/{client_id}/request",
        f"enrol/{client_id}/reply",
        {
            "v": 1,
            "device_id": device_id,
            "token": token.strip(),
            "csr": make_csr(key, device_id).decode(),
        },
    )
    cert = _checked_reply(reply, key, device_id, ca)
    atomic_write(paths.ca, ca_file.read_bytes(), 0o600)
    trust = _write_trust(paths.trust_dir, reply.get("trust"))
    _install(paths.cert, paths.key, reply["certificate"].encode())
    write_config(config_out, config_text, force=True)
    return Outcome(device_id, paths.cert, cert.not_valid_after_utc, config=config_out, trust=trust)


def _checked_reply(
    reply: dict[str, Any], key: ec.EllipticCurvePrivateKey, device_id: str, ca: x509.Certificate
) -> x509.Certificate:
    pem = reply.get("certificate")
    if not isinstance(pem, str):
        raise IdentityError("the controller's reply has no certificate")
    cert = parse_cert(pem, "the certificate received")
    check_issued(cert, key, device_id, ca)
    return cert


def finish_interrupted(cert_file: Path, key_file: Path) -> bool:
    """A renewal that stopped between its two renames: the pending key fits the certificate."""
    pending = pending_key_path(key_file)
    if not pending.exists() or not cert_file.exists():
        return False
    if cert_matches_key(load_cert(cert_file), load_key(pending)):
        os.replace(pending, key_file)
        fsync_dir(key_file.parent)
        return True
    return False


def renew(
    config_path: Path,
    *,
    within: dt.timedelta | None = None,
    timeout: float = 30.0,
    now: dt.datetime | None = None,
) -> Outcome:
    """Replace the device certificate and key (only when it expires within `within`)."""
    config = load_config(config_path)
    tls = config.mqtt.tls
    if tls is None or tls.cert_file is None or tls.key_file is None or tls.ca_file is None:
        raise ProvisioningError(
            f"{config_path}: [mqtt.tls] needs ca_file, cert_file and key_file to renew"
        )
    device_id = config.device.id
    finish_interrupted(tls.cert_file, tls.key_file)
    current = load_cert(tls.cert_file)
    if common_name(current.subject) != device_id:
        raise IdentityError(
            f"{tls.cert_file} is for {common_name(current.subject)!r}, not {device_id!r}"
        )
    moment = now or dt.datetime.now(dt.timezone.utc)
    expires = current.not_valid_after_utc
    if expires <= moment:
        raise IdentityError(
            f"{tls.cert_file} expired at {expires:%Y-%m-%d %H:%M}Z: the broker refuses it, so it "
            "cannot renew itself; enrol again with a new claim token (edge-agent provision --force)"
        )
    if within is not None and expires - moment > within:
        return Outcome(device_id, tls.cert_file, expires, renewed=False)
    ca = load_cert(tls.ca_file, "CA file")
    key = _pending_key(tls.key_file)
    address = BrokerAddress(config.mqtt.host, config.mqtt.port)
    reply = RequestClient(
        address,
        ca=tls.ca_file,
        cert=tls.cert_file,
        key=tls.key_file,
        client_id=f"{device_id}-renew-{secrets.token_hex(4)}",
        timeout=timeout,
    ).request(
        f"edge/{device_id}/renew/request",
        f"edge/{device_id}/renew/reply",
        {"v": 1, "csr": make_csr(key, device_id).decode()},
    )
    cert = _checked_reply(reply, key, device_id, ca)
    trust = _write_trust(config.device.state_dir / "trust", reply.get("trust"))
    _install(tls.cert_file, tls.key_file, reply["certificate"].encode())
    return Outcome(device_id, tls.cert_file, cert.not_valid_after_utc, trust=trust)
