"""The fleet CA under `FleetHome.ca_dir`: its EC P-256 key and self-signed certificate, the
broker's server certificate, client certificates, signing device CSRs, and the CRL.

Files: `ca.key` (0600), `ca.pem`, `crl.pem` (mosquitto's `crlfile`), `server.pem`/`server.key`.
Errors are `CAError` (an `EdgeAgentError`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet.home import FleetHome
from provisioning.identity import (
    IdentityError,
    atomic_write,
    generate_key,
    key_pem,
    load_cert,
    load_key,
)
from runtimes.errors import EdgeAgentError

CA_DAYS = 3650
SERVER_DAYS = 825
CLIENT_DAYS = 365
DEVICE_DAYS = 90
CRL_DAYS = 30
CLOCK_SKEW = dt.timedelta(minutes=5)  # not_before this far back: devices with a slow clock


class CAError(EdgeAgentError):
    """The fleet CA is missing, already exists, or cannot do what was asked."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class FleetCA:
    """A loaded CA: sign with `sign_*`, publish revocations with `write_crl`."""

    dir: Path
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @staticmethod
    def paths(home: FleetHome) -> tuple[Path, Path, Path]:
        """(ca.key, ca.pem, crl.pem)."""
        return home.ca_dir / "ca.key", home.ca_dir / "ca.pem", home.ca_dir / "crl.pem"

    @classmethod
    def init(cls, home: FleetHome, *, name: str = "edge-fleet CA", days: int = CA_DAYS) -> FleetCA:
        """Make the CA key, its certificate and an empty CRL; refuses to replace a CA."""
        key_path, cert_path, crl_path = cls.paths(home)
        if key_path.exists() or cert_path.exists():
            raise CAError(
                f"a fleet CA already exists in {home.ca_dir}: replacing it would cut off every "
                "enrolled device (move it away first if that is what you want)"
            )
        home.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        home.ca_dir.mkdir(exist_ok=True, mode=0o700)
        key = generate_key()
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        atomic_write(key_path, key_pem(key), 0o600)
        atomic_write(cert_path, _pem(cert), 0o644)
        ca = cls(home.ca_dir, key, cert)
        ca.write_crl([], crl_path)
        return ca

    @classmethod
    def load(cls, home: FleetHome) -> FleetCA:
        key_path, cert_path, _crl = cls.paths(home)
        if not key_path.exists():
            raise CAError(f"no fleet CA in {home.ca_dir}: run `edge-fleet ca init` first")
        try:
            return cls(home.ca_dir, load_key(key_path), load_cert(cert_path, "CA certificate"))
        except IdentityError as exc:
            raise CAError(str(exc)) from None

    @property
    def cert_path(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def crl_path(self) -> Path:
        return self.dir / "crl.pem"

    def cert_pem(self) -> bytes:
        return _pem(self.cert)

    # --- issuing -------------------------------------------------------------------------

    def sign(
        self,
        public: ec.EllipticCurvePublicKey,
        cn: str,
        *,
        usage: str,
        days: int = DEVICE_DAYS,
        san: Iterable[x509.GeneralName] = (),
        valid_from: dt.datetime | None = None,
        valid_until: dt.datetime | None = None,
    ) -> x509.Certificate:
        """A leaf certificate for `public`; `usage` is "client" or "server"."""
        now = _now()
        start = valid_from or now - CLOCK_SKEW
        end = valid_until or now + dt.timedelta(days=days)
        end = min(end, self.cert.not_valid_after_utc)  # never outlive the CA
        eku = (
            ExtendedKeyUsageOID.SERVER_AUTH
            if usage == "server"
            else ExtendedKeyUsageOID.CLIENT_AUTH
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        names = list(san)
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue_keypair(
        self,
        cn: str,
        out_dir: Path,
        *,
        usage: str,
        days: int,
        dns: Iterable[str] = (),
        ips: Iterable[str] = (),
        force: bool = False,
        stem: str | None = None,
    ) -> tuple[Path, Path]:
        """A new key and certificate written as `<stem>.pem` / `<stem>.key` (0600)."""
        stem = stem or cn
        cert_path, key_path = out_dir / f"{stem}.pem", out_dir / f"{stem}.key"
        for path in (cert_path, key_path):
            if path.exists() and not force:
                raise CAError(f"{path} exists (use --force to replace it)")
        san: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        for ip in ips:
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(ip)))
            except ValueError:
                raise CAError(f"--ip {ip!r} is not an IP address") from None
        if usage == "server" and not san:
            raise CAError("a server certificate needs at least one --dns or --ip")
        key = generate_key()
        cert = self.sign(key.public_key(), cn, usage=usage, days=days, san=san)
        atomic_write(key_path, key_pem(key), 0o600)
        atomic_write(cert_path, _pem(cert), 0o644)
        return cert_path, key_path

    # --- revocation ----------------------------------------------------------------------

    def write_crl(
        self,
        revoked: Iterable[tuple[int, dt.datetime]],
        path: Path | None = None,
        *,
        days: int = CRL_DAYS,
    ) -> Path:
        """Write the CRL listing `(serial, revoked at)` pairs; valid for `days`."""
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - CLOCK_SKEW)
            .next_update(now + dt.timedelta(days=days))
            .add_extension(x509.CRLNumber(int(now.timestamp())), critical=False)
        )
        for serial, when in revoked:
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(when.astimezone(dt.timezone.utc))
                .build()
            )
            builder = builder.add_revoked_certificate(entry)
        crl = builder.sign(self.key, hashes.SHA256())
        out = path or self.crl_path
        atomic_write(out, crl.public_bytes(serialization.Encoding.PEM), 0o644)
        return out
