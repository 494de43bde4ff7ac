"""`edge-agent doctor --config`: the broker as this device sees it (TCP connect, TLS
handshake with the configured CA and client certificate, MQTT CONNECT), and the clock.

Every network step has a timeout (2 s by default); nothing here retries.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent.config import MqttConfig, TlsConfig, load_config
from agent.doctor_checks import Check, Host, Status
from runtimes.errors import ConfigError

EXPIRY_WARN_DAYS = 14
_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
}
_NOT_OUR_CA = {2, 18, 19, 20, 21}  # OpenSSL X509_V_ERR_*: unknown issuer, self-signed


@dataclass(frozen=True)
class CertInfo:
    """What the doctor shows of a certificate."""

    subject: str
    issuer: str
    not_before: datetime
    not_after: datetime

    @staticmethod
    def from_decoded(decoded: dict[str, Any]) -> CertInfo:
        """From `SSLSocket.getpeercert()` (or the same dict decoded from a file)."""

        def name(rdns: Any) -> str:
            return ", ".join(f"{_SHORT.get(k, k)}={v}" for rdn in rdns for k, v in rdn)

        def when(text: str) -> datetime:
            return datetime.fromtimestamp(ssl.cert_time_to_seconds(text), timezone.utc)

        return CertInfo(
            name(decoded.get("subject", ())),
            name(decoded.get("issuer", ())),
            when(decoded["notBefore"]),
            when(decoded["notAfter"]),
        )

    def days_left(self, now: datetime) -> int:
        return (self.not_after - now).days

    def validity(self, now: datetime) -> str:
        left = self.days_left(now)
        state = f"{left} days left" if left >= 0 else f"expired {-left} days ago"
        return f"valid until {self.not_after:%Y-%m-%d %H:%M} UTC ({state})"


def read_certificate(path: Path) -> CertInfo | None:
    """Subject, issuer and validity of a PEM file; None when it cannot be decoded.

    Uses CPython's `ssl._ssl._test_decode_cert` (no extra dependency); where an interpreter
    lacks it the doctor just leaves the certificate details out.
    """
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        return CertInfo.from_decoded(decode(str(path)))
    except (OSError, ssl.SSLError, KeyError, ValueError):
        return None


def _der_certificate(der: bytes) -> CertInfo | None:
    fd, name = tempfile.mkstemp(suffix=".pem")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(ssl.DER_cert_to_PEM_cert(der))
        return read_certificate(Path(name))
    finally:
        os.unlink(name)


def _presented_certificate(host: str, port: int, timeout: float) -> CertInfo | None:
    """The broker's certificate fetched without verifying it (to say what is wrong)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    return _der_certificate(der) if der else None


def _tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """As the agent builds it: TLS 1.2+, the broker checked against ca_file (or the system
    store), the client certificate when configured. Raises ValueError with the reason."""
    try:
        context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"mqtt.tls.ca_file {tls.ca_file} cannot be used: {_reason(exc)}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file is not None:
        try:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"mqtt.tls.cert_file/key_file {tls.cert_file} cannot be used: {_reason(exc)}"
            ) from None
    return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _verify_failure(
    exc: ssl.SSLCertVerificationError, mqtt: MqttConfig, presented: CertInfo | None
) -> str:
    tls = mqtt.tls
    code = exc.verify_code
    if code in _NOT_OUR_CA:
        where = f"the CA in {tls.ca_file}" if tls and tls.ca_file else "the system CA store"
        hint = f"the broker's certificate is not signed by {where} (wrong ca_file?)"
    elif code == 10:
        hint = "the broker's certificate has expired (or this device's clock is ahead)"
    elif code == 9:
        hint = "the broker's certificate is not valid yet: is this device's clock right?"
    elif code == 62:
        hint = f"the broker's certificate is not issued for {mqtt.host!r}"
    else:
        hint = "the broker's certificate was not accepted"
    seen = f"; it presented {presented.subject} issued by {presented.issuer}" if presented else ""
    return f"TLS handshake failed: {exc.verify_message}: {hint}{seen}"


