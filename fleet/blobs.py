"""The controller's package store (files by sha256 under the fleet home, signed model.json by
package id) and the server answering devices' chunk requests on `edge/+/blob/get`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fleet.home import FleetHome
from fleet.mqtt import FleetClient, Message
from models.desired import package_id
from models.package import MANIFEST, read_manifest, verify_files
from models.signing import load_trusted_keys, verify_document
from runtimes.errors import PackageError

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_CHUNK = 4 << 20  # the largest chunk a device may ask for at once
MAX_RUN = 64  # the most consecutive chunks one request may ask for


class BlobStore:
    """Published packages in `home.packages_dir/<id>.json` and their files in
    `home.blobs_dir/<sha256>`; reads by sha256, offset and length."""

    def __init__(self, home: FleetHome) -> None:
        self.home = home

    def add_package(self, directory: Path, trusted: list[Path] | None = None) -> str:
        """Check the package (files, and the signature by the home's key or `trusted`), copy
        its files in, record its model.json; returns the package id. Adding twice is a no-op."""
        manifest = read_manifest(directory)
        verify_files(directory, manifest)
        doc = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        keys = load_trusted_keys(self.home.signing_pub, *(trusted or []))
        verify_document(doc, keys, f"{directory / MANIFEST}")
        self.home.ensure()
        for entry in manifest.files:
            target = self.blob_path(entry.sha256)
            if target.is_file() and target.stat().st_size == entry.size:
                continue
            tmp = target.with_name(f".{entry.sha256}.{os.getpid()}.tmp")
            with (directory / entry.path).open("rb") as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            tmp.replace(target)
        pid = package_id(doc)
        record = self.home.packages_dir / f"{pid}.json"
        if not record.is_file():
            tmp = record.with_name(f".{pid}.tmp")
            tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            tmp.replace(record)
        log.info("package %s %s published as %s", manifest.name, manifest.version, pid)
        return pid

    def blob_path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise PackageError(f"{sha256!r} is not a sha256 (64 lower-case hex digits)")
        return self.home.blobs_dir / sha256

    def manifest(self, package_id: str) -> dict[str, Any]:
        """The signed model.json of a published package, verbatim."""
        if not _SHA256.match(package_id):
            raise PackageError(f"{package_id!r} is not a package id (64 hex digits)")
        path = self.home.packages_dir / f"{package_id}.json"
        try:
            doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PackageError(f"package {package_id} is not published here") from None
        return doc

    def package_ids(self) -> list[str]:
        if not self.home.packages_dir.is_dir():
            return []
        return sorted(p.stem for p in self.home.packages_dir.glob("*.json"))

    def has(self, sha256: str) -> bool:
        return self.stat(sha256) is not None

    def stat(self, sha256: str) -> os.stat_result | None:
        """The blob file's stat, None when there is no such (regular) file."""
        if not _SHA256.match(sha256):
            return None
        try:
            st = os.stat(self.home.blobs_dir / sha256)
        except OSError:
            return None
        return st if stat.S_ISREG(st.st_mode) else None

    def read(self, sha256: str, offset: int, length: int) -> bytes:
        """`length` bytes from `offset` (fewer at the end of the file)."""
        path = self.blob_path(sha256)
        if offset < 0 or length < 0:
            raise PackageError(f"bad range {offset}+{length}")
        try:
            with path.open("rb") as fh:
                fh.seek(offset)
                return fh.read(length)
        except FileNotFoundError:
            raise PackageError(f"blob {sha256} is not here") from None


_ChunkKey = tuple[str, int, int, int, int]  # sha256, offset, length, file inode, mtime (ns)


class ChunkCache:
    """Recently served chunks and their sha256, up to `max_bytes`, least recently used out.

    A blob is named by its sha256 and a rollout asks every device for the same chunks, so
    after the first device a reply costs neither a read nor a hash. The key holds the
    file's inode and mtime: a blob file replaced on disk is read (and hashed) afresh."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[_ChunkKey, tuple[bytes, str]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: _ChunkKey | None) -> tuple[bytes, str] | None:
        if key is None:
            return None
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: _ChunkKey | None, data: bytes, digest: str) -> None:
        if key is None or len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old[0])
            self._items[key] = (data, digest)
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, (dropped, _) = self._items.popitem(last=False)
                self._bytes -= len(dropped)


class BlobServer:
    """Answers `edge/<id>/blob/get` requests from a `BlobStore` (docs/ota-protocol.md).

    Runs on the client's worker thread: a read of one chunk and a non-blocking publish per
    request. Replies go to the request's response topic, which must lie under the device's
    own tree, or by default to `edge/<id>/blob/data`."""

    def __init__(
        self,
        client: FleetClient,
        store: BlobStore,
        max_chunk: int = MAX_CHUNK,
        cache_bytes: int = 64 << 20,
    ) -> None:
        self.client = client
        self.store = store
        self.max_chunk = max_chunk
        self.cache = ChunkCache(cache_bytes)
        self._lock = threading.Lock()
        self._stats = {"requests": 0, "bytes": 0, "errors": 0, "ignored": 0}
        self._devices: dict[str, int] = {}
        self._running = False

    def start(self) -> None:
        self._running = True
        self.client.subscribe("edge/+/blob/get", self._on_request)

    def stop(self) -> None:
        """Stop answering (the subscription stays until the client closes)."""
        self._running = False

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self._stats, "devices": dict(self._devices)}

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n

    def _on_request(self, msg: Message) -> None:
        if not self._running:
            return
        parts = msg.topic.split("/")
        device = parts[1] if len(parts) == 4 else ""
        response = msg.response_topic or f"edge/{device}/blob/data"
        if not device or not response.startswith(f"edge/{device}/"):
            self._count("ignored")
            log.warning("blob request on %s without a response topic of its own", msg.topic)
            return
        corr = msg.correlation_data
        sha, offset, length, chunks, error = self._parse(msg.payload)
        for k in range(chunks):  # a run of consecutive chunks: one reply each
            if not self._reply(response, corr, device, sha, offset + k * length, length, error):
                break

    def _reply(
        self,
        response: str,
        corr: bytes | None,
        device: str,
        sha: str,
        offset: int,
        length: int,
        error: str | None,
    ) -> bool:
        """Publish one chunk (or the error); False when there was nothing to send."""
        data, digest = b"", ""
        if error is None:
            st = self.store.stat(sha)  # each time: a deleted or replaced blob is not cached
            key = (sha, offset, length, st.st_ino, st.st_mtime_ns) if st else None
            if st is None:
                error = "unknown_blob"
            elif cached := self.cache.get(key):
                data, digest = cached
            elif offset > st.st_size or (offset == st.st_size and st.st_size > 0):
                error = "bad_range"
            else:
                data = self.store.read(sha, offset, length)
                digest = hashlib.sha256(data).hexdigest()
                self.cache.put(key, data, digest)
        props = {"sha256": sha, "offset": str(offset), "length": str(len(data))}
        if error is None:
            props["chunk_sha256"] = digest
            with self._lock:
                self._stats["requests"] += 1
                self._stats["bytes"] += len(data)
                self._devices[device] = self._devices.get(device, 0) + len(data)
        else:
            props["error"] = error
            data = b""
            self._count("errors")
        try:
            self.client.publish(
                response, data, qos=1, correlation_data=corr, user_properties=props, wait=False
            )
        except Exception:
            log.exception("blob reply to %s failed", response)
            return False
        return error is None and len(data) == length

    def _parse(self, payload: bytes) -> tuple[str, int, int, int, str | None]:
        """(sha256, offset, length, chunks, error) of a request; on an error, chunks is 1
        (one error reply)."""
        try:
            body = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "", 0, 0, 1, "bad_request"
        if not isinstance(body, dict):
            return "", 0, 0, 1, "bad_request"
        sha = body.get("sha256")
        offset = body.get("offset")
        length = body.get("length")
        chunks = body.get("chunks", 1)
        if not isinstance(sha, str) or not _SHA256.match(sha):
            return str(sha)[:64], 0, 0, 1, "bad_request"
        if not isinstance(chunks, int) or isinstance(chunks, bool) or not 0 < chunks <= MAX_RUN:
            return sha, 0, 0, 1, "bad_request"
        if (
            not isinstance(offset, int)
            or not isinstance(length, int)
            or isinstance(offset, bool)
            or isinstance(length, bool)
            or offset < 0
            or not 0 < length <= self.max_chunk
        ):
            return sha, 0, 0, 1, "bad_range"
        return sha, offset, length, chunks, None
