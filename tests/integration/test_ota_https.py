"""The optional HTTPS transfer path (agent/ota/https.py): a real TLS server on loopback that
honours Range, a connection dropped mid-file and resumed, and an agent updated over it."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import OtaConfig
from agent.ota.downloader import Downloader
from agent.ota.https import https_fetcher, tls_context
from agent.ota.state import OtaError
from agent.ota.store import ModelStore
from fleet.blobs import BlobStore
from fleet.mqtt import BrokerSettings, FleetClient
from models.desired import build_desired, package_id
from models.package import FileEntry
from tests.mqtt_broker import Broker, Observer
from tests.ota_support import (
    ONNX_INT8,
    RunningAgent,
    agent_toml,
    fleet_home,
    signed_package,
    signing_key,
    wait_for,
)


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class BlobHttps:
    """Serves files by sha256 under /blobs/, with single Range requests; `cut_after` bytes
    into the first response it drops the connection."""

    def __init__(self, root: Path, cert: Path, key: Path) -> None:
        self.root = root
        self.served = 0
        self.ranges: list[str] = []
        self.cut_after: int | None = None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_a: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = outer.root / self.path.rsplit("/", 1)[-1]
                if not self.path.startswith("/blobs/") or not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                header = self.headers.get("Range", "")
                outer.ranges.append(header)
                start, end = 0, len(data) - 1
                if header.startswith("bytes="):
                    a, _, b = header[6:].partition("-")
                    start, end = int(a), min(int(b or end), end)
                body = data[start : end + 1]
                self.send_response(206 if header else 200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                if outer.cut_after is not None:
                    body, outer.cut_after = body[: outer.cut_after], None
                    self.wfile.write(body)
                    outer.served += len(body)
                    self.close_connection = True
                    return
                self.wfile.write(body)
                outer.served += len(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/blobs/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def https(tmp_path: Path) -> Iterator[tuple[BlobHttps, Path]]:
    cert, key = self_signed(tmp_path)
    (tmp_path / "www").mkdir()
    server = BlobHttps(tmp_path / "www", cert, key)
    yield server, cert
    server.close()


def test_range_resume_after_a_dropped_connection(
    tmp_path: Path, https: tuple[BlobHttps, Path]
) -> None:
    server, cert = https
    data = os.urandom(40 * 16384 + 7)
    sha = hashlib.sha256(data).hexdigest()
    (server.root / sha).write_bytes(data)
    config = OtaConfig(chunk_bytes=16384)
    store = ModelStore(tmp_path / "dev").ensure()
    dl = Downloader(lambda *a, **k: None, "dev", store, config, lambda: True)  # type: ignore[arg-type]
    entry = FileEntry(path="w.bin", sha256=sha, size=len(data))
    server.cut_after = 10 * 16384 + 500  # ten whole chunks and a bit, then the line drops
    via = https_fetcher(server.url, tls_context(cert), 5.0)
    dl.fetch([entry], lambda *_a: None, lambda: False, via=via)
    assert (store.blobs / sha).read_bytes() == data
    assert server.ranges == [f"bytes=0-{len(data) - 1}", f"bytes={10 * 16384}-{len(data) - 1}"]
    assert server.served - len(data) == 500  # only the broken chunk's bytes came twice
    other = hashlib.sha256(b"x").hexdigest()
    (server.root / other).write_bytes(b"x")
    part = _part(store, other)
    try:  # the system store does not know our self-signed server
        with pytest.raises(OtaError, match=r"^transfer: https 127.0.0.1: .*CERTIFICATE_VERIFY"):
            https_fetcher(server.url, tls_context(None), 5.0, attempts=1)(
                part, lambda _h: None, lambda: False
            )
    finally:
        part.close()


def _part(store: ModelStore, sha: str) -> Any:
    from agent.ota.downloader import PartFile

    return PartFile(store, FileEntry(path="x", sha256=sha, size=1), 16384)


def test_agent_updates_over_https_without_the_blob_server(
    tmp_path: Path, broker: Broker, https: tuple[BlobHttps, Path], observers: Any
) -> None:
    server, cert = https
    home = fleet_home(tmp_path / "home")
    pkg, doc = signed_package(home, tmp_path / "pkg", "0.2.0", source=ONNX_INT8)
    BlobStore(home).add_package(pkg)
    for entry in doc["files"]:
        (server.root / entry["sha256"]).write_bytes((home.blobs_dir / entry["sha256"]).read_bytes())
    watcher: Observer = observers(broker, ["edge/ota-dev/events/ota"])
    config = tmp_path / "agent.toml"
    config.write_text(
        agent_toml(
            broker.host, broker.port, tmp_path / "state", home.signing_pub, ca_file=str(cert)
        )
    )
    running = RunningAgent(config)
    try:
        desired = build_desired(
            "ota-dev", 1, {"cam": (doc, False)}, signing_key(home), urls={"cam": server.url}
        )
        with FleetClient(BrokerSettings(broker.host, broker.port)) as client:
            client.connect()
            client.publish("edge/ota-dev/desired", json.dumps(desired), retain=True)
        pid = package_id(doc)
        watcher.next(
            lambda m: m.json()["state"] == "committed" and m.json()["target"]["package"] == pid, 60
        )
        wait_for(lambda: running.pipe().model_label == "yolox-nano@0.2.0", 10, "the new model")
        assert server.served == doc["files"][0]["size"]  # all of it over HTTPS, none over MQTT
    finally:
        running.stop()
