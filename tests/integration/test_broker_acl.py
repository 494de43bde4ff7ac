"""The production broker policy (systemd/mosquitto/edge.conf + edge.acl) on a real mosquitto:
each device is fenced under edge/<its CN>/, the controller sees all, claimers only enrol/,
and expired, foreign, revoked or missing client certificates are refused in the handshake.

One broker for the module (mutual TLS, a CA with a CRL); the config is the shipped file
with only its paths and port rewritten.
"""

from __future__ import annotations

import getpass
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mqtt_broker import Broker, BrokerMissing, CertAuthority, ConfigBroker, MtlsClient

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "systemd" / "mosquitto" / "edge.conf"
ACL = REPO / "systemd" / "mosquitto" / "edge.acl"
QUIET = 0.3  # after the sentinel: time for a message that should not come to show up


@dataclass(frozen=True)
class Fleet:
    broker: Broker
    ca: CertAuthority
    certs: dict[str, tuple[Path, Path]]
    foreign: tuple[Path, Path]


def render(conf_text: str, files: Path) -> Callable[[Broker], str]:
    """edge.conf with /etc/mosquitto/edge/ -> `files` and the listener on the test port."""

    def build(broker: Broker) -> str:
        text = conf_text.replace("/etc/mosquitto/edge/", f"{files}/")
        text, n = re.subn(r"(?m)^listener 8883$", f"listener {broker.port} {broker.host}", text)
        assert n == 1, "edge.conf should have exactly one `listener 8883` line"
        return text + (
            "\n# test-only: what the distribution's main mosquitto.conf sets\n"
            f"persistence_location {broker.data_dir}/\n"
            f"log_dest file {broker.log_path}\nlog_type all\n"
            f"user {getpass.getuser()}\n"
        )

    return build


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("acl")
    files = work / "etc"
    ca = CertAuthority(files, "ca")
    ca.issue("server", "127.0.0.1", server=True)
    certs = {
        cn: ca.issue(cn, cn) for cn in ("cam-a", "cam-b", "fleet-controller", "claim", "cam-rev")
    }
    certs["cam-old"] = ca.issue("cam-old", "cam-old", expired=True)
    ca.revoke(certs["cam-rev"][0])
    ca.crl(files / "crl.pem")
    other = CertAuthority(work / "other", "other-ca")
    foreign = other.issue("cam-x", "cam-a")  # claims to be cam-a, signed by someone else
    acl = files / "edge.acl"
    acl.write_bytes(ACL.read_bytes())  # the shipped file, byte for byte
    acl.chmod(0o600)
    try:
        broker = ConfigBroker(work / "broker", render(CONF.read_text(), files))
    except BrokerMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    broker.start()
    try:
        yield Fleet(broker, ca, certs, foreign)
    finally:
        broker.stop()


@pytest.fixture
def connect(fleet: Fleet) -> Iterator[Callable[..., MtlsClient]]:
    made: list[MtlsClient] = []

    def make(cn: str, client_id: str | None = None) -> MtlsClient:
        cert, key = fleet.certs[cn]
        client = MtlsClient(
            fleet.broker, ca=fleet.ca.cert, cert=cert, key=key, client_id=client_id or cn
        )
        made.append(client)
        why = client.connect()
        assert why is None, f"{cn} refused: {why}\n{fleet.broker.log_text()[-2000:]}"
        return client

    yield make
    for client in made:
        client.close()


def topics(messages: list) -> list[str]:
    return [m.topic for m in messages]


def test_device_uses_its_own_topics_and_controller_sees_all(connect) -> None:
    a = connect("cam-a")
    ctl = connect("fleet-controller")
    assert a.subscribe("edge/cam-a/cmd/#") == [1]
    assert a.subscribe("edge/cam-a/desired") == [1]
    assert ctl.subscribe("edge/#") == [1]
    for suffix in ("status", "reported", "telemetry", "events/door", "reply/42", "blob/req"):
        assert a.publish(f"edge/cam-a/{suffix}", b"x") == 0
    ctl.publish("edge/cam-a/sentinel", b"")  # the controller may write anywhere under edge/
    got = topics(ctl.received("edge/cam-a/sentinel"))
    assert got == [
        f"edge/cam-a/{s}"
        for s in ("status", "reported", "telemetry", "events/door", "reply/42", "blob/req")
    ] + ["edge/cam-a/sentinel"]
    ctl.publish("edge/cam-a/desired", b'{"revision": 1}')
    ctl.publish("edge/cam-a/cmd/reboot", b"{}")
    assert topics(a.received("edge/cam-a/cmd/reboot")) == [
        "edge/cam-a/desired",
        "edge/cam-a/cmd/reboot",
    ]


def test_device_cannot_read_another_device(connect) -> None:
    a = connect("cam-a")
    b = connect("cam-b")
    ctl = connect("fleet-controller")
    ctl.subscribe("edge/cam-b/#")
    # mosquitto's acl_file grants every SUBSCRIBE and filters on delivery; a broker that
    # refuses in the SUBACK (0x87) is as good: either way nothing of cam-b reaches A.
    for pattern in ("edge/cam-b/#", "edge/+/events/#", "#"):
        codes = a.subscribe(pattern)
        assert codes in ([1], [0x87]), codes
    b.publish("edge/cam-b/events/door", b"b's event")
    b.publish("edge/cam-b/telemetry", b"b's telemetry")
    assert topics(ctl.received("edge/cam-b/telemetry")) == [
        "edge/cam-b/events/door",
        "edge/cam-b/telemetry",
    ]  # B's messages flow...
    ctl.publish("edge/cam-a/cmd/sentinel", b"")
    got = a.received("edge/cam-a/cmd/sentinel")  # ...but A only gets its own
    time.sleep(QUIET)
    while not a.messages.empty():
        got.append(a.messages.get_nowait())
    assert got and all(m.topic == "edge/cam-a/cmd/sentinel" for m in got), topics(got)


