"""A real mosquitto for tests on a free loopback port, and a paho client that watches it.

The broker keeps its own config, password file and persistence under a temp directory, so
stop() and start() on the same port keep retained messages and sessions, like a real one.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import MqttConfig

MOSQUITTO = os.environ.get("MOSQUITTO") or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


class BrokerMissing(RuntimeError):
    """mosquitto is not installed where the tests look for it."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    """Server side of a TLS listener; clients must present a cert from the same CA."""

    ca: Path
    cert: Path
    key: Path


class Broker:
    """One mosquitto process; start(), stop() (clean, saves state), kill(), restart()."""

    def __init__(
        self,
        workdir: Path,
        *,
        users: dict[str, str] | None = None,
        acl: list[str] | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        if not Path(MOSQUITTO).is_file():
            raise BrokerMissing(
                f"mosquitto not found at {MOSQUITTO}: the integration tests need a real broker"
                " (apt-get install mosquitto mosquitto-clients, or set MOSQUITTO=/path)"
            )
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.users = users
        self.acl = acl
        self.tls = tls
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(exist_ok=True)
        self.log_path = workdir / "mosquitto.log"
        self.conf_path = workdir / "mosquitto.conf"
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'false' if self.users else 'true'}",
            "persistence true",
            f"persistence_location {self.data_dir}/",
            "autosave_interval 0",  # save on clean shutdown only
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "max_queued_messages 10000",
            f"user {getpass.getuser()}",  # as root, mosquitto would switch to `mosquitto`
        ]
        if self.users:
            passwd = self.workdir / "passwd"
            passwd.unlink(missing_ok=True)
            for n, (user, password) in enumerate(self.users.items()):
                args = [MOSQUITTO_PASSWD, "-b", *(["-c"] if n == 0 else []), str(passwd)]
                subprocess.run([*args, user, password], check=True, capture_output=True)
            passwd.chmod(0o600)  # newer mosquitto refuses world-readable password files
            lines.append(f"password_file {passwd}")
        if self.acl is not None:
            acl_path = self.workdir / "acl"
            acl_path.write_text("\n".join(self.acl) + "\n")
            acl_path.chmod(0o600)
            lines.append(f"acl_file {acl_path}")
        if self.tls:
            lines += [
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.cert}",
                f"keyfile {self.tls.key}",
                "require_certificate true",
                "use_identity_as_username true",
            ]
        self.conf_path.write_text("\n".join(lines) + "\n")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start on the same port as before and wait until it accepts TCP connections."""
        if self.running:
            return
        self._proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                self._proc.stderr and self._proc.stderr.close()
                self._proc = None
                raise RuntimeError(f"mosquitto exited at start: {err}\n{self.log_text()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout}s")

    def stop(self) -> None:
        """SIGTERM: mosquitto saves sessions and retained messages, then exits."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: like a broker crash; nothing saved since the last clean stop."""
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def wipe_state(self) -> None:
        """Forget every session and retained message (only while stopped)."""
        assert not self.running
        for path in self.data_dir.iterdir():
            path.unlink()

    def _end(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def mqtt_config(broker: Broker, **overrides: Any) -> MqttConfig:
    """Fast timings for tests; the rest as on a device."""
    values: dict[str, Any] = {
        "host": broker.host,
        "port": broker.port,
        "keepalive_s": 5,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.3,
        "flush_timeout_s": 2.0,
        **overrides,
    }
    return MqttConfig(**values)


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    user_properties: dict[str, str]
    correlation_data: bytes | None = None

    def json(self) -> Any:
        return json.loads(self.payload)


class Observer:
    """A second, independent paho client (the "fleet side") that records what it gets.

    With `session=True` it keeps a persistent session, so the broker queues QoS 1
    messages for it while it is away (across broker restarts, with persistence).
    """

    def __init__(
        self,
        broker: Broker,
        topics: list[str],
        *,
        client_id: str | None = None,
        session: bool = False,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.messages: queue.Queue[Received] = queue.Queue()
        self.seen: list[Received] = []
        self._topics = topics
        self._subscribed = threading.Event()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"observer-{os.getpid()}-{id(self)}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if username:
            self._client.username_pw_set(username, password)
        self._client.reconnect_delay_set(1, 1)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600 if session else 0
        self._client.connect(
            broker.host, broker.port, keepalive=10, clean_start=not session, properties=props
        )
        self._client.loop_start()
        if not self._subscribed.wait(5):
            self.close()
            raise RuntimeError("observer could not connect and subscribe")

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            return
        if self._topics:
            client.subscribe([(t, 1) for t in self._topics])
        else:
            self._subscribed.set()

    def _on_subscribe(self, _c: paho.Client, _u: Any, _mid: int, _r: Any, _p: Any) -> None:
        self._subscribed.set()

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        user = dict(getattr(props, "UserProperty", None) or [])
        corr = getattr(props, "CorrelationData", None)
        self.messages.put(
            Received(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos, user, corr)
        )

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        retain: bool = False,
        *,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> None:
        props = Properties(PacketTypes.PUBLISH)
        if response_topic is not None:
            props.ResponseTopic = response_topic
        if correlation_data is not None:
            props.CorrelationData = correlation_data
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        info.wait_for_publish(5)

    def next(self, predicate: Callable[[Received], bool], timeout: float = 10.0) -> Received:
        """The next message that satisfies `predicate` (others are kept in `seen`)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching message within {timeout}s; got {self.seen}")
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(msg)
            if predicate(msg):
                return msg

    def collect(self, topic: str, count: int, timeout: float = 15.0) -> list[Received]:
        """The next `count` messages on `topic`, in arrival order."""
        out: list[Received] = []
        while len(out) < count:
            out.append(self.next(lambda m: m.topic == topic, timeout))
        return out

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._client._reset_sockets()  # paho closes its wake-up socket pair only in __del__


@dataclass(frozen=True)
class Pki:
    """A throw-away CA, a broker certificate for 127.0.0.1 and a device certificate."""

    server: TlsFiles
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: clients that trust it must fail


def make_pki(workdir: Path, device_cn: str) -> Pki:
    """Build it with the openssl CLI (EC P-256 keys: fast)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the TLS tests need the openssl command (apt-get install openssl)")
    workdir.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=workdir)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        run(
            "req",
            "-x509",
            *key,
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.pem",
            "-days",
            "2",
            "-subj",
            f"/CN={ca}",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        )
    for name, cn, usage, san in (
        ("server", "127.0.0.1", "serverAuth", "subjectAltName=IP:127.0.0.1\n"),
        ("client", device_cn, "clientAuth", ""),
    ):
        (workdir / f"{name}.ext").write_text(
            f"{san}basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            f"extendedKeyUsage={usage}\nsubjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid\n"
        )
        run("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
        )
    return Pki(
        server=TlsFiles(workdir / "ca.pem", workdir / "server.pem", workdir / "server.key"),
        client_cert=workdir / "client.pem",
        client_key=workdir / "client.key",
        other_ca=workdir / "other-ca.pem",
    )


class CertAuthority:
    """A throw-away openssl CA directory (index.txt, serial, crlnumber, newcerts/) that
    issues server and client certificates, revokes them and publishes a CRL.

    Unlike `make_pki` every certificate goes through `openssl ca`, so the CA knows it and
    a revocation lands in the CRL; `expired=True` issues one whose validity lies in 2020.
    """

    def __init__(self, workdir: Path, name: str = "ca", days: int = 30) -> None:
        openssl = shutil.which("openssl")
        if openssl is None:
            raise RuntimeError("the TLS tests need the openssl command (apt-get install openssl)")
        self.openssl = openssl
        self.dir = workdir
        (workdir / "newcerts").mkdir(parents=True, exist_ok=True)
        (workdir / "index.txt").write_text("")
        (workdir / "serial").write_text("1000\n")
        (workdir / "crlnumber").write_text("1000\n")
        self.cert = workdir / f"{name}.pem"
        self.key = workdir / f"{name}.key"
        self.conf = workdir / "ca.cnf"
        self.conf.write_text(
            "[ ca ]\ndefault_ca = edge_ca\n\n"
            "[ edge_ca ]\n"
            f"dir = {workdir}\n"
            "database = $dir/index.txt\nnew_certs_dir = $dir/newcerts\n"
            f"certificate = $dir/{name}.pem\nprivate_key = $dir/{name}.key\n"
            "serial = $dir/serial\ncrlnumber = $dir/crlnumber\n"
            f"default_md = sha256\ndefault_days = {days}\ndefault_crl_days = {days}\n"
            "policy = policy_cn\nunique_subject = no\ncopy_extensions = none\n\n"
            "[ policy_cn ]\ncommonName = supplied\n\n"
            "[ server_ext ]\nbasicConstraints = CA:FALSE\n"
            "keyUsage = critical,digitalSignature\nextendedKeyUsage = serverAuth\n"
            "subjectAltName = IP:127.0.0.1,DNS:localhost\n"
            "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n\n"
            "[ client_ext ]\nbasicConstraints = CA:FALSE\n"
            "keyUsage = critical,digitalSignature\nextendedKeyUsage = clientAuth\n"
            "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n"
        )
        self._run(
            "req", "-x509", *self._newkey, "-keyout", str(self.key), "-out", str(self.cert),
            "-days", str(days), "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip

    _newkey = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")

    def _run(self, *args: str) -> None:
        proc = subprocess.run([self.openssl, *args], capture_output=True, text=True, cwd=self.dir)
        if proc.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {proc.stderr.strip()}")

    def issue(
        self, name: str, cn: str, *, server: bool = False, days: int = 30, expired: bool = False
    ) -> tuple[Path, Path]:
        """(cert, key) for CN=cn; a server certificate is valid for 127.0.0.1 and localhost."""
        cert, key, csr = (self.dir / f"{name}{ext}" for ext in (".pem", ".key", ".csr"))
        self._run("req", *self._newkey, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}")
        validity = (
            ["-startdate", "20200101000000Z", "-enddate", "20200102000000Z"]
            if expired
            else ["-days", str(days)]
        )
        self._run(
            "ca", "-batch", "-notext", "-config", str(self.conf), "-extensions",
            "server_ext" if server else "client_ext", *validity, "-in", str(csr), "-out", str(cert),
        )  # fmt: skip
        return cert, key

    def revoke(self, cert: Path) -> None:
        self._run("ca", "-config", str(self.conf), "-revoke", str(cert))

    def crl(self, path: Path | None = None) -> Path:
        """Write the current CRL (PEM) and return its path."""
        out = path or self.dir / "crl.pem"
        self._run("ca", "-config", str(self.conf), "-gencrl", "-out", str(out))
        return out


class ConfigBroker(Broker):
    """A `Broker` whose mosquitto.conf comes from `render(broker)` (for instance the
    production config with its paths and port rewritten for the test)."""

    def __init__(self, workdir: Path, render: Callable[[Broker], str]) -> None:
        self._render = render
        super().__init__(workdir)

    def _write_config(self) -> None:
        self.conf_path.write_text(self._render(self))


class _ClosingSSLSocket(ssl.SSLSocket):
    """Closes itself when the handshake fails: paho drops such a socket without closing it."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


class MtlsClient:
    """A paho MQTT 5 client that presents a client certificate (or none) to a TLS broker
    and records CONNACK, SUBACK and PUBACK reason codes and the messages it gets."""

    def __init__(
        self,
        broker: Broker,
        *,
        ca: Path,
        cert: Path | None,
        key: Path | None,
        client_id: str,
    ) -> None:
        self.broker = broker
        self.messages: queue.Queue[Received] = queue.Queue()
        self.connack: int | None = None
        self._subacks: queue.Queue[list[int]] = queue.Queue()
        self._pubacks: dict[int, int] = {}
        self._published = threading.Condition()
        context = ssl.create_default_context(cafile=str(ca))
        if cert is not None:
            context.load_cert_chain(str(cert), str(key) if key else None)
        context.sslsocket_class = _ClosingSSLSocket
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        self._client.tls_set_context(context)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message
        self._started = False

    def connect(self, timeout: float = 3.0) -> str | None:
        """None when the broker accepted the client (CONNACK success), else why not."""
        try:
            self._client.connect(self.broker.host, self.broker.port, keepalive=10)
        except (ssl.SSLError, OSError) as exc:
            return f"handshake failed: {exc}"
        deadline = time.monotonic() + timeout
        while self.connack is None and time.monotonic() < deadline:
            rc = self._client.loop(0.05)
            if rc != paho.MQTT_ERR_SUCCESS:
                return f"connection closed before CONNACK: {paho.error_string(rc)}"
        if self.connack is None:
            return f"no CONNACK within {timeout}s"
        if self.connack != 0:
            return f"CONNACK reason {self.connack:#x}"
        self._client._reset_sockets(sockpair_only=True)  # loop_start makes a new pair
        self._client.loop_start()
        self._started = True
        return None

    def _on_connect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connack = int(reason.value)

    def _on_subscribe(self, _c: paho.Client, _u: Any, _mid: int, reasons: Any, _p: Any) -> None:
        self._subacks.put([int(r.value) for r in reasons])

    def _on_publish(self, _c: paho.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self._published:
            self._pubacks[mid] = int(reason.value)
            self._published.notify_all()

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        self.messages.put(Received(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos, {}))

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 3.0) -> list[int]:
        """SUBACK reason codes (0..2: granted QoS; 0x80 and up: refused)."""
        self._client.subscribe(topic, qos)
        return self._subacks.get(timeout=timeout)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, timeout: float = 3.0) -> int:
        """The PUBACK reason code (QoS 1), or 0 once a QoS 0 message is written."""
        info = self._client.publish(topic, payload, qos=qos)
        with self._published:
            self._published.wait_for(lambda: info.mid in self._pubacks, timeout)
            return self._pubacks.get(info.mid, -1)

    def received(self, wait_for: str, timeout: float = 3.0) -> list[Received]:
        """Everything received until a message on topic `wait_for` (a sentinel) arrives."""
        out: list[Received] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"sentinel {wait_for} not received; got {out}")
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            out.append(msg)
            if msg.topic == wait_for:
                return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.disconnect()
        if self._started:
            self._client.loop_stop()
        self._client._reset_sockets()
