"""Device identity on disk: the EC P-256 key, its CSR, the certificate and CA files, the
device-id rules, and atomic 0600 writes; shared by the device and the fleet CA.

Errors: `ProvisioningError` (an `EdgeAgentError`) and its children, see below.

    ProvisioningError        root of everything provisioning raises
    ├── IdentityError        a key, CSR or certificate file is missing, unreadable or wrong
    ├── EnrolRefused         the controller said no (its reason code and message)
    └── EnrolLinkError       the broker could not be reached, refused us, or did not answer
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.atomic import write_atomically
from runtimes.errors import EdgeAgentError

DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# Certificate CNs with a role in the broker ACL: never a device's.
RESERVED_NAMES = frozenset({"claim", "fleet-controller"})


class ProvisioningError(EdgeAgentError):
    """Root of the provisioning errors."""


class IdentityError(ProvisioningError):
    """A key, CSR or certificate is missing, unreadable, of the wrong kind or for another id."""


class EnrolRefused(ProvisioningError):
    """The controller refused the request; `code` says why (bad_token, token_used, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"enrolment refused ({code}): {message}")
        self.code = code


class EnrolLinkError(ProvisioningError):
    """The broker was unreachable, refused the connection, or no reply came in time."""


def check_device_id(device_id: str) -> str:
    """The id itself when it is usable as a topic level and certificate CN; else IdentityError."""
    if not re.match(DEVICE_ID_PATTERN, device_id):
        raise IdentityError(
            f"device id {device_id!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if device_id in RESERVED_NAMES:
        raise IdentityError(f"device id {device_id!r} is reserved for the broker ACL")
    return device_id


@dataclass(frozen=True)
class IdentityPaths:
    """Where a device keeps its identity under its state directory."""

    state_dir: Path

    @property
    def dir(self) -> Path:
        return self.state_dir / "identity"

    @property
    def key(self) -> Path:
        return self.dir / "device.key"

    @property
    def cert(self) -> Path:
        return self.dir / "device.pem"

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def trust_dir(self) -> Path:
        return self.state_dir / "trust"


def pending_key_path(key_file: Path) -> Path:
    """The key of a request in flight: kept until its certificate is in place."""
    return key_file.with_name(key_file.name + ".pending")


# --- files ---------------------------------------------------------------------------------


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` so that a crash leaves the old file or the new one, never half;
    secrets by default (0600, a new parent directory 0700)."""
    write_atomically(path, data, mode=mode, dir_mode=0o700)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise IdentityError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None


# --- keys, CSRs, certificates --------------------------------------------------------------


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    data = _read(path, "key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise IdentityError(f"{path}: expected an EC P-256 key")
    return key


def load_cert(path: Path, what: str = "certificate") -> x509.Certificate:
    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise IdentityError(f"{what} {path} is not a PEM certificate: {exc}") from None


def parse_cert(pem: bytes | str, what: str = "certificate") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
    except ValueError as exc:
        raise IdentityError(f"{what} is not a PEM certificate: {exc}") from None


def make_csr(key: ec.EllipticCurvePrivateKey, device_id: str) -> bytes:
    """A PEM CSR with CN = device id, signed by `key`."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def common_name(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attrs) != 1:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode(errors="replace")


def public_der(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> bytes:
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def cert_matches_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    public = cert.public_key()
    return isinstance(public, ec.EllipticCurvePublicKey) and public_der(public) == public_der(key)


def check_issued(
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    device_id: str,
    ca: x509.Certificate,
) -> None:
    """The certificate the controller sent is for our key and id and signed by our CA."""
    if not cert_matches_key(cert, key):
        raise IdentityError("the certificate received is not for this device's key")
    if common_name(cert.subject) != device_id:
        raise IdentityError(
            f"the certificate received is for {common_name(cert.subject)!r}, not {device_id!r}"
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise IdentityError(
            f"the certificate received is not signed by the CA we trust ({exc or 'bad signature'})"
        ) from None


def not_after(cert: x509.Certificate) -> dt.datetime:
    return cert.not_valid_after_utc


def parse_duration(text: str) -> dt.timedelta:
    """`30d`, `12h`, `90m`, `45s`, `2w` (a bare number is days)."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", text)
    if not match:
        raise ValueError(f"{text!r}: expected a duration such as 30d, 12h, 90m")
    number, unit = int(match.group(1)), match.group(2) or "d"
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[unit]
    return dt.timedelta(seconds=number * seconds)
