"""The controller's blob store and server (fleet/blobs.py) against a real mosquitto."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from fleet.blobs import BlobServer, BlobStore
from fleet.mqtt import BrokerSettings, FleetClient
from models.desired import package_id
from runtimes.errors import PackageError
from tests.mqtt_broker import Broker, Observer
from tests.ota_support import ONNX_FP32, fleet_home, signed_package


def test_store_adds_verified_signed_packages(tmp_path: Path) -> None:
    home = fleet_home(tmp_path / "home")
    pkg, doc = signed_package(home, tmp_path / "pkg", "0.2.0")
    store = BlobStore(home)
    pid = store.add_package(pkg)
    assert pid == package_id(doc) and store.manifest(pid) == doc
    assert store.add_package(pkg) == pid and store.package_ids() == [pid]
    entry = doc["files"][0]
    assert store.has(entry["sha256"]) and not store.has("0" * 64) and not store.has("../x")
    data = (pkg / entry["path"]).read_bytes()
    assert store.read(entry["sha256"], 100, 50) == data[100:150]
    with pytest.raises(PackageError, match="not published"):
        store.manifest("f" * 64)
    unsigned = tmp_path / "unsigned"
    shutil.copytree(ONNX_FP32, unsigned)
    with pytest.raises(PackageError, match="not signed"):
        store.add_package(unsigned)
    (pkg / entry["path"]).write_bytes(data[:-1])
    with pytest.raises(PackageError, match="size"):
        store.add_package(pkg)


def test_server_answers_chunks_and_errors(
    tmp_path: Path, broker: Broker, observers: Callable[..., Observer]
) -> None:
    home = fleet_home(tmp_path / "home")
    pkg, doc = signed_package(home, tmp_path / "pkg", "0.2.0")
    store = BlobStore(home)
    store.add_package(pkg)
    sha = doc["files"][0]["sha256"]
    data = (pkg / doc["files"][0]["path"]).read_bytes()
    with FleetClient(BrokerSettings(broker.host, broker.port)) as client:
        client.connect()
        server = BlobServer(client, store)
        server.start()
        device = observers(broker, ["edge/dev-1/blob/data"])

        def ask(body: object, corr: bytes, response: str = "edge/dev-1/blob/data") -> None:
            device.publish(
                "edge/dev-1/blob/get",
                json.dumps(body),
                response_topic=response,
                correlation_data=corr,
            )

        ask({"sha256": sha, "offset": 1000, "length": 4096}, b"r1")
        got = device.next(lambda m: m.correlation_data == b"r1")
        assert got.payload == data[1000:5096]
        props = got.user_properties
        assert props["sha256"] == sha and props["offset"] == "1000" and props["length"] == "4096"
        assert props["chunk_sha256"] == hashlib.sha256(got.payload).hexdigest()
        ask({"sha256": sha, "offset": len(data) - 10, "length": 4096}, b"tail")
        assert device.next(lambda m: m.correlation_data == b"tail").payload == data[-10:]
        ask({"sha256": "a" * 64, "offset": 0, "length": 10}, b"r2")
        miss = device.next(lambda m: m.correlation_data == b"r2")
        assert miss.user_properties["error"] == "unknown_blob" and miss.payload == b""
        ask({"sha256": sha, "offset": len(data) + 1, "length": 10}, b"r3")
        assert device.next(lambda m: m.correlation_data == b"r3").user_properties["error"] == (
            "bad_range"
        )
        ask({"sha256": sha, "offset": 0, "length": 1 << 30}, b"r4")
        assert device.next(lambda m: m.correlation_data == b"r4").user_properties["error"] == (
            "bad_range"
        )
        ask({"path": "/etc/passwd"}, b"r5")
        assert device.next(lambda m: m.correlation_data == b"r5").user_properties["error"] == (
            "bad_request"
        )
        ask({"sha256": sha, "offset": 0, "length": 10}, b"r6", response="edge/dev-2/blob/data")
        ask({"sha256": sha, "offset": 0, "length": 10}, b"r7")
        assert device.next(lambda m: m.correlation_data == b"r7").payload == data[:10]
        stats = server.stats()
        assert stats["requests"] == 3 and stats["bytes"] == 4116 and stats["errors"] == 4
        assert stats["ignored"] == 1 and stats["devices"] == {"dev-1": 4116}
        # a run of chunks: one reply each, the last one short at the end of the file
        start = len(data) - 2 * 4096 - 100
        ask({"sha256": sha, "offset": start, "length": 4096, "chunks": 5}, b"run")
        replies = [device.next(lambda m: m.correlation_data == b"run") for _ in range(3)]
        assert [int(r.user_properties["offset"]) for r in replies] == [
            start,
            start + 4096,
            start + 8192,
        ]
        assert b"".join(r.payload for r in replies) == data[start:]
        for bad in (0, 65, True, "2"):
            ask({"sha256": sha, "offset": 0, "length": 10, "chunks": bad}, b"bad-run")
            refused = device.next(lambda m: m.correlation_data == b"bad-run")
            assert refused.user_properties["error"] == "bad_request", bad
        server.stop()
