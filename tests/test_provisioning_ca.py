"""The fleet CA (files, modes, leaf certificates, CRL), the controller's CSR checks, the
claim-token store (single use, expiry, hashes only, retries) and the `edge-fleet` commands."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.config import SerialSinkSection, SerialSourceSection
from agent.serial_io import SerialSinkConfig, SerialSourceConfig
from fleet.ca import CAError, FleetCA
from fleet.cli import main as fleet_main
from fleet.enrol import check_csr, enrol_db, key_fingerprint, revoke_device
from fleet.enrol_store import EnrolDenied, EnrolStore
from fleet.home import FleetHome
from fleet.registry import Registry
from fleet.rollout import select_devices
from provisioning.identity import generate_key, make_csr


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def home(tmp_path: Path) -> FleetHome:
    return FleetHome(tmp_path / "home")


@pytest.fixture
def ca(home: FleetHome) -> FleetCA:
    return FleetCA.init(home)


def test_ca_init_writes_key_cert_and_crl_once(home: FleetHome, ca: FleetCA) -> None:
    assert mode(home.ca_dir / "ca.key") == 0o600 and mode(home.ca_dir) == 0o700
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.cert.public_key(), ec.EllipticCurvePublicKey)
    assert ca.cert.not_valid_after_utc - ca.cert.not_valid_before_utc > dt.timedelta(days=3000)
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(ca.cert.public_key()) and len(crl) == 0  # type: ignore[arg-type]
    with pytest.raises(CAError, match="already exists"):
        FleetCA.init(home)
    assert FleetCA.load(home).cert == ca.cert


def test_load_without_ca_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(CAError, match="edge-fleet ca init"):
        FleetCA.load(FleetHome(tmp_path / "empty"))


def test_leaf_certificates(ca: FleetCA, tmp_path: Path) -> None:
    cert_path, key_path = ca.issue_keypair(
        "broker.lan", tmp_path, usage="server", days=30, dns=["broker.lan"], ips=["10.0.0.2"],
        stem="server",
    )  # fmt: skip
    assert mode(key_path) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    cert.verify_directly_issued_by(ca.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.lan"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    with pytest.raises(CAError, match="exists"):
        ca.issue_keypair("broker.lan", tmp_path, usage="server", days=1, dns=["x"], stem="server")
    with pytest.raises(CAError, match="not an IP"):
        ca.issue_keypair("b", tmp_path, usage="server", days=1, ips=["nope"], stem="s2")
    long = ca.sign(generate_key().public_key(), "cam-1", usage="client", days=100_000)
    assert long.not_valid_after_utc <= ca.cert.not_valid_after_utc


def _csr_with(key: object, cn: str, extra: bool = False) -> str:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if extra:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x"))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(attrs))
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_check_csr() -> None:
    assert check_csr(make_csr(generate_key(), "cam-1").decode(), "cam-1")
    cases = [
        (make_csr(generate_key(), "cam-2").decode(), "wrong_device_id"),
        (_csr_with(ec.generate_private_key(ec.SECP384R1()), "cam-1"), "bad_csr"),
        (_csr_with(rsa.generate_private_key(65537, 2048), "cam-1"), "bad_csr"),
        (_csr_with(generate_key(), "cam-1", extra=True), "bad_csr"),
        (
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "bad_csr",
        ),
        (None, "bad_request"),
    ]
    for pem, code in cases:
        with pytest.raises(EnrolDenied) as info:
            check_csr(pem, "cam-1")
        assert info.value.code == code, (pem, info.value)


def _enrol(store: EnrolStore, ca: FleetCA, token: str, device: str, key: object = None) -> bytes:
    private = key or generate_key()
    public = private.public_key()  # type: ignore[attr-defined]
    return store.enrol(
        token, device, key_fingerprint(public), lambda: ca.sign(public, device, usage="client")
    )


def test_tokens_are_single_use_expire_and_are_stored_hashed(home: FleetHome, ca: FleetCA) -> None:
    with enrol_db(home) as store:
        token, spare = store.create_claims(2, dt.timedelta(hours=1))
        late = store.create_claims(1, dt.timedelta(seconds=-1))[0]
        key = generate_key()
        first = _enrol(store, ca, token, "cam-1", key)
        assert _enrol(store, ca, token, "cam-1", key) == first  # a lost reply, asked again
        with pytest.raises(EnrolDenied) as used:
            _enrol(store, ca, token, "cam-2")
        assert used.value.code == "token_used" and "cam-1" in used.value.message
        with pytest.raises(EnrolDenied) as expired:
            _enrol(store, ca, late, "cam-3")
        assert expired.value.code == "token_expired"
        with pytest.raises(EnrolDenied) as unknown:
            _enrol(store, ca, "claim_nope", "cam-4")
        assert unknown.value.code == "bad_token"
        with pytest.raises(EnrolDenied) as taken:
            _enrol(store, ca, spare, "cam-1")
        assert taken.value.code == "device_exists"
    db = (home.root / "enrol.db").read_bytes()
    assert token.encode() not in db and spare.encode() not in db
    assert mode(home.root / "enrol.db") == 0o600


def test_a_failed_signing_spends_nothing(home: FleetHome, ca: FleetCA) -> None:
    def broken() -> x509.Certificate:
        raise RuntimeError("HSM unplugged")

    with enrol_db(home) as store:
        token = store.create_claims(1, dt.timedelta(hours=1))[0]
        with pytest.raises(RuntimeError):
            store.enrol(token, "cam-1", "fp", broken)
        assert store.device("cam-1") is None
        _enrol(store, ca, token, "cam-1")
        assert store.device("cam-1") is not None


def test_revoke_lists_every_certificate_in_the_crl_and_stops_renewals(
    home: FleetHome, ca: FleetCA
) -> None:
    with enrol_db(home) as store:
        token = store.create_claims(1, dt.timedelta(hours=1))[0]
        first = x509.load_pem_x509_certificate(_enrol(store, ca, token, "cam-1"))
        public = generate_key().public_key()
        second = x509.load_pem_x509_certificate(
            store.renew("cam-1", lambda: ca.sign(public, "cam-1", usage="client"))
        )
        with pytest.raises(EnrolDenied) as unknown:
            store.renew("cam-9", lambda: ca.sign(public, "cam-9", usage="client"))
        assert unknown.value.code == "unknown_device"
    count, path = revoke_device(home, "cam-1")
    assert count == 2
    crl = x509.load_pem_x509_crl(Path(path).read_bytes())
    for cert in (first, second):
        assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    with enrol_db(home) as store, pytest.raises(EnrolDenied) as refused:
        store.renew("cam-1", lambda: ca.sign(public, "cam-1", usage="client"))
    assert refused.value.code == "device_revoked"


def test_fleet_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "h"
    assert fleet_main(["claim", "create", "--home", str(home)]) == 1  # no CA yet
    assert "edge-fleet ca init" in capsys.readouterr().err
    assert fleet_main(["ca", "init", "--home", str(home)]) == 0
    assert fleet_main(["ca", "init", "--home", str(home)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert fleet_main(["ca", "issue-server", "--home", str(home), "--ip", "127.0.0.1"]) == 0
    assert fleet_main(["ca", "issue-client", "--home", str(home), "claim"]) == 0
    assert (home / "ca" / "server.pem").exists() and (home / "ca" / "claim.key").exists()
    capsys.readouterr()
    assert (
        fleet_main(["claim", "create", "--home", str(home), "--count", "3", "--expires", "2h"]) == 0
    )
    tokens = capsys.readouterr().out.split()
    assert (
        len(tokens) == 3 and len(set(tokens)) == 3 and all(t.startswith("claim_") for t in tokens)
    )
    assert fleet_main(["claim", "create", "--home", str(home), "--expires", "later"]) == 2
    assert fleet_main(["revoke", "--home", str(home), "cam-none"]) == 1
    assert "not enrolled" in capsys.readouterr().err
    assert fleet_main(["ca", "crl", "--home", str(home)]) == 0


def test_revoke_marks_the_device_in_the_registry(
    home: FleetHome, ca: FleetCA, capsys: pytest.CaptureFixture[str]
) -> None:
    with enrol_db(home) as store:
        token = store.create_claims(1, dt.timedelta(hours=1))[0]
        _enrol(store, ca, token, "cam-1")
    with Registry(home.registry) as reg:
        reg.update_status("cam-1", {"status": "online"})
        reg.update_status("cam-2", {"status": "online"})
    assert fleet_main(["revoke", "--home", str(home.root), "cam-1"]) == 0
    with Registry(home.registry) as reg:
        revoked = {d.id: d.revoked for d in reg.devices()}
        assert revoked == {"cam-1": True, "cam-2": False}
        assert [d.id for d in select_devices(reg, "all")] == ["cam-2"]
    refused = fleet_main(["deploy", "a" * 64, "--device", "cam-1", "--home", str(home.root)])
    assert refused == 1 and "revoked device(s) cam-1" in capsys.readouterr().err


def test_serial_sections_match_the_serial_io_settings() -> None:
    """The [serial] config sections carry exactly what SerialSink/SerialSource take."""
    assert set(SerialSinkSection.model_fields) == set(SerialSinkConfig.model_fields)
    assert set(SerialSourceSection.model_fields) - {"name", "kinds"} == set(
        SerialSourceConfig.model_fields
    )
    for name, field in SerialSinkSection.model_fields.items():
        assert field.default == SerialSinkConfig.model_fields[name].default, name
    for name, field in SerialSourceConfig.model_fields.items():
        assert SerialSourceSection.model_fields[name].default == field.default, name
