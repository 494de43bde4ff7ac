"""Enrolment end to end on the shipped broker policy (systemd/mosquitto, TLS + CRL + ACL):
`edge-agent provision` and `renew` run as subprocesses against a real `EnrolService`, the
device then connects with its own certificate and is fenced; revoke and refusals."""

from __future__ import annotations

import datetime as dt
import json
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.config import load_config
from agent.mqtt_link import LinkState, MqttLink
from agent.outbox import Outbox
from fleet.ca import FleetCA
from fleet.enrol import EnrolService, enrol_db, revoke_device
from fleet.home import FleetHome
from fleet.mqtt import BrokerSettings, FleetClient, Message
from models.signing import generate_key as signing_key
from models.signing import save_public_key
from provisioning.enrol_client import BrokerAddress, RequestClient
from provisioning.identity import EnrolRefused, generate_key, key_pem, make_csr
from tests.integration.test_broker_acl import CONF, render
from tests.mqtt_broker import BrokerMissing, ConfigBroker, MtlsClient, free_port

EDGE_AGENT = Path(sys.executable).parent / "edge-agent"
REPO = Path(__file__).resolve().parents[2]
ACL = REPO / "systemd" / "mosquitto" / "edge.acl"


@dataclass
class Fleet:
    home: FleetHome
    ca: FleetCA
    broker: ConfigBroker
    client: FleetClient
    service: EnrolService

    @property
    def url(self) -> str:
        return f"mqtts://{self.broker.host}:{self.broker.port}"

    def token(self, ttl: dt.timedelta = dt.timedelta(hours=1)) -> str:
        with enrol_db(self.home) as store:
            return store.create_claims(1, ttl)[0]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("enrol")
    home = FleetHome(work / "fleet-home").ensure()
    ca = FleetCA.init(home)
    ca.issue_keypair(
        "127.0.0.1", ca.dir, usage="server", days=2, dns=["localhost"], ips=["127.0.0.1"],
        stem="server",
    )  # fmt: skip
    ca.issue_keypair("fleet-controller", ca.dir, usage="client", days=2)
    ca.issue_keypair("claim", ca.dir, usage="client", days=2)
    save_public_key(home.signing_pub, signing_key().public_key())
    (ca.dir / "edge.acl").write_bytes(ACL.read_bytes())
    (ca.dir / "edge.acl").chmod(0o600)
    try:
        broker = ConfigBroker(work / "broker", render(CONF.read_text(), ca.dir))
    except BrokerMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    broker.start()
    settings = BrokerSettings(
        broker.host,
        broker.port,
        tls=True,
        ca_file=ca.cert_path,
        cert_file=ca.dir / "fleet-controller.pem",
        key_file=ca.dir / "fleet-controller.key",
    )
    client = FleetClient(settings, "fleet-enrol-test").connect()
    service = EnrolService(client, home, cert_days=30)
    service.start()
    made = Fleet(home, ca, broker, client, service)
    try:
        yield made
    finally:
        made.service.stop()  # the one running now (a test may have replaced it)
        client.close()
        broker.stop()


def provision(
    fleet: Fleet, tmp: Path, device: str, token: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    args = [
        str(EDGE_AGENT), "provision", "--broker", fleet.url, "--claim-token", token,
        "--ca", str(fleet.ca.cert_path),
        "--claim-cert", str(fleet.ca.dir / "claim.pem"),
        "--claim-key", str(fleet.ca.dir / "claim.key"),
        "--device-id", device, "--state-dir", str(tmp / "state"),
        "--config", str(tmp / "agent.toml"), "--timeout", "10", *extra,
    ]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EDGE_AGENT), *args], capture_output=True, text=True, timeout=60)


def mtls(fleet: Fleet, cert: Path, key: Path, client_id: str, ca: Path | None = None) -> MtlsClient:
    return MtlsClient(
        fleet.broker, ca=ca or fleet.ca.cert_path, cert=cert, key=key, client_id=client_id
    )


