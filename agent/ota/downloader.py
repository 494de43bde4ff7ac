"""Chunked, resumable package transfer over MQTT (`edge/<id>/blob/get` -> `blob/data`): a
window of requests outstanding, each chunk checked, `.part` files with a sidecar of chunks held.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.atomic import fsync_dir
from agent.config import OtaConfig
from agent.mqtt_inbound import InboundMessage
from agent.ota.state import OtaError, atomic_write_json, read_json
from agent.ota.store import ModelStore
from models.package import FileEntry

log = logging.getLogger(__name__)

_SIDECAR_EVERY_S = 0.5  # the sidecar (chunks held) is synced at least this often...
_SIDECAR_EVERY_CHUNKS = 8  # ...and after this many new chunks
_MAX_RUN = 64  # chunks one request asks for at most (the controller's MAX_RUN)


class Cancelled(Exception):
    """The download was stopped (agent stopping or a newer target)."""


class Publisher(Protocol):
    """What the downloader needs of the link (MqttLink fits)."""

    def publish_volatile(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        correlation_data: bytes | None = None,
    ) -> bool: ...


@dataclass
class TransferStats:
    """Counters over the agent's life, and for the current fetch."""

    received: int = 0  # chunk bytes accepted into .part files
    refetched: int = 0  # chunk bytes that arrived for chunks already held
    retries: int = 0  # requests sent again after request_timeout_s
    bad_chunks: int = 0  # chunks whose chunk_sha256 or length was wrong


@dataclass
class _Request:
    index: int
    sent_at: float


