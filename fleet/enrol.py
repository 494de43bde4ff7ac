"""The controller's side of enrolment and renewal: `EnrolService` answers claim requests on
`enrol/<client id>/request` and renewals on `edge/<id>/renew/request`, checks tokens and CSRs,
records devices and signs with the fleet CA; `revoke_device` updates the CRL.

The wire format is in docs/provisioning.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleet.ca import DEVICE_DAYS, FleetCA
from fleet.enrol_store import EnrolDenied, EnrolStore
from fleet.home import FleetHome
from fleet.mqtt import FleetClient, Message
from provisioning.identity import IdentityError, check_device_id, common_name

log = logging.getLogger(__name__)

ENROL_REQUESTS = "enrol/+/request"
RENEW_REQUESTS = "edge/+/renew/request"
MAX_REQUEST_BYTES = 16 * 1024


def enrol_db(home: FleetHome) -> EnrolStore:
    return EnrolStore(home.root / "enrol.db")


def key_fingerprint(public: ec.EllipticCurvePublicKey) -> str:
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def check_csr(pem: object, device_id: str) -> x509.CertificateSigningRequest:
    """The CSR when it is well formed, self-signed, EC P-256 and for `device_id` only."""
    if not isinstance(pem, str) or not pem.strip():
        raise EnrolDenied("bad_request", "the request has no csr (PEM text)")
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError as exc:
        raise EnrolDenied("bad_csr", f"the csr is not a PEM certificate request: {exc}") from None
    if not csr.is_signature_valid:
        raise EnrolDenied("bad_csr", "the csr's signature does not match its key")
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(
        public.curve, ec.SECP256R1
    ):
        raise EnrolDenied("bad_csr", "the csr's key must be EC P-256")
    cn = common_name(csr.subject)
    if cn is None or len(csr.subject) != 1:
        raise EnrolDenied("bad_csr", "the csr's subject must be exactly one CN (the device id)")
    if cn != device_id:
        raise EnrolDenied(
            "wrong_device_id", f"the csr is for {cn!r}, the request for {device_id!r}"
        )
    return csr


class EnrolService:
    """Answers enrolment and renewal requests through `client` until `stop()`."""

    def __init__(
        self, client: FleetClient, home: FleetHome, *, cert_days: int = DEVICE_DAYS
    ) -> None:
        self.client = client
        self.home = home
        self.cert_days = cert_days
        self.ca = FleetCA.load(home)
        self.store = enrol_db(home)
        self._running = False
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def start(self) -> None:
        self._running = True
        self.client.subscribe(ENROL_REQUESTS, self._on_enrol)
        self.client.subscribe(RENEW_REQUESTS, self._on_renew)
        log.info("enrolment: answering %s and %s", ENROL_REQUESTS, RENEW_REQUESTS)

    def stop(self) -> None:
        """Stop answering (the client stays connected: it belongs to the caller)."""
        with self._lock:
            self._running = False
            self.store.close()

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    # --- handlers (the FleetClient worker thread) ------------------------------------------

    def _on_enrol(self, msg: Message) -> None:
        client_id = msg.topic.split("/")[1]
        self._answer(msg, f"enrol/{client_id}/reply", self._enrol)

    def _on_renew(self, msg: Message) -> None:
        device_id = msg.topic.split("/")[1]
        self._answer(
            msg, f"edge/{device_id}/renew/reply", lambda body: self._renew(device_id, body)
        )

    def _answer(
        self,
        msg: Message,
        reply_topic: str,
        work: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> None:
        with self._lock:
            if not self._running:
                return
            try:
                if msg.response_topic not in (None, reply_topic):
                    raise EnrolDenied("bad_request", f"the response topic must be {reply_topic}")
                if len(msg.payload) > MAX_REQUEST_BYTES:
                    raise EnrolDenied("bad_request", "the request is too large")
                try:
                    body = json.loads(msg.payload)
                except (ValueError, UnicodeDecodeError):
                    raise EnrolDenied("bad_request", "the request is not JSON") from None
                if not isinstance(body, dict):
                    raise EnrolDenied("bad_request", "the request must be a JSON object")
                reply = {"ok": True, **work(body)}
                self._count("issued")
            except EnrolDenied as exc:
                log.warning("%s refused: %s (%s)", msg.topic, exc.message, exc.code)
                self._count(exc.code)
                reply = {"ok": False, "error": exc.code, "message": exc.message}
            except Exception as exc:  # a bug: answer, never kill the worker
                log.exception("%s: request failed", msg.topic)
                reply = {"ok": False, "error": "internal", "message": str(exc)}
        self.client.publish(
            reply_topic, json.dumps(reply), correlation_data=msg.correlation_data, wait=False
        )

    def _enrol(self, body: dict[str, Any]) -> dict[str, Any]:
        device_id = body.get("device_id")
        token = body.get("token")
        if not isinstance(device_id, str) or not isinstance(token, str) or not token:
            raise EnrolDenied("bad_request", "the request needs device_id and token (strings)")
        try:
            check_device_id(device_id)
        except IdentityError as exc:
            raise EnrolDenied("bad_device_id", str(exc)) from None
        csr = check_csr(body.get("csr"), device_id)
        public = csr.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        pem = self.store.enrol(
            token,
            device_id,
            key_fingerprint(public),
            lambda: self.ca.sign(public, device_id, usage="client", days=self.cert_days),
        )
        log.info("enrolled device %s", device_id)
        return self._issued(device_id, pem)

    def _renew(self, device_id: str, body: dict[str, Any]) -> dict[str, Any]:
        csr = check_csr(body.get("csr"), device_id)
        public = csr.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        pem = self.store.renew(
            device_id,
            lambda: self.ca.sign(public, device_id, usage="client", days=self.cert_days),
        )
        log.info("renewed the certificate of %s", device_id)
        return self._issued(device_id, pem)

    def _issued(self, device_id: str, pem: bytes) -> dict[str, Any]:
        cert = x509.load_pem_x509_certificate(pem)
        trust: dict[str, str] = {}
        if self.home.signing_pub.is_file():
            trust["fleet.pub"] = self.home.signing_pub.read_text()
        return {
            "device_id": device_id,
            "certificate": pem.decode(),
            "ca": self.ca.cert_pem().decode(),
            "trust": trust,
            "not_after": cert.not_valid_after_utc.isoformat(),
        }


def revoke_device(home: FleetHome, device_id: str) -> tuple[int, str]:
    """Revoke the device (no more renewals) and its certificates; returns (count, CRL path)."""
    ca = FleetCA.load(home)
    with enrol_db(home) as store:
        count = store.revoke(device_id)
        path = ca.write_crl(store.revoked())
    return count, str(path)


def refresh_crl(home: FleetHome) -> str:
    """Write the CRL again (before its next update is due)."""
    ca = FleetCA.load(home)
    with enrol_db(home) as store:
        return str(ca.write_crl(store.revoked()))