def assert_refused_in_handshake(fleet: Fleet, client: MtlsClient) -> None:
    """No CONNACK, and the broker logged a failed certificate check for this attempt."""
    before = fleet.broker.log_text().count("certificate verify failed")
    reason = client.connect()
    assert reason is not None and "CONNACK" in reason, reason
    deadline = time.monotonic() + 3
    while fleet.broker.log_text().count("certificate verify failed") == before:
        assert time.monotonic() < deadline, "the broker did not log a certificate failure"
        time.sleep(0.05)


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def test_provision_then_the_device_connects_as_itself_and_is_fenced(
    fleet: Fleet, tmp_path: Path
) -> None:
    result = provision(fleet, tmp_path, "cam-p1", fleet.token())
    assert result.returncode == 0, result.stderr
    assert "enrolled as cam-p1" in result.stdout
    ident = tmp_path / "state" / "identity"
    for name in ("device.key", "device.pem", "ca.pem"):
        assert stat.S_IMODE((ident / name).stat().st_mode) == 0o600, name
    assert not (ident / "device.key.pending").exists()
    trust = tmp_path / "state" / "trust" / "fleet.pub"
    assert trust.read_bytes() == fleet.home.signing_pub.read_bytes()
    assert stat.S_IMODE(trust.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((ident / "device.pem").read_bytes())
    cert.verify_directly_issued_by(fleet.ca.cert)
    assert cert.subject.rfc4514_string() == "CN=cam-p1"

    # the written config is complete and valid; an MqttLink from it connects with the cert
    config = load_config(tmp_path / "agent.toml")
    assert config.device.id == "cam-p1"
    assert config.mqtt.port == fleet.broker.port and config.mqtt.tls is not None
    got: list[Message] = []
    arrived = threading.Event()

    def seen(msg: Message) -> None:
        got.append(msg)
        arrived.set()

    fleet.client.subscribe("edge/cam-p1/telemetry", seen)
    outbox = Outbox(tmp_path / "outbox.db")
    link = MqttLink.from_config(config, outbox)
    link.start()
    try:
        assert link.wait_for(LinkState.CONNECTED, timeout=10), link.status()
        link.publish("edge/cam-p1/telemetry", json.dumps({"hello": 1}), qos=1)
        assert arrived.wait(10)
        assert json.loads(got[0].payload) == {"hello": 1}
    finally:
        assert link.stop(timeout=5) == []
        outbox.close()

    # and the agent itself runs from it: online status over its own certificate
    online = threading.Event()

    def status(msg: Message) -> None:
        if b"online" in msg.payload:
            online.set()

    fleet.client.subscribe("edge/cam-p1/status", status)
    agent = subprocess.Popen(
        [str(EDGE_AGENT), "run", "--config", str(tmp_path / "agent.toml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert online.wait(20), "the agent did not come online"
        agent.terminate()
        assert agent.wait(20) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(5)
        if agent.stderr:
            agent.stderr.close()

    # its own topics only: another device's are refused (PUBACK 0x87)
    client = mtls(fleet, ident / "device.pem", ident / "device.key", "cam-p1-check")
    try:
        assert client.connect() is None
        assert client.publish("edge/cam-p1/events/door", "{}") in (0, 0x10)  # 0x10: no subscriber
        assert client.publish("edge/cam-other/events/door", "{}") == 0x87
        assert client.publish("enrol/x/request", "{}") == 0x87
        assert client.publish("edge/cam-other/renew/request", "{}") == 0x87
    finally:
        client.close()


def test_a_claim_token_works_once_and_not_after_expiry(fleet: Fleet, tmp_path: Path) -> None:
    token = fleet.token()
    first = provision(fleet, tmp_path / "a", "cam-once", token)
    assert first.returncode == 0, first.stderr
    second = provision(fleet, tmp_path / "b", "cam-twice", token)
    assert second.returncode == 1
    assert "token_used" in second.stderr and "already used (by cam-once" in second.stderr
    assert not (tmp_path / "b" / "agent.toml").exists()
    assert not (tmp_path / "b" / "state" / "identity" / "device.pem").exists()

    expired = provision(fleet, tmp_path / "c", "cam-late", fleet.token(dt.timedelta(seconds=-1)))
    assert expired.returncode == 1 and "token_expired" in expired.stderr
    unknown = provision(fleet, tmp_path / "d", "cam-x", "claim_not-a-real-token")
    assert unknown.returncode == 1 and "bad_token" in unknown.stderr


def test_an_id_cannot_be_enrolled_twice(fleet: Fleet, tmp_path: Path) -> None:
    assert provision(fleet, tmp_path / "a", "cam-dup", fleet.token()).returncode == 0
    again = provision(fleet, tmp_path / "b", "cam-dup", fleet.token())
    assert again.returncode == 1 and "device_exists" in again.stderr


def test_existing_config_is_kept_and_the_token_not_spent(fleet: Fleet, tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text("# mine\n")
    token = fleet.token()
    refused = provision(fleet, tmp_path, "cam-keep", token)
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert (tmp_path / "agent.toml").read_text() == "# mine\n"
    forced = provision(fleet, tmp_path, "cam-keep", token, "--force")
    assert forced.returncode == 0, forced.stderr
    assert load_config(tmp_path / "agent.toml").device.id == "cam-keep"


def test_wrong_ca_and_unreachable_broker_are_explained(fleet: Fleet, tmp_path: Path) -> None:
    other = FleetCA.init(FleetHome(tmp_path / "other-home"))
    args = ["--ca", str(other.cert_path)]
    wrong = edge_agent(
        "provision", "--broker", fleet.url, "--claim-token", fleet.token(), *args,
        "--claim-cert", str(fleet.ca.dir / "claim.pem"), "--claim-key",
        str(fleet.ca.dir / "claim.key"), "--device-id", "cam-w",
        "--state-dir", str(tmp_path / "s"), "--config", str(tmp_path / "a.toml"),
    )  # fmt: skip
    assert wrong.returncode == 1
    assert "not trusted with CA file" in wrong.stderr, wrong.stderr

    down = edge_agent(
        "provision", "--broker", f"mqtts://127.0.0.1:{free_port()}", "--claim-token", "x",
        "--ca", str(fleet.ca.cert_path), "--claim-cert", str(fleet.ca.dir / "claim.pem"),
        "--claim-key", str(fleet.ca.dir / "claim.key"), "--device-id", "cam-d",
        "--state-dir", str(tmp_path / "s2"), "--config", str(tmp_path / "b.toml"),
    )  # fmt: skip
    assert down.returncode == 1 and "cannot be reached" in down.stderr, down.stderr


def test_the_claim_identity_may_only_use_its_enrolment_topics(fleet: Fleet) -> None:
    claim = mtls(fleet, fleet.ca.dir / "claim.pem", fleet.ca.dir / "claim.key", "claim-abc")
    try:
        assert claim.connect() is None
        assert claim.publish("enrol/claim-abc/request", "{}") in (0, 0x10)
        assert claim.publish("enrol/claim-other/request", "{}") == 0x87
        assert claim.publish("edge/cam-p1/renew/request", "{}") == 0x87
        assert claim.publish("edge/claim/status", "{}") == 0x87
    finally:
        claim.close()


def _raw_request(fleet: Fleet, body: dict[str, object]) -> dict[str, object]:
    client = RequestClient(
        BrokerAddress(fleet.broker.host, fleet.broker.port),
        ca=fleet.ca.cert_path,
        cert=fleet.ca.dir / "claim.pem",
        key=fleet.ca.dir / "claim.key",
        client_id="claim-raw-test",
        timeout=10,
    )
    return client.request("enrol/claim-raw-test/request", "enrol/claim-raw-test/reply", body)


@pytest.mark.parametrize(
    ("csr_id", "device_id", "code"),
    [("cam-a1", "cam-b1", "wrong_device_id"), ("claim", "claim", "bad_device_id")],
)
def test_the_controller_checks_the_csr_and_the_id(
    fleet: Fleet, csr_id: str, device_id: str, code: str
) -> None:
    token = fleet.token()
    csr = make_csr(generate_key(), csr_id).decode()
    with pytest.raises(EnrolRefused) as info:
        _raw_request(fleet, {"device_id": device_id, "token": token, "csr": csr})
    assert info.value.code == code
    # the token was not spent on a refused request
    ok = _raw_request(
        fleet,
        {
            "device_id": "cam-c1-" + code,
            "token": token,
            "csr": make_csr(generate_key(), "cam-c1-" + code).decode(),
        },
    )
    assert ok["ok"] is True


def test_renew_replaces_the_certificate_and_revoke_cuts_the_device_off(
    fleet: Fleet, tmp_path: Path
) -> None:
    assert provision(fleet, tmp_path, "cam-r1", fleet.token()).returncode == 0
    ident = tmp_path / "state" / "identity"
    config = str(tmp_path / "agent.toml")
    old_serial, old_key = serial_of(ident / "device.pem"), (ident / "device.key").read_bytes()

    not_due = edge_agent("renew", "--config", config, "--if-expiring-within", "1d")
    assert not_due.returncode == 0 and "not renewed" in not_due.stdout
    assert serial_of(ident / "device.pem") == old_serial

    renewed = edge_agent("renew", "--config", config, "--if-expiring-within", "60d")
    assert renewed.returncode == 0, renewed.stderr
    assert serial_of(ident / "device.pem") != old_serial
    assert (ident / "device.key").read_bytes() != old_key
    assert stat.S_IMODE((ident / "device.key").stat().st_mode) == 0o600
    client = mtls(fleet, ident / "device.pem", ident / "device.key", "cam-r1-new")
    try:
        assert client.connect() is None
    finally:
        client.close()

    count, crl_path = revoke_device(fleet.home, "cam-r1")
    assert count == 2
    crl = x509.load_pem_x509_crl(Path(crl_path).read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(serial_of(ident / "device.pem"))
    refused = edge_agent("renew", "--config", config)  # the broker has the old CRL still
    assert refused.returncode == 1 and "device_revoked" in refused.stderr, refused.stderr

    fleet.broker.restart()  # mosquitto reads crlfile at start
    assert fleet.client.connected or _wait_connected(fleet.client)
    client = mtls(fleet, ident / "device.pem", ident / "device.key", "cam-r1-after")
    try:
        assert_refused_in_handshake(fleet, client)
    finally:
        client.close()


def _wait_connected(client: FleetClient) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if client.connected:
            return True
        time.sleep(0.05)
    return False


def test_expired_and_foreign_certificates_are_refused(fleet: Fleet, tmp_path: Path) -> None:
    key = generate_key()
    past = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    expired = fleet.ca.sign(
        key.public_key(), "cam-old", usage="client", valid_from=past,
        valid_until=past + dt.timedelta(days=1),
    )  # fmt: skip
    (tmp_path / "old.pem").write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "old.key").write_bytes(key_pem(key))
    other = FleetCA.init(FleetHome(tmp_path / "other"))
    foreign_cert, foreign_key = other.issue_keypair("cam-p1", tmp_path, usage="client", days=2)
    for cert, key_path in (
        (tmp_path / "old.pem", tmp_path / "old.key"),
        (foreign_cert, foreign_key),
    ):
        client = mtls(fleet, cert, key_path, f"bad-{cert.stem}")
        try:
            assert_refused_in_handshake(fleet, client)
        finally:
            client.close()


def test_enrol_serve_runs_standalone_and_stops_on_sigterm(fleet: Fleet, tmp_path: Path) -> None:
    """`edge-fleet enrol-serve` as an operator starts it, with the in-process service stopped:
    the device's certificate can only come from the subprocess."""
    ca = fleet.ca.dir
    fleet.service.stop()
    stopped = provision(fleet, tmp_path / "none", "cam-nobody", fleet.token(), "--timeout", "2")
    assert stopped.returncode == 1 and "enrol-serve" in stopped.stderr, stopped.stderr
    serve = subprocess.Popen(
        [
            str(EDGE_AGENT.parent / "edge-fleet"), "enrol-serve", "--home", str(fleet.home.root),
            "--broker", fleet.url, "--ca", str(ca / "ca.pem"),
            "--cert", str(ca / "fleet-controller.pem"), "--key", str(ca / "fleet-controller.key"),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert serve.stdout is not None
        assert "enrolment service on" in serve.stdout.readline()
        result = provision(fleet, tmp_path, "cam-standalone", fleet.token())
        assert result.returncode == 0, result.stderr
        serve.terminate()
        assert serve.wait(10) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(5)
        if serve.stdout:
            serve.stdout.close()
        fleet.service = EnrolService(fleet.client, fleet.home, cert_days=30)
        fleet.service.start()