class PartFile:
    """One file being fetched: `<sha>.part` and its sidecar `<sha>.part.json`.

    The whole file's sha256 follows the contiguous prefix of held chunks as it grows, fed
    from the chunk bytes as they are written (in-order arrival, the usual case, reads
    nothing back; a chunk that came early is read back once the gap before it fills), so
    `digest()` at the end is cheap. A helper thread syncs the sidecar now and then, off the
    receiving thread: fdatasync first, and it lists only chunks written before the sync.
    """

    def __init__(self, store: ModelStore, entry: FileEntry, chunk: int) -> None:
        self.entry = entry
        self.part = store.downloads / f"{entry.sha256}.part"
        self.sidecar = store.downloads / f"{entry.sha256}.part.json"
        side = read_json(self.sidecar)
        self.chunk = chunk
        have: set[int] = set()
        if (
            isinstance(side, dict)
            and side.get("size") == entry.size
            and isinstance(side.get("chunk"), int)
            and side["chunk"] > 0
            and self.part.is_file()
        ):
            self.chunk = side["chunk"]  # resume with the chunk size it was started with
            have = {int(i) for i in side.get("have", [])}
        self.count = max(1, -(-entry.size // self.chunk))
        self.have = {i for i in have if 0 <= i < self.count}
        self.held = sum(self.length(i) for i in self.have)
        self.fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o644)
        if self.have and os.fstat(self.fd).st_size != entry.size:
            log.warning(
                "%s is not the size it was created with: its chunks are fetched again",
                self.part.name,
            )
            self.have, self.held = set(), 0
        if not self.have:
            os.ftruncate(self.fd, entry.size)
        self._hash = hashlib.sha256()
        self._hashed = 0  # bytes [0, _hashed) of the file are in _hash
        self._prefix = 0  # chunks [0, _prefix) are all held
        while self._prefix in self.have:  # held from an earlier run: hashed when needed
            self._prefix += 1
        self._unsynced = 0
        self._synced_at = time.monotonic()
        self._sync_snapshot: list[int] | None = None  # chunks held, for the syncer to record
        self._sync_lock = threading.Lock()
        self._sync_wanted = threading.Event()
        self._syncing = False
        self._closing = False
        self._sync_error: OSError | None = None
        self._syncer = threading.Thread(target=self._sync_loop, name="ota-sync", daemon=True)
        self._syncer.start()

    def length(self, index: int) -> int:
        return min(self.chunk, self.entry.size - index * self.chunk)

    def held_bytes(self) -> int:
        return self.held

    def write(self, index: int, data: bytes) -> None:
        os.pwrite(self.fd, data, index * self.chunk)
        self.have.add(index)
        self.held += len(data)
        if index == self._prefix:
            self._hash_to(index * self.chunk)  # chunks held from an earlier run
            self._hash.update(data)
            self._hashed += len(data)
            self._prefix += 1
            while self._prefix in self.have:
                self._prefix += 1
            self._hash_to(min(self._prefix * self.chunk, self.entry.size))  # early arrivals
        self._unsynced += 1
        if self._unsynced >= _SIDECAR_EVERY_CHUNKS or (
            time.monotonic() - self._synced_at >= _SIDECAR_EVERY_S
        ):
            self._want_sync()

    def _hash_to(self, limit: int) -> None:
        """Feed the file's bytes [_hashed, limit) to the whole-file hash, read back."""
        while self._hashed < limit:
            block = os.pread(self.fd, min(1 << 20, limit - self._hashed), self._hashed)
            if not block:
                # Cut behind our back: the next attempt sees the wrong size and starts over.
                raise OtaError(f"transfer: {self.part.name} is shorter than its sidecar says")
            self._hash.update(block)
            self._hashed += len(block)

    def _want_sync(self) -> None:
        """Hand the syncer the chunks written so far, unless it is still busy with the last
        set (then the next write asks again)."""
        if self._sync_error is not None:
            raise OtaError(f"transfer: cannot write {self.part}: {self._sync_error}")
        if self._sync_wanted.is_set() or self._syncing:
            return
        snapshot = sorted(self.have)  # every chunk in it is already written
        with self._sync_lock:
            self._sync_snapshot = snapshot
        self._unsynced = 0
        self._synced_at = time.monotonic()
        self._sync_wanted.set()

    def _sync_loop(self) -> None:
        while True:
            self._sync_wanted.wait()
            self._sync_wanted.clear()
            with self._sync_lock:
                snapshot, self._sync_snapshot = self._sync_snapshot, None
            if snapshot is not None and self._sync_error is None:
                self._syncing = True
                self._sync(snapshot)
                self._syncing = False
            if self._closing:
                return

    def _sync(self, have: list[int]) -> None:
        """Data first, then the record of what is held: a crash never claims unwritten bytes."""
        try:
            os.fdatasync(self.fd)
            atomic_write_json(
                self.sidecar,
                {
                    "sha256": self.entry.sha256,
                    "size": self.entry.size,
                    "chunk": self.chunk,
                    "have": have,
                },
            )
        except OSError as exc:
            self._sync_error = exc

    def close(self) -> None:
        try:
            self._closing = True
            self._sync_wanted.set()
            self._syncer.join()
            if self._unsynced or self._sync_error is not None:
                self._sync_error = None
                self._sync(sorted(self.have))
        finally:
            os.close(self.fd)

    def digest(self) -> str:
        """The whole file's sha256 (after close): what the prefix hash did not reach is read."""
        hasher = self._hash.copy()
        with self.part.open("rb") as fh:
            fh.seek(self._hashed)
            for block in iter(lambda: fh.read(1 << 20), b""):
                hasher.update(block)
        return hasher.hexdigest()

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.sidecar.unlink(missing_ok=True)


Progress = Callable[[int, int, int], None]  # (bytes held, total bytes, chunks this run)
# Fills a part file's missing chunks: (part, report(bytes held), cancelled)
FileFetcher = Callable[["PartFile", Callable[[int], None], Callable[[], bool]], None]


class Downloader:
    """Fetches package files into the store's blobs, on the caller's (OTA worker) thread.

    `on_data` is the MQTT handler for `edge/<id>/blob/data`: it only hands over."""

    def __init__(
        self,
        link: Publisher,
        device_id: str,
        store: ModelStore,
        config: OtaConfig,
        connected: Callable[[], bool],
    ) -> None:
        self.link = link
        self.store = store
        self.config = config
        self.connected = connected
        self.request_topic = f"edge/{device_id}/blob/get"
        self.data_topic = f"edge/{device_id}/blob/data"
        self.stats = TransferStats()
        self._inbox: queue.SimpleQueue[InboundMessage] = queue.SimpleQueue()
        self._lock = threading.Lock()
        # Correlation data of requests: unique enough to tell replies apart in a trace.
        self._nonce = itertools.count(int.from_bytes(os.urandom(4), "big"))

    def on_data(self, message: InboundMessage) -> None:
        self._inbox.put(message)

    def held(self, files: Sequence[FileEntry]) -> int:
        """Bytes of `files` already on the device (complete blobs and recorded chunks)."""
        total = 0
        for entry in files:
            if self.store.has_blob(entry.sha256, entry.size):
                total += entry.size
                continue
            side = read_json(self.store.downloads / f"{entry.sha256}.part.json")
            if isinstance(side, dict) and side.get("size") == entry.size:
                chunk = int(side.get("chunk") or 1)
                total += sum(min(chunk, entry.size - i * chunk) for i in side.get("have", []))
        return total

    def fetch(
        self,
        files: Sequence[FileEntry],
        progress: Progress,
        cancelled: Callable[[], bool],
        via: FileFetcher | None = None,
    ) -> None:
        """Bring every file into the blobs, resuming partial ones; OtaError when the
        controller refuses, the transfer stalls, or a file does not match its sha256/size.
        `via` fetches a file another way (HTTPS, agent/ota/https.py); default: MQTT."""
        fetch_file = via or self._fetch_file
        self.store.ensure()
        total = sum(f.size for f in files)
        done = 0
        chunks = 0
        self._drain()
        for entry in files:
            if self.store.has_blob(entry.sha256, entry.size):
                done += entry.size
                continue
            part = PartFile(self.store, entry, self.config.chunk_bytes)
            try:
                base = done

                def report(held: int, _base: int = base) -> None:
                    nonlocal chunks
                    chunks += 1
                    progress(_base + held, total, chunks)

                progress(base + part.held_bytes(), total, chunks)
                fetch_file(part, report, cancelled)
            except OtaError as exc:
                part.close()
                if exc.reason.startswith("truncated"):
                    part.discard()  # the controller's copy is bad: nothing here to keep
                raise
            except BaseException:
                part.close()
                raise
            else:
                part.close()
            self._finish(part)
            done += entry.size
        progress(done, total, chunks)

    def _drain(self) -> None:
        """Replies left over from an earlier fetch are stale."""
        while True:
            try:
                self._inbox.get_nowait()
            except queue.Empty:
                return

    def _fetch_file(
        self, part: PartFile, report: Callable[[int], None], cancelled: Callable[[], bool]
    ) -> None:
        entry = part.entry
        missing = [i for i in range(part.count) if i not in part.have]
        missing.reverse()  # pop() takes the lowest index first
        outstanding: dict[int, _Request] = {}
        last_chunk = time.monotonic()
        cfg = self.config
        batch = max(1, cfg.window // 2)
        was_online = True
        while missing or outstanding:
            if cancelled():
                raise Cancelled()
            now = time.monotonic()
            online = self.connected()
            if online and not was_online:  # requests are not queued while offline: ask again
                for req in outstanding.values():
                    self._request(part, req.index)
            was_online = online
            # Runs of consecutive chunks, one request each, sent once half the window is
            # free: a quarter of the requests (and of their cost on both ends) of one per
            # chunk, with at least half the window still in flight.
            while missing and cfg.window - len(outstanding) >= min(batch, len(missing)):
                first = missing.pop()
                count = 1
                room = min(cfg.window - len(outstanding), _MAX_RUN)
                while missing and count < room and missing[-1] == first + count:
                    missing.pop()
                    count += 1
                self._request(part, first, count)
                for index in range(first, first + count):
                    outstanding[index] = _Request(index, now)
            if not online:  # nothing is late while offline
                last_chunk = now
                for req in outstanding.values():
                    req.sent_at = now
            for req in outstanding.values():
                if now - req.sent_at > cfg.request_timeout_s:
                    self.stats.retries += 1
                    self._request(part, req.index)
                    req.sent_at = now
            if now - last_chunk > cfg.stall_timeout_s:
                raise OtaError(
                    f"transfer: no data for {cfg.stall_timeout_s:g} s ({entry.path}); "
                    "kept what arrived"
                )
            try:
                msg = self._inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            got = self._accept(part, msg)
            if got is None:
                continue
            last_chunk = time.monotonic()
            outstanding.pop(got, None)
            if got in missing:
                missing.remove(got)
            report(part.held_bytes())

    def _request(self, part: PartFile, index: int, count: int = 1) -> None:
        """Ask for chunks [index, index + count): one reply per chunk."""
        runs = f',"chunks":{count}' if count > 1 else ""
        length = part.chunk if count > 1 else part.length(index)
        body = (
            f'{{"sha256":"{part.entry.sha256}","offset":{index * part.chunk},'
            f'"length":{length}{runs}}}'
        )
        corr = f"{part.entry.sha256[:16]}:{index}:{next(self._nonce):x}".encode()
        # Not through the outbox: a request lost to a disconnect or a restart is asked
        # again (on reconnect, after request_timeout_s, or from the sidecar on start).
        self.link.publish_volatile(self.request_topic, body, qos=0, correlation_data=corr)

    def _accept(self, part: PartFile, msg: InboundMessage) -> int | None:
        """Write a reply's chunk if it is one we lack and it checks out; its index, else None."""
        props = dict(msg.user_properties)
        entry = part.entry
        if props.get("sha256") != entry.sha256:
            return None  # a stale reply for another file
        error = props.get("error")
        if error:
            if error == "unknown_blob":
                raise OtaError(f"transfer: the controller does not have {entry.path} ({error})")
            if error == "bad_range":
                raise OtaError(
                    f"truncated: the controller's copy of {entry.path} is shorter than the "
                    f"{entry.size} bytes the manifest says"
                )
            raise OtaError(f"transfer: the controller refused a request for {entry.path}: {error}")
        try:
            offset = int(props.get("offset", "-1"))
        except ValueError:
            return None
        if offset < 0 or offset % part.chunk:
            self.stats.bad_chunks += 1
            return None
        index = offset // part.chunk
        if index >= part.count:
            self.stats.bad_chunks += 1
            return None
        data = msg.payload
        if index in part.have:
            self.stats.refetched += len(data)
            return None
        if len(data) < part.length(index):
            raise OtaError(
                f"truncated: {entry.path} ends at {offset + len(data)} bytes on the "
                f"controller, the manifest says {entry.size}"
            )
        if len(data) > part.length(index):
            self.stats.bad_chunks += 1
            return None
        if hashlib.sha256(data).hexdigest() != props.get("chunk_sha256"):
            self.stats.bad_chunks += 1
            log.warning("chunk %d of %s fails its chunk_sha256: asked again", index, entry.path)
            return None
        part.write(index, data)
        self.stats.received += len(data)
        return index

    def _finish(self, part: PartFile) -> None:
        entry = part.entry
        digest = part.digest()
        if digest != entry.sha256:
            part.discard()
            raise OtaError(
                f"sha256 mismatch: {entry.path} arrived as {digest[:16]}…, "
                f"the manifest says {entry.sha256[:16]}…"
            )
        os.replace(part.part, self.store.blob_path(entry.sha256))
        fsync_dir(self.store.blobs)
        part.sidecar.unlink(missing_ok=True)
