"""A real mosquitto for tests on a free loopback port, and a paho client that watches it.

The broker keeps its own config, password file and persistence under a temp directory, so
stop() and start() on the same port keep retained messages and sessions, like a real one.
"""

from __future__ import annotations

import getpass
import json
import os
import queue
import shutil
import signal
import socket
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
