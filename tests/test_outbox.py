"""Outbox: order, persisted sequence numbers, bounds by priority, crash safety, full disk."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.errors import OutboxError
from agent.outbox import Outbox, Priority

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "outbox.db"


def test_put_peek_ack_in_order(db: Path) -> None:
    with Outbox(db) as box:
        seqs = [box.put(f"t/{i}", f"p{i}", qos=i % 2, retain=i == 2) for i in range(5)]
        assert seqs == [1, 2, 3, 4, 5]
        batch = box.peek_batch(3)
        assert [m.seq for m in batch] == [1, 2, 3]
        assert batch[2].payload == b"p2" and batch[2].retain and batch[1].qos == 1
        assert [m.seq for m in box.peek_batch(10, after_seq=3)] == [4, 5]
        assert box.ack(2) is True and box.ack(2) is False
        assert [m.seq for m in box.peek_batch(10)] == [1, 3, 4, 5]
        assert len(box) == 4 and box.stats().bytes == 8


def test_correlation_data_is_kept(db: Path) -> None:
    with Outbox(db) as box:
        box.put("edge/d/reply/ping", b"{}", priority=Priority.CONTROL, correlation_data=b"\x00id")
        box.put("edge/d/events/a", b"{}")
    with Outbox(db) as box:
        first, second = box.peek_batch(2)
        assert first.correlation_data == b"\x00id" and first.priority is Priority.CONTROL
        assert second.correlation_data is None


def test_newer_schema_is_refused(db: Path) -> None:
    Outbox(db).close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(OutboxError, match="schema 99 is newer"):
        Outbox(db)


def test_wal_and_synchronous_modes(db: Path) -> None:
    with Outbox(db) as box:
        box.put("t", b"x")
        assert box._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert box._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    with Outbox(db, synchronous="full") as box:
        assert box._conn.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_sequence_survives_restart_even_when_empty(db: Path) -> None:
    with Outbox(db) as box:
        for i in range(3):
            box.put("t", str(i))
        for m in box.peek_batch(10):
            box.ack(m.seq)
        assert len(box) == 0
    with Outbox(db) as box:
        assert box.put("t", "after restart") == 4  # never reused, never reset
        assert box.stats().last_seq == 4


def test_bound_drops_telemetry_first_then_oldest_events(db: Path) -> None:
    with Outbox(db, max_messages=5) as box:
        box.put("tele", "t0", qos=0, priority=Priority.TELEMETRY)
        for i in range(3):
            box.put("ev", f"e{i}")
        box.put("tele", "t1", qos=0, priority=Priority.TELEMETRY)
        box.put("status", "c0", priority=Priority.CONTROL)  # 6th: oldest telemetry goes
        assert [m.payload for m in box.peek_batch(10)] == [b"e0", b"e1", b"e2", b"t1", b"c0"]
        box.put("ev", "e3")  # the last telemetry goes
        box.put("ev", "e4")  # no telemetry left: the oldest event goes
        assert [m.payload for m in box.peek_batch(10)] == [b"e1", b"e2", b"c0", b"e3", b"e4"]
        # A telemetry message into a queue full of events is itself the one dropped.
        assert box.put("tele", "t2", qos=0, priority=Priority.TELEMETRY) is None
        assert box.stats().dropped == {"telemetry": 3, "event": 1, "control": 0}
    with Outbox(db, max_messages=5) as box:  # the counts are persisted
        assert box.stats().dropped == {"telemetry": 3, "event": 1, "control": 0}


def test_byte_bound_and_a_message_larger_than_the_bound(db: Path) -> None:
    with Outbox(db, max_bytes=2000) as box:
        for _ in range(4):
            box.put("ev", b"x" * 500)
        box.put("ev", b"y" * 500)  # 2500 bytes: the oldest event goes
        stats = box.stats()
        assert (stats.messages, stats.bytes, stats.dropped["event"]) == (4, 2000, 1)
        # Bigger than the whole bound: dropped alone, the queue is left alone.
        assert box.put("ev", b"z" * 5000) is None
        assert box.stats().messages == 4 and box.stats().dropped["event"] == 2


def test_full_disk_raises_outbox_error_and_recovers(db: Path) -> None:
    with Outbox(db) as box:
        box.put("ev", b"first")
        pages = box._conn.execute("PRAGMA page_count").fetchone()[0]
        box._conn.execute(f"PRAGMA max_page_count = {pages + 1}")  # the "disk" is now full
        with pytest.raises(OutboxError, match="disk full"):
            for _ in range(100):
                box.put("ev", b"x" * 3000)
        stats = box.stats()
        assert stats.write_errors == 1
        assert stats.messages == len(box.peek_batch(1000)) >= 1  # in-memory totals stay true
        # The caller is not broken: reads and acks still work, and so do puts once there
        # is room again.
        for m in box.peek_batch(1000):
            box.ack(m.seq)
        box._conn.execute("PRAGMA max_page_count = 1000000")
        assert box.put("ev", b"after") is not None
        assert [m.payload for m in box.peek_batch(10)] == [b"after"]


def test_thread_safe_puts(db: Path) -> None:
    with Outbox(db) as box:
        seqs: list[int] = []
        lock = threading.Lock()

        def worker(n: int) -> None:
            for i in range(100):
                seq = box.put("ev", f"{n}-{i}")
                assert seq is not None
                with lock:
                    seqs.append(seq)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(seqs) == list(range(1, 401))
        assert len(box) == 400
        # Within one thread, order is kept.
        per_thread = [
            m.payload.decode() for m in box.peek_batch(400) if m.payload.startswith(b"2-")
        ]
        assert per_thread == [f"2-{i}" for i in range(100)]


CRASH = textwrap.dedent(
    """
    import os, sys
    from agent.outbox import Outbox
    box = Outbox(sys.argv[1])
    for i in range(200):
        box.put("ev", f"m{i}")
    print("put", flush=True)
    os.kill(os.getpid(), 9)  # no close(), no checkpoint: as a crash
    """
)


def test_put_is_durable_across_a_killed_process(db: Path) -> None:
    db.parent.mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, "-c", CRASH, str(db)], cwd=REPO, capture_output=True, check=False
    )
    assert proc.stdout.strip() == b"put" and proc.returncode == -9
    with Outbox(db) as box:
        assert [m.payload for m in box.peek_batch(1000)] == [f"m{i}".encode() for i in range(200)]
        assert box.put("ev", "next") == 201


def test_not_a_database_is_an_outbox_error(db: Path) -> None:
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(OutboxError, match="not a usable outbox database"):
        Outbox(db)


def test_unwritable_location_is_an_outbox_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutboxError, match="cannot open the outbox"):
        Outbox(blocker / "sub" / "outbox.db")


def test_closed_outbox_raises_outbox_error(db: Path) -> None:
    box = Outbox(db)
    box.close()
    box.close()  # idempotent
    with pytest.raises(OutboxError):
        box.put("ev", b"x")
    with pytest.raises(sqlite3.ProgrammingError):
        box._conn.execute("SELECT 1")


def test_from_config(tmp_path: Path) -> None:
    config = AgentConfig.model_validate(
        {
            "device": {"id": "d", "state_dir": str(tmp_path / "state")},
            "mqtt": {"host": "h"},
            "outbox": {"max_messages": 7, "synchronous": "full"},
        }
    )
    with Outbox.from_config(config) as box:
        assert box.path == tmp_path / "state" / "outbox.db" and box.max_messages == 7
        assert box._conn.execute("PRAGMA synchronous").fetchone()[0] == 2
