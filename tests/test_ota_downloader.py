"""The chunked, resumable download (agent/ota/downloader.py) against a stand-in controller
that answers each request at once, as BlobServer would (unit test: no broker)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import OtaConfig
from agent.mqtt_inbound import InboundMessage
from agent.ota.downloader import Cancelled, Downloader, read_chunk_log
from agent.ota.state import OtaError
from agent.ota.store import ModelStore
from models.package import FileEntry

CHUNK = 4096


class Controller:
    """Answers blob/get like BlobServer; `tamper(index, payload)` may change a reply."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.requests: list[tuple[int, int]] = []  # (offset, length) of each chunk asked for
        self.messages = 0  # request messages (a run of chunks is one)
        self.downloader: Downloader | None = None
        self.tamper: Callable[[int, bytes], bytes | None] = lambda _i, data: data
        self.duplicate: set[int] = set()  # chunks whose reply comes twice (QoS 1 redelivery)

    def publish_volatile(self, topic: str, payload: bytes | str, **kw: Any) -> bool:
        body = json.loads(payload)
        sha, offset, length = body["sha256"], body["offset"], body["length"]
        self.messages += 1
        for k in range(body.get("chunks", 1)):
            if not self._answer(topic, sha, offset + k * length, length, kw):
                break
        return True

    def _answer(self, topic: str, sha: str, offset: int, length: int, kw: Any) -> bool:
        self.requests.append((offset, length))
        blob = self.blobs[sha]
        props = {"sha256": sha, "offset": str(offset)}
        if offset >= len(blob):
            props["error"] = "bad_range"
            data = b""
        else:
            data = blob[offset : offset + length]
            props["chunk_sha256"] = hashlib.sha256(data).hexdigest()
        tampered = self.tamper(offset // CHUNK, data)
        copies = 2 if offset // CHUNK in self.duplicate else 1
        for _ in range(copies if tampered is not None and self.downloader else 0):
            assert self.downloader is not None and tampered is not None
            self.downloader.on_data(
                InboundMessage(
                    topic,
                    tampered,
                    1,
                    False,
                    correlation_data=kw.get("correlation_data"),
                    user_properties=tuple(props.items()),
                )
            )
        return len(data) == length


def setup(tmp_path: Path, data: bytes, **cfg: Any) -> tuple[Controller, Downloader, FileEntry]:
    sha = hashlib.sha256(data).hexdigest()
    ctl = Controller({sha: data})
    store = ModelStore(tmp_path).ensure()
    config = OtaConfig(chunk_bytes=CHUNK, window=4, request_timeout_s=0.2, **cfg)
    dl = Downloader(ctl, "dev", store, config, connected=lambda: True)
    ctl.downloader = dl
    return ctl, dl, FileEntry(path="m.bin", sha256=sha, size=len(data))


def held_in_log(part: Path) -> list[int]:
    """The chunks a `.part` file's log records as held."""
    record = read_chunk_log(part.with_name(part.name + ".log"))
    assert record is not None
    return sorted(record[2])


def fetch_part_way(tmp_path: Path, data: bytes, reports: int) -> tuple[FileEntry, Path]:
    """Start fetching `data` and cancel after `reports` progress reports; the entry and
    the `.part` file left behind."""
    _ctl, dl, entry = setup(tmp_path, data)
    seen: list[int] = []
    with pytest.raises(Cancelled):
        dl.fetch([entry], lambda held, _t, _n: seen.append(held), lambda: len(seen) > reports)
    return entry, tmp_path / "models/downloads" / f"{entry.sha256}.part"


def test_fetches_checks_and_resumes(tmp_path: Path) -> None:
    data = os.urandom(25 * CHUNK + 100)
    _ctl, dl, entry = setup(tmp_path, data)
    seen: list[tuple[int, int]] = []
    with pytest.raises(Cancelled):
        dl.fetch(
            [entry], lambda held, total, _n: seen.append((held, total)), lambda: len(seen) > 10
        )
    record = read_chunk_log(tmp_path / "models/downloads" / f"{entry.sha256}.part.log")
    assert record is not None
    size, chunk, claims = record
    have = set(claims)
    assert len(have) >= 10 and (size, chunk) == (len(data), CHUNK)
    # every recorded chunk carries the hash its reply claimed, and matches it
    for i in have:
        assert claims[i] == hashlib.sha256(data[i * CHUNK : (i + 1) * CHUNK]).hexdigest()
    assert dl.held([entry]) == len(have) * CHUNK
    # a new agent (new downloader) asks only for what is missing
    ctl2, dl2, _ = setup(tmp_path, data)
    progress: list[int] = []
    dl2.fetch([entry], lambda held, _t, _n: progress.append(held), lambda: False)
    assert {o // CHUNK for o, _ in ctl2.requests} == set(range(26)) - have
    assert (tmp_path / "models/blobs" / entry.sha256).read_bytes() == data
    assert progress[-1] == len(data) and ctl2.requests[-1][1] in (CHUNK, 100)
    assert not list((tmp_path / "models/downloads").iterdir())
    dl2.fetch([entry], lambda *_a: None, lambda: False)  # complete already: nothing asked
    assert len(ctl2.requests) == 26 - len(have)


def test_asks_for_runs_of_chunks(tmp_path: Path) -> None:
    data = os.urandom(40 * CHUNK + 7)
    ctl, dl, entry = setup(tmp_path, data)  # window 4: runs of up to 2-4 chunks
    dl.fetch([entry], lambda *_a: None, lambda: False)
    assert (tmp_path / "models/blobs" / entry.sha256).read_bytes() == data
    assert sorted(o for o, _ in ctl.requests) == [i * CHUNK for i in range(41)]
    assert ctl.messages <= 21 and dl.stats.retries == 0


def test_bad_chunks_are_asked_again_and_duplicates_counted(tmp_path: Path) -> None:
    data = os.urandom(8 * CHUNK)
    ctl, dl, entry = setup(tmp_path, data)
    spoiled: set[int] = set()

    def tamper(index: int, payload: bytes) -> bytes | None:
        if index == 2 and index not in spoiled:
            spoiled.add(index)
            return b"x" * len(payload)  # fails its chunk_sha256
        if index == 5 and len(spoiled) == 1:
            spoiled.add(99)
            return None  # lost: asked again after the timeout
        return payload

    ctl.tamper = tamper
    ctl.duplicate = {3}
    dl.fetch([entry], lambda *_a: None, lambda: False)
    assert (tmp_path / "models/blobs" / entry.sha256).read_bytes() == data
    assert dl.stats.bad_chunks == 1 and dl.stats.retries >= 1
    assert dl.stats.refetched == CHUNK and dl.stats.received == len(data)


def test_truncated_and_tampered_files_are_refused(tmp_path: Path) -> None:
    data = os.urandom(6 * CHUNK)
    ctl, dl, entry = setup(tmp_path / "a", data)
    ctl.blobs[entry.sha256] = data[: 3 * CHUNK + 10]
    with pytest.raises(OtaError, match=r"^truncated: m.bin"):
        dl.fetch([entry], lambda *_a: None, lambda: False)
    assert not list((tmp_path / "a/models/downloads").iterdir())
    ctl, dl, entry = setup(tmp_path / "b", data)
    ctl.blobs[entry.sha256] = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(OtaError, match=r"^sha256 mismatch: m.bin"):
        dl.fetch([entry], lambda *_a: None, lambda: False)
    assert not (tmp_path / "b/models/blobs" / entry.sha256).exists()
    ctl, dl, entry = setup(tmp_path / "c", data, stall_timeout_s=0.5)
    ctl.tamper = lambda _i, _d: None
    with pytest.raises(OtaError, match=r"^transfer: no data for 0.5 s"):
        dl.fetch([entry], lambda *_a: None, lambda: False)


def test_part_file_cut_behind_our_back_is_fetched_again(tmp_path: Path) -> None:
    data = os.urandom(20 * CHUNK)
    entry, part = fetch_part_way(tmp_path, data, 10)
    assert len(held_in_log(part)) >= 4
    os.truncate(part, CHUNK)  # the log now names chunks the file does not hold
    ctl2, dl2, _ = setup(tmp_path, data)
    dl2.fetch([entry], lambda *_a: None, lambda: False)
    assert (tmp_path / "models/blobs" / entry.sha256).read_bytes() == data
    assert sorted(o for o, _ in ctl2.requests) == [i * CHUNK for i in range(20)]


def test_damaged_chunk_from_an_earlier_run_is_found_and_fetched_again(tmp_path: Path) -> None:
    data = os.urandom(20 * CHUNK)
    entry, part = fetch_part_way(tmp_path, data, 10)
    have = held_in_log(part)
    assert len(have) >= 4
    with part.open("r+b") as fh:  # a chunk the log names lost its bytes (a power cut)
        fh.seek(have[1] * CHUNK + 7)
        fh.write(b"\x00\xff")
    ctl2, dl2, _ = setup(tmp_path, data)
    dl2.fetch([entry], lambda *_a: None, lambda: False)
    assert (tmp_path / "models/blobs" / entry.sha256).read_bytes() == data
    # the file failed its sha256; only the chunk that fails its recorded claim came again
    asked = [o // CHUNK for o, _ in ctl2.requests]
    assert sorted(asked) == sorted([*(set(range(20)) - set(have)), have[1]])
    assert asked[-1] == have[1] and dl2.stats.bad_chunks == 1
    assert dl2.stats.received == (20 - len(have) + 1) * CHUNK  # this run's, the refetch too
    assert not list((tmp_path / "models/downloads").iterdir())


def test_torn_or_garbled_log_records_are_skipped(tmp_path: Path) -> None:
    data = os.urandom(10 * CHUNK)
    entry, part = fetch_part_way(tmp_path, data, 5)
    log = part.with_name(part.name + ".log")
    have = held_in_log(part)
    with log.open("ab") as fh:  # a zero-filled tail, a foreign line, a torn record
        fh.write(b"\0" * 40 + b"\n99 " + b"a" * 64 + b"\nnot a record\n9 abc")
    assert held_in_log(part) == have
    ctl2, dl2, _ = setup(tmp_path, data)
    dl2.fetch([entry], lambda *_a: None, lambda: False)
    assert (tmp_path / "models/blobs" / entry.sha256).read_bytes() == data
    assert {o // CHUNK for o, _ in ctl2.requests} == set(range(10)) - set(have)


def test_a_full_disk_is_a_clear_error_and_keeps_what_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(12 * CHUNK)
    _ctl, dl, entry = setup(tmp_path, data)
    real_pwrite = os.pwrite
    writes = [0]

    def pwrite(fd: int, payload: bytes, offset: int) -> int:
        writes[0] += 1
        if writes[0] > 5:
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, payload, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OtaError, match=r"^transfer: cannot write .*No space left on device"):
        dl.fetch([entry], lambda *_a: None, lambda: False)
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    have = held_in_log(tmp_path / "models/downloads" / f"{entry.sha256}.part")
    assert len(have) == 5
    ctl2, dl2, _ = setup(tmp_path, data)  # space freed: the rest comes, nothing twice
    dl2.fetch([entry], lambda *_a: None, lambda: False)
    assert (tmp_path / "models/blobs" / entry.sha256).read_bytes() == data
    assert {o // CHUNK for o, _ in ctl2.requests} == set(range(12)) - set(have)


def test_chunks_that_keep_failing_their_hash_end_the_transfer(tmp_path: Path) -> None:
    data = os.urandom(6 * CHUNK)
    ctl, dl, entry = setup(tmp_path, data)
    ctl.tamper = lambda i, d: b"y" * len(d) if i == 4 else d  # always damaged on the way
    with pytest.raises(OtaError, match=r"^transfer: m.bin still fails its sha256 after 3"):
        dl.fetch([entry], lambda *_a: None, lambda: False)
    assert dl.stats.bad_chunks == 3
    assert not (tmp_path / "models/blobs" / entry.sha256).exists()
