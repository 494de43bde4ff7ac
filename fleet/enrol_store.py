"""The enrolment state (SQLite, `<fleet home>/enrol.db`): claim tokens (only their sha256 is
kept), enrolled devices and every certificate issued, with revocations for the CRL.

Refusals are `EnrolDenied(code, message)`; the codes are the wire contract's (see
docs/provisioning.md).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from runtimes.errors import EdgeAgentError

TOKEN_PREFIX = "claim_"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS claims (
    hash TEXT PRIMARY KEY,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    note TEXT,
    used_at REAL,
    device_id TEXT,
    key_fp TEXT,
    cert_pem TEXT
);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    enrolled_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS certs (
    serial TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    issued_at REAL NOT NULL,
    not_after REAL NOT NULL,
    revoked_at REAL
);
"""


class EnrolDenied(EdgeAgentError):
    """A request the controller refuses; `code` is what goes back on the wire."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def token_hash(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


@dataclass(frozen=True)
class DeviceRecord:
    id: str
    enrolled_at: float
    revoked_at: float | None
    cert_not_after: float | None


class EnrolStore:
    """One SQLite file; every method is one transaction, safe across threads."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        path.chmod(0o600)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> EnrolStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # --- claim tokens --------------------------------------------------------------------

    def create_claims(self, count: int, ttl: dt.timedelta, note: str = "") -> list[str]:
        """`count` new single-use tokens valid for `ttl`; only their hashes are stored."""
        now = time.time()
        tokens = [TOKEN_PREFIX + secrets.token_urlsafe(24) for _ in range(count)]
        with self._tx() as db:
            db.executemany(
                "INSERT INTO claims (hash, created, expires, note) VALUES (?, ?, ?, ?)",
                [(token_hash(t), now, now + ttl.total_seconds(), note) for t in tokens],
            )
        return tokens

    def enrol(
        self,
        token: str,
        device_id: str,
        key_fp: str,
        sign: Callable[[], x509.Certificate],
    ) -> bytes:
        """Spend `token` on `device_id` and return the certificate `sign()` made (PEM).

        A retry with the same token and the same key (the first reply was lost) gets the
        same certificate again; any other second use is refused.
        """
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT expires, used_at, device_id, key_fp, cert_pem FROM claims WHERE hash = ?",
                (token_hash(token),),
            ).fetchone()
            if row is None:
                raise EnrolDenied("bad_token", "the claim token is not known to this fleet")
            expires, used_at, used_by, used_fp, cert_pem = row
            if used_at is not None:
                if used_by == device_id and used_fp == key_fp and cert_pem:
                    return str(cert_pem).encode()
                raise EnrolDenied(
                    "token_used",
                    f"the claim token was already used (by {used_by} at "
                    f"{_iso(used_at)}); ask the operator for a new one",
                )
            if expires <= now:
                raise EnrolDenied("token_expired", f"the claim token expired at {_iso(expires)}")
            dev = db.execute("SELECT revoked_at FROM devices WHERE id = ?", (device_id,)).fetchone()
            if dev is not None:
                if dev[0] is not None:
                    raise EnrolDenied("device_revoked", f"device {device_id} was revoked")
                raise EnrolDenied(
                    "device_exists",
                    f"device id {device_id} is already enrolled (revoke it or pick another id)",
                )
            cert = sign()
            pem = cert.public_bytes(serialization.Encoding.PEM)
            db.execute("INSERT INTO devices (id, enrolled_at) VALUES (?, ?)", (device_id, now))
            self._record_cert(db, device_id, cert, now)
            db.execute(
                "UPDATE claims SET used_at = ?, device_id = ?, key_fp = ?, cert_pem = ? "
                "WHERE hash = ?",
                (now, device_id, key_fp, pem.decode(), token_hash(token)),
            )
        return pem

    def renew(self, device_id: str, sign: Callable[[], x509.Certificate]) -> bytes:
        """A new certificate for an enrolled, unrevoked device (PEM)."""
        now = time.time()
        with self._tx() as db:
            dev = db.execute("SELECT revoked_at FROM devices WHERE id = ?", (device_id,)).fetchone()
            if dev is None:
                raise EnrolDenied("unknown_device", f"device {device_id} is not enrolled")
            if dev[0] is not None:
                raise EnrolDenied(
                    "device_revoked", f"device {device_id} was revoked at {_iso(dev[0])}"
                )
            cert = sign()
            self._record_cert(db, device_id, cert, now)
        return cert.public_bytes(serialization.Encoding.PEM)

    @staticmethod
    def _record_cert(
        db: sqlite3.Connection, device_id: str, cert: x509.Certificate, now: float
    ) -> None:
        db.execute(
            "INSERT INTO certs (serial, device_id, issued_at, not_after) VALUES (?, ?, ?, ?)",
            (f"{cert.serial_number:x}", device_id, now, cert.not_valid_after_utc.timestamp()),
        )

    # --- revocation ----------------------------------------------------------------------

    def revoke(self, device_id: str) -> int:
        """Mark the device and every certificate it was given revoked; returns how many."""
        now = time.time()
        with self._tx() as db:
            dev = db.execute("SELECT revoked_at FROM devices WHERE id = ?", (device_id,)).fetchone()
            if dev is None:
                raise EnrolDenied("unknown_device", f"device {device_id} is not enrolled")
            if dev[0] is None:
                db.execute("UPDATE devices SET revoked_at = ? WHERE id = ?", (now, device_id))
            cur = db.execute(
                "UPDATE certs SET revoked_at = ? WHERE device_id = ? AND revoked_at IS NULL",
                (now, device_id),
            )
            return cur.rowcount

    def revoked(self) -> list[tuple[int, dt.datetime]]:
        """(serial, revoked at) of every revoked certificate that has not expired yet."""
        rows = self._db.execute(
            "SELECT serial, revoked_at FROM certs WHERE revoked_at IS NOT NULL AND not_after > ?",
            (time.time(),),
        ).fetchall()
        return [(int(s, 16), dt.datetime.fromtimestamp(r, dt.timezone.utc)) for s, r in rows]

    def device(self, device_id: str) -> DeviceRecord | None:
        row = self._db.execute(
            "SELECT d.id, d.enrolled_at, d.revoked_at, MAX(c.not_after) FROM devices d "
            "LEFT JOIN certs c ON c.device_id = d.id WHERE d.id = ? GROUP BY d.id",
            (device_id,),
        ).fetchone()
        return DeviceRecord(*row) if row else None

    def devices(self) -> list[DeviceRecord]:
        rows = self._db.execute(
            "SELECT d.id, d.enrolled_at, d.revoked_at, MAX(c.not_after) FROM devices d "
            "LEFT JOIN certs c ON c.device_id = d.id GROUP BY d.id ORDER BY d.id"
        ).fetchall()
        return [DeviceRecord(*row) for row in rows]


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