def _handshake_failure(exc: BaseException, port: int) -> str:
    reason = _reason(exc)
    if "wrong version number" in reason or "record layer failure" in reason:
        return f"TLS handshake failed ({reason}): is {port} a plain MQTT port, not TLS?"
    if "alert" in reason:
        return f"TLS handshake failed: the broker refused this device ({reason})"
    return f"TLS handshake failed: {reason}"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _string(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def connect_packet(client_id: str, username: str | None, password: str | None) -> bytes:
    """An MQTT 5 CONNECT: clean start, keepalive 10 s, no properties, no will."""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _string(b"MQTT") + bytes([5, flags]) + (10).to_bytes(2, "big") + b"\x00"
    body += _string(client_id.encode())
    if username is not None:
        body += _string(username.encode())
    if password is not None:
        body += _string(password.encode())
    return b"\x10" + _varint(len(body)) + body


def _read_packet(stream: socket.socket, deadline: float) -> bytes | None:
    """One MQTT packet (fixed header included); None when the peer closed first."""
    buf = b""

    def need(count: int) -> bool:
        nonlocal buf
        while len(buf) < count:
            stream.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = stream.recv(4096)
            if not chunk:
                return False
            buf += chunk
        return True

    if not need(2):
        return None
    length, shift, index = 0, 0, 1
    while True:
        if not need(index + 1):
            return None
        byte = buf[index]
        length |= (byte & 0x7F) << shift
        index += 1
        if not byte & 0x80:
            break
        shift += 7
    return buf[: index + length] if need(index + length) else None


CONNACK_REASONS = {
    0x00: "success",
    0x80: "unspecified error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x8A: "banned",
    0x8C: "bad authentication method",
    0x95: "packet too large",
    0x9F: "connection rate exceeded",
}


def _refusal(mqtt: MqttConfig) -> str:
    """What a hang-up before CONNACK most likely means (TLS 1.3 checks the client late)."""
    if mqtt.tls is not None and mqtt.tls.cert_file is None:
        return "it wants a client certificate and none is configured (mqtt.tls.cert_file)"
    if mqtt.tls is not None:
        return "it refused this device's client certificate (revoked, expired, other CA?)"
    return "not an MQTT broker, or it refused this client"


def _mqtt_check(stream: socket.socket, mqtt: MqttConfig, timeout: float) -> Check:
    note = ""
    try:
        password = mqtt.resolve_password()
    except ConfigError as exc:
        password, note = None, f" (password not sent: {exc})"
    deadline = time.monotonic() + timeout
    try:
        stream.settimeout(timeout)
        stream.sendall(connect_packet("", mqtt.username, password))  # "": the broker names us
        packet = _read_packet(stream, deadline)
    except TimeoutError:
        return Check("broker", "mqtt", Status.FAIL, f"no CONNACK within {timeout:g} s{note}")
    except (OSError, ssl.SSLError) as exc:
        if isinstance(exc, ssl.SSLError):  # an alert, or the broker hung up on the session
            detail = f"the broker ended the TLS session ({_reason(exc)}): {_refusal(mqtt)}"
        else:
            detail = f"connection lost before CONNACK: {_reason(exc)}"
        return Check("broker", "mqtt", Status.FAIL, detail + note)
    if packet is None:
        detail = f"the broker closed the connection without a CONNACK: {_refusal(mqtt)}"
        return Check("broker", "mqtt", Status.FAIL, detail + note)
    if packet[0] != 0x20 or len(packet) < 4:
        return Check("broker", "mqtt", Status.FAIL, f"not a CONNACK: {packet[:8].hex()}{note}")
    offset = 1 + next(i for i in range(1, 5) if not packet[i] & 0x80)
    code = packet[offset + 1]
    name = CONNACK_REASONS.get(code, f"reason {code:#04x}")
    with contextlib.suppress(OSError):
        stream.sendall(b"\xe0\x00")  # DISCONNECT, normal
    if code:
        return Check(
            "broker", "mqtt", Status.FAIL, f"CONNACK refused: {name}{note}", {"reason": code}
        )
    return Check(
        "broker",
        "mqtt",
        Status.OK,
        f"CONNACK {name}: the broker accepts this device{note}",
        {"reason": 0},
    )


def _client_certificate_check(tls: TlsConfig, now: datetime) -> tuple[Check, CertInfo | None]:
    assert tls.cert_file is not None
    info = read_certificate(tls.cert_file)
    if info is None:
        status = Status.FAIL if not tls.cert_file.is_file() else Status.WARN
        return Check(
            "broker", "client-certificate", status, f"{tls.cert_file}: cannot be read"
        ), None
    data = {"subject": info.subject, "issuer": info.issuer, "not_after": info.not_after.isoformat()}
    detail = f"{info.subject}, issued by {info.issuer}, {info.validity(now)}"
    if now > info.not_after or now < info.not_before:
        return Check(
            "broker", "client-certificate", Status.FAIL, f"outside its validity: {detail}", data
        ), info
    if info.days_left(now) < EXPIRY_WARN_DAYS:
        return Check(
            "broker", "client-certificate", Status.WARN, f"expires soon: {detail}", data
        ), info
    return Check("broker", "client-certificate", Status.OK, detail, data), info


def broker_checks(
    config_path: Path, *, timeout: float = 2.0, now: datetime | None = None
) -> tuple[list[Check], list[tuple[str, CertInfo]]]:
    """The broker checks, and the certificates seen on the way (for the clock check)."""
    now = now or datetime.now(timezone.utc)
    certs: list[tuple[str, CertInfo]] = []
    try:
        config = load_config(config_path, check_files=False)
    except ConfigError as exc:
        return [Check("broker", "config", Status.FAIL, "; ".join(str(exc).splitlines()))], certs
    mqtt = config.mqtt
    target = f"{mqtt.host}:{mqtt.port}"
    checks = [
        Check(
            "broker",
            "config",
            Status.OK,
            f"{config_path}: device {config.device.id}, broker {target}"
            + (" over TLS" if mqtt.tls else " over plain TCP"),
        )
    ]
    if mqtt.tls is not None and mqtt.tls.cert_file is not None:
        check, info = _client_certificate_check(mqtt.tls, now)
        checks.append(check)
        if info:
            certs.append(("client certificate", info))
    started = time.monotonic()
    try:
        raw = socket.create_connection((mqtt.host, mqtt.port), timeout=timeout)
    except socket.gaierror as exc:
        checks.append(
            Check("broker", "tcp", Status.FAIL, f"cannot resolve {mqtt.host}: {exc.strerror}")
        )
        return checks, certs
    except TimeoutError:
        detail = f"no answer from {target} within {timeout:g} s (host down, firewall, wrong port?)"
        checks.append(Check("broker", "tcp", Status.FAIL, detail))
        return checks, certs
    except OSError as exc:
        checks.append(
            Check("broker", "tcp", Status.FAIL, f"cannot connect to {target}: {_reason(exc)}")
        )
        return checks, certs
    with raw:
        ms = (time.monotonic() - started) * 1000
        checks.append(Check("broker", "tcp", Status.OK, f"connected to {target} in {ms:.0f} ms"))
        if mqtt.tls is None:
            checks.append(
                Check(
                    "broker",
                    "tls",
                    Status.WARN,
                    "no [mqtt.tls]: the link is neither encrypted nor authenticated",
                )
            )
            checks.append(_mqtt_check(raw, mqtt, timeout))
            return checks, certs
        checks += _tls_checks(raw, mqtt, timeout, now, certs)
    return checks, certs


def _tls_checks(
    raw: socket.socket,
    mqtt: MqttConfig,
    timeout: float,
    now: datetime,
    certs: list[tuple[str, CertInfo]],
) -> list[Check]:
    assert mqtt.tls is not None
    try:
        context = _tls_context(mqtt.tls)
    except ValueError as exc:
        return [Check("broker", "tls", Status.FAIL, str(exc))]
    raw.settimeout(timeout)
    try:
        stream = context.wrap_socket(raw, server_hostname=mqtt.host)
    except ssl.SSLCertVerificationError as exc:
        presented = _presented_certificate(mqtt.host, mqtt.port, timeout)
        if presented:
            certs.append(("broker certificate", presented))
        return [
            Check(
                "broker",
                "tls",
                Status.FAIL,
                _verify_failure(exc, mqtt, presented),
                {"verify_code": exc.verify_code},
            )
        ]
    except TimeoutError:
        return [
            Check(
                "broker",
                "tls",
                Status.FAIL,
                f"no TLS answer within {timeout:g} s: is {mqtt.port} a TLS port?",
            )
        ]
    except (OSError, ssl.SSLError) as exc:
        return [Check("broker", "tls", Status.FAIL, _handshake_failure(exc, mqtt.port))]
    with stream:
        peer = stream.getpeercert()
        info = CertInfo.from_decoded(dict(peer)) if peer else None
        version = stream.version() or "TLS"
        if info is None:
            tls_check = Check(
                "broker", "tls", Status.WARN, f"{version}, but no broker certificate to show"
            )
        else:
            certs.append(("broker certificate", info))
            data = {
                "version": version,
                "subject": info.subject,
                "issuer": info.issuer,
                "not_before": info.not_before.isoformat(),
                "not_after": info.not_after.isoformat(),
                "days_left": info.days_left(now),
            }
            detail = (
                f"{version}, broker certificate {info.subject}, issued by {info.issuer},"
                f" {info.validity(now)}"
            )
            status = Status.WARN if info.days_left(now) < EXPIRY_WARN_DAYS else Status.OK
            tls_check = Check(
                "broker",
                "tls",
                status,
                ("expires soon: " if status is Status.WARN else "") + detail,
                data,
            )
        return [tls_check, _mqtt_check(stream, mqtt, timeout)]


def clock_check(
    host: Host, certs: list[tuple[str, CertInfo]], now: datetime | None = None
) -> Check:
    """Year >= 2024, and now within every certificate seen (TLS needs a right clock)."""
    now = now or datetime.now(timezone.utc)
    stamp = f"{now:%Y-%m-%d %H:%M:%S} UTC"
    synced = host.path("run/systemd/timesync/synchronized").exists()
    data = {"utc": now.isoformat(timespec="seconds"), "ntp_synchronized": synced or None}
    if now.year < 2024:
        return Check(
            "clock",
            "clock",
            Status.FAIL,
            f"the clock says {stamp}: certificates cannot be checked; enable NTP"
            " (timedatectl set-ntp true) or set the time",
            data,
        )
    for label, info in certs:
        if now < info.not_before:
            return Check(
                "clock",
                "clock",
                Status.FAIL,
                f"{stamp} is before the {label}'s validity starts"
                f" ({info.not_before:%Y-%m-%d %H:%M} UTC): the clock is behind",
                data,
            )
        if now > info.not_after:
            return Check(
                "clock",
                "clock",
                Status.FAIL,
                f"{stamp} is after the {label} expired ({info.not_after:%Y-%m-%d %H:%M} UTC):"
                " renew it, or the clock is ahead",
                data,
            )
    detail = stamp + ("; NTP synchronised" if synced else "")
    if certs:
        detail += f"; within the validity of the {' and the '.join(label for label, _ in certs)}"
    return Check("clock", "clock", Status.OK, detail, data)