def test_device_cannot_write_for_another_device_or_forge_its_own_orders(connect) -> None:
    a = connect("cam-a")
    b = connect("cam-b")
    ctl = connect("fleet-controller")
    assert b.subscribe("edge/cam-b/cmd/#") == [1]
    ctl.subscribe("edge/#")
    forged = [
        "edge/cam-b/cmd/reboot",  # commands to B
        "edge/cam-b/status",  # pretending to be B
        "edge/cam-b/events/door",
        "edge/cam-a/desired",  # a device reads its desired state, never writes it
        "edge/cam-a/cmd/x",
        "fleet/anything",
    ]
    codes = {topic: a.publish(topic, b"forged") for topic in forged}
    assert codes == dict.fromkeys(forged, 0x87)  # PUBACK "not authorized", and dropped
    a.publish("edge/cam-a/status", b"sentinel")
    assert topics(ctl.received("edge/cam-a/status")) == ["edge/cam-a/status"]
    ctl.publish("edge/cam-b/cmd/sentinel", b"")
    assert topics(b.received("edge/cam-b/cmd/sentinel")) == ["edge/cam-b/cmd/sentinel"]


def test_claim_certificate_reaches_only_its_enrolment_topics(connect) -> None:
    claim = connect("claim", client_id="enrol-7f3a")
    intruder = connect("claim", client_id="enrol-9bb1")  # another new device, same cert
    ctl = connect("fleet-controller", client_id="fleet-controller-1")
    ctl.subscribe("enrol/#")
    ctl.subscribe("edge/#")
    assert claim.subscribe("enrol/enrol-7f3a/#") == [1]
    for pattern in ("enrol/enrol-9bb1/#", "enrol/enrol-7f3a/#", "edge/#"):
        intruder.subscribe(pattern)  # its own, another claimer's, and the devices'
    claim.publish("enrol/enrol-7f3a/request", b'{"csr": "...", "token": "..."}')
    claim.publish("enrol/enrol-9bb1/request", b"spoofed")  # another claimer's topic
    claim.publish("edge/claim/status", b"online")  # `claim` is no device
    claim.publish("edge/cam-a/status", b"online")
    claim.publish("enrol/enrol-7f3a/sentinel", b"")
    assert topics(ctl.received("enrol/enrol-7f3a/sentinel")) == [
        "enrol/enrol-7f3a/request",
        "enrol/enrol-7f3a/sentinel",
    ]
    ctl.publish("enrol/enrol-7f3a/reply", b'{"certificate": "..."}')
    assert topics(claim.received("enrol/enrol-7f3a/reply")) == [
        "enrol/enrol-7f3a/request",  # its own messages come back: it subscribed to them
        "enrol/enrol-7f3a/sentinel",
        "enrol/enrol-7f3a/reply",
    ]
    ctl.publish("edge/cam-a/status", b"a device's status")  # claimers never see edge/
    ctl.publish("enrol/enrol-9bb1/reply", b"for the second device")
    assert topics(intruder.received("enrol/enrol-9bb1/reply")) == ["enrol/enrol-9bb1/reply"]


REFUSALS = {  # what mosquitto logs when OpenSSL turns the client away
    "expired": "certificate verify failed",
    "foreign-ca": "certificate verify failed",
    "revoked": "certificate verify failed",
    "no-certificate": "peer did not return a certificate",
}


@pytest.mark.parametrize("who", sorted(REFUSALS))
def test_bad_client_certificates_are_refused(fleet: Fleet, who: str) -> None:
    cert: Path | None
    key: Path | None
    cert, key = {
        "expired": fleet.certs["cam-old"],
        "foreign-ca": fleet.foreign,
        "revoked": fleet.certs["cam-rev"],
        "no-certificate": (None, None),
    }[who]
    client = MtlsClient(fleet.broker, ca=fleet.ca.cert, cert=cert, key=key, client_id=who)
    log_before = len(fleet.broker.log_text())
    try:
        why = client.connect(timeout=3.0)
    finally:
        client.close()
    assert why is not None, f"{who}: the broker accepted it"
    assert client.connack is None, f"{who}: got a CONNACK ({client.connack}): not refused by TLS"
    deadline = time.monotonic() + 2.0
    while REFUSALS[who] not in fleet.broker.log_text()[log_before:]:
        assert time.monotonic() < deadline, fleet.broker.log_text()[log_before:]
        time.sleep(0.02)


def test_revoked_certificate_is_otherwise_valid(fleet: Fleet) -> None:
    """So the refusal above is the CRL's doing, not a broken certificate."""
    cert = fleet.certs["cam-rev"][0]
    plain = ["openssl", "verify", "-CAfile", str(fleet.ca.cert), str(cert)]
    assert subprocess.run(plain, capture_output=True).returncode == 0
    crl = [*plain[:4], "-crl_check", "-CRLfile", str(fleet.ca.dir / "crl.pem"), str(cert)]
    assert subprocess.run(crl, capture_output=True).returncode != 0
