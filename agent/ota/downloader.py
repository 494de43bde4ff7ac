"""Chunked, resumable package transfer over MQTT (`edge/<id>/blob/get` -> `blob/data`): a
window of requests outstanding, `.part` files with a log of the chunks held.

Each reply carries the chunk's `chunk_sha256`, from the same controller as the bytes: it can
only tell a chunk damaged on the way, never a forged one (the signed manifest's whole-file
sha256 does that). So the chunks are not hashed one by one as they arrive, which would be a
second sha256 pass over every byte: the whole-file hash is fed from the arriving bytes, and
only when it fails are the held chunks checked against the hashes their replies claimed;
those that fail are dropped and fetched again (up to `_VERIFY_ROUNDS` times).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.atomic import fsync_dir
from agent.config import OtaConfig
from agent.mqtt_inbound import InboundMessage
from agent.ota.state import OtaError
from agent.ota.store import ModelStore
from models.package import FileEntry

log = logging.getLogger(__name__)

_MAX_RUN = 64  # chunks one request asks for at most (the controller's MAX_RUN)
_VERIFY_ROUNDS = 3  # fetch rounds per file when the whole-file hash keeps failing
_HEX64 = re.compile(r"[0-9a-f]{64}")


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

    received: int = 0  # chunk bytes kept in .part files (dropped bad chunks taken off)
    refetched: int = 0  # chunk bytes that arrived for chunks already held
    retries: int = 0  # requests sent again after request_timeout_s
    bad_chunks: int = 0  # chunks of the wrong length, or failing their chunk_sha256


@dataclass
class _Request:
    index: int
    sent_at: float


def read_chunk_log(path: Path) -> tuple[int, int, dict[int, str | None]] | None:
    """(file size, chunk size, {index: claimed chunk_sha256 or None}) from a `.part.log`;
    None when it is missing or its header is unreadable. Later records win; a torn last line
    (a crash mid-append) and garbage (a power cut's zero-filled tail) are skipped."""
    try:
        text = path.read_bytes().decode("ascii", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("%s: unreadable, ignored: %s", path, exc)
        return None
    lines = text.split("\n")
    head = lines[0].split()
    if len(head) != 5 or head[:3] != ["edge-agent", "part", "v1"]:
        return None
    try:
        size, chunk = int(head[3]), int(head[4])
    except ValueError:
        return None
    if size < 0 or chunk <= 0:
        return None
    count = max(1, -(-size // chunk))
    held: dict[int, str | None] = {}
    for line in lines[1:-1]:  # the last piece has no newline yet: never a whole record
        fields = line.split()
        if len(fields) != 2 or not fields[0].isdigit() or int(fields[0]) >= count:
            continue
        index, claim = int(fields[0]), fields[1]
        if claim == "!":
            held.pop(index, None)
        elif claim == "-":
            held[index] = None
        elif _HEX64.fullmatch(claim):
            held[index] = claim
    return size, chunk, held


class PartFile:
    """One file being fetched: `<sha>.part` and its chunk log `<sha>.part.log`.

    Each chunk is written into the `.part`, then recorded by one append to the log (its
    index and the chunk_sha256 its reply claimed): no fsync per chunk, no rewritten sidecar.
    After a SIGKILL the page cache holds both, so a restart resumes exactly. After a power
    cut the log may name a chunk whose bytes never reached the disk: the whole-file sha256
    then fails, each held chunk is checked against its recorded claim, and the lost ones are
    fetched again (`Downloader._fetch_file`). The finished file is fdatasync'ed before it is
    renamed into the blobs.

    The whole file's sha256 follows the contiguous prefix of held chunks as it grows, fed
    from the chunk bytes as they are written (in-order arrival, the usual case, reads
    nothing back; a chunk that came early is read back once the gap before it fills), so
    `digest()` at the end is cheap.
    """

    def __init__(self, store: ModelStore, entry: FileEntry, chunk: int) -> None:
        self.entry = entry
        self.part = store.downloads / f"{entry.sha256}.part"
        self.log_path = store.downloads / f"{entry.sha256}.part.log"
        # agents before the chunk log kept a JSON sidecar: its .part starts over
        store.downloads.joinpath(f"{entry.sha256}.part.json").unlink(missing_ok=True)
        record = read_chunk_log(self.log_path) if self.part.is_file() else None
        self.chunk = chunk
        held: dict[int, str | None] = {}
        if record is not None and record[0] == entry.size:
            self.chunk = record[1]  # resume with the chunk size it was started with
            held = record[2]
        self.count = max(1, -(-entry.size // self.chunk))
        self.have = set(held)
        # chunk index -> the chunk_sha256 its reply claimed (None: written without one)
        self.claims: dict[int, str | None] = held
        self.fresh: set[int] = set()  # chunks written by this run
        self.held = sum(self.length(i) for i in self.have)
        self.sync_error: OSError | None = None
        try:
            self.fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OtaError(f"transfer: cannot open {self.part}: {exc}") from exc
        try:
            if self.have and os.fstat(self.fd).st_size != entry.size:
                log.warning(
                    "%s is not the size it was created with: its chunks are fetched again",
                    self.part.name,
                )
                self.have, self.claims, self.held = set(), {}, 0
            if not self.have:
                os.ftruncate(self.fd, entry.size)
                self._start_log()
            else:
                self._log_fd = os.open(self.log_path, os.O_RDWR | os.O_APPEND)
                end = os.fstat(self._log_fd).st_size
                if end and os.pread(self._log_fd, 1, end - 1) != b"\n":
                    os.write(self._log_fd, b"\n")  # a torn last record stays on its own line
        except OSError as exc:
            os.close(self.fd)
            raise OtaError(f"transfer: cannot write {self.part}: {exc}") from exc
        self._hash = hashlib.sha256()
        self._hashed = 0  # bytes [0, _hashed) of the file are in _hash
        self._prefix = 0  # chunks [0, _prefix) are all held
        while self._prefix in self.have:  # held from an earlier run: hashed when needed
            self._prefix += 1

    def _start_log(self) -> None:
        tmp = self.log_path.with_name(self.log_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"edge-agent part v1 {self.entry.size} {self.chunk}\n".encode())
            os.replace(tmp, self.log_path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self._log_fd = fd

    def length(self, index: int) -> int:
        return min(self.chunk, self.entry.size - index * self.chunk)

    def held_bytes(self) -> int:
        return self.held

    def write(self, index: int, data: bytes, claim: str | None = None) -> None:
        """Store chunk `index` and record it (with the chunk_sha256 its reply claimed)."""
        try:
            os.pwrite(self.fd, data, index * self.chunk)
            os.write(self._log_fd, f"{index} {claim or '-'}\n".encode())
        except OSError as exc:  # ENOSPC, EIO: kept what is recorded, the rest comes again
            raise OtaError(f"transfer: cannot write {self.part}: {exc}") from exc
        self.have.add(index)
        self.fresh.add(index)
        self.claims[index] = claim
        self.held += len(data)
        if index == self._prefix:
            self._hash_to(index * self.chunk)  # chunks held from an earlier run
            self._hash.update(data)
            self._hashed += len(data)
            self._prefix += 1
            while self._prefix in self.have:
                self._prefix += 1
            self._hash_to(min(self._prefix * self.chunk, self.entry.size))  # early arrivals

    def suspects(self) -> list[int]:
        """Held chunks that fail the chunk_sha256 their reply claimed, or that were written
        without one (the HTTPS path); read back from the file."""
        bad = []
        for index in sorted(self.have):
            claim = self.claims.get(index)
            data = os.pread(self.fd, self.length(index), index * self.chunk)
            if claim is None or hashlib.sha256(data).hexdigest() != claim:
                bad.append(index)
        return bad

    def drop(self, indices: Sequence[int]) -> None:
        """Forget chunks (to fetch them again); the whole-file hash starts over, read back
        from the file as the prefix of held chunks grows again."""
        try:
            os.write(self._log_fd, "".join(f"{i} !\n" for i in indices).encode())
        except OSError as exc:
            raise OtaError(f"transfer: cannot write {self.log_path}: {exc}") from exc
        for index in indices:
            if index in self.have:
                self.have.discard(index)
                self.held -= self.length(index)
            self.claims.pop(index, None)
            self.fresh.discard(index)
        self._hash = hashlib.sha256()
        self._hashed = self._prefix = 0
        while self._prefix in self.have:
            self._prefix += 1

    def _hash_to(self, limit: int) -> None:
        """Feed the file's bytes [_hashed, limit) to the whole-file hash, read back."""
        while self._hashed < limit:
            block = os.pread(self.fd, min(1 << 20, limit - self._hashed), self._hashed)
            if not block:
                # Cut behind our back: the next attempt sees the wrong size and starts over.
                raise OtaError(f"transfer: {self.part.name} is shorter than its log says")
            self._hash.update(block)
            self._hashed += len(block)

    def close(self) -> None:
        """fdatasync the file (what `_finish` renames must be on disk first) and close; a
        failed sync is kept in `sync_error`, not raised (close runs on error paths too)."""
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            self.sync_error = exc
        finally:
            os.close(self.fd)
            os.close(self._log_fd)

    def digest(self) -> str:
        """The whole file's sha256: what the prefix hash did not reach is read."""
        hasher = self._hash.copy()
        with self.part.open("rb") as fh:
            fh.seek(self._hashed)
            for block in iter(lambda: fh.read(1 << 20), b""):
                hasher.update(block)
        return hasher.hexdigest()

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.log_path.unlink(missing_ok=True)


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
            record = read_chunk_log(self.store.downloads / f"{entry.sha256}.part.log")
            if record is not None and record[0] == entry.size:
                chunk = record[1]
                total += sum(min(chunk, entry.size - i * chunk) for i in record[2])
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
        """Fetch the missing chunks; while the whole file fails its sha256, drop the chunks
        that fail their own claimed hash and fetch those again. When every chunk matches
        its claim and the file still does not, the controller's copy is wrong: `_finish`
        refuses it."""
        for _round in range(_VERIFY_ROUNDS):
            self._fetch_missing(part, report, cancelled)
            if part.digest() == part.entry.sha256:
                return
            bad = part.suspects()
            if not bad:
                return
            log.warning(
                "%s fails its sha256: %d chunk(s) fail their chunk_sha256 and are asked again",
                part.entry.path,
                len(bad),
            )
            self.stats.bad_chunks += len(bad)
            self.stats.received -= sum(part.length(i) for i in bad if i in part.fresh)
            part.drop(bad)
            report(part.held_bytes())
        raise OtaError(
            f"transfer: {part.entry.path} still fails its sha256 after {_VERIFY_ROUNDS} rounds "
            "of fetching the chunks that failed their chunk_sha256"
        )

    def _fetch_missing(
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
        # again (on reconnect, after request_timeout_s, or from the chunk log on start).
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
        claim = props.get("chunk_sha256")
        if len(data) > part.length(index) or not claim:
            self.stats.bad_chunks += 1
            return None
        part.write(index, data, claim)  # the claim is checked only if the file fails
        self.stats.received += len(data)
        return index

    def _finish(self, part: PartFile) -> None:
        entry = part.entry
        if part.sync_error is not None:
            raise OtaError(f"transfer: cannot write {part.part}: {part.sync_error}")
        digest = part.digest()
        if digest != entry.sha256:
            part.discard()
            raise OtaError(
                f"sha256 mismatch: {entry.path} arrived as {digest[:16]}…, "
                f"the manifest says {entry.sha256[:16]}…"
            )
        os.replace(part.part, self.store.blob_path(entry.sha256))
        fsync_dir(self.store.blobs)
        part.log_path.unlink(missing_ok=True)
