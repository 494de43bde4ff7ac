"""The outbox: every message the device sends, on SQLite (WAL), until the broker acks it.

Sequence numbers only grow, across restarts; past its bounds it drops telemetry first.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from types import TracebackType
from typing import Literal

from agent.config import AgentConfig
from agent.errors import OutboxError

__all__ = ["Outbox", "OutboxMessage", "OutboxStats", "Priority"]

log = logging.getLogger(__name__)

# Durability: journal_mode=WAL with synchronous=NORMAL commits each put() to the WAL file
# before put() returns, so a message survives the agent crashing or being killed. Only a
# power cut or kernel crash can lose the last commits, because NORMAL syncs the WAL at
# checkpoints, not per commit; synchronous="full" (an fsync per put) closes that gap at the
# cost of SD-card write latency. AUTOINCREMENT keeps sequence numbers growing even after
# every row was acked, because SQLite remembers the high-water mark in sqlite_sequence.
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    topic    TEXT    NOT NULL,
    payload  BLOB    NOT NULL,
    qos      INTEGER NOT NULL,
    retain   INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    created  REAL    NOT NULL,
    correlation BLOB            -- MQTT 5 correlation data of a command reply, else NULL
);
CREATE INDEX IF NOT EXISTS messages_by_priority ON messages (priority, seq);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


class Priority(IntEnum):
    """Which messages the bound drops first: the lowest priority, then the oldest."""

    TELEMETRY = 0
    EVENT = 1
    CONTROL = 2  # status, reported state, command replies


@dataclass(frozen=True)
class OutboxMessage:
    """One queued message and the sequence number it got when it was put."""

    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    priority: Priority
    created: float
    correlation_data: bytes | None = None


@dataclass(frozen=True)
class OutboxStats:
    """What the outbox holds and what it had to give up (dropped is persisted)."""

    messages: int
    bytes: int
    last_seq: int
    dropped: dict[str, int]
    write_errors: int


class Outbox:
    """A durable, bounded FIFO of outgoing MQTT messages; safe to share between threads.

    put() from any thread; the MQTT link's sender calls peek_batch() and ack(). One
    connection guarded by a lock: SQLite serialises writers anyway.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_messages: int = 100_000,
        max_bytes: int = 64 << 20,
        synchronous: Literal["normal", "full"] = "normal",
    ) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("max_messages and max_bytes must be positive")
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._write_errors = 0
        self._drop_logged: set[str] = set()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10.0
            )
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"{self.path}: cannot open the outbox: {exc}") from exc
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise OutboxError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
            self._conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._conn.executescript(_SCHEMA)
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise OutboxError(
                    f"{self.path}: outbox schema {version} is newer than this agent's"
                    f" ({_SCHEMA_VERSION}); move the file aside or upgrade the agent"
                )
            self._conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            self._count, self._bytes = self._totals()
        except sqlite3.Error as exc:
            self._conn.close()
            raise OutboxError(f"{self.path}: not a usable outbox database: {exc}") from exc
        except OutboxError:
            self._conn.close()
            raise

    @classmethod
    def from_config(cls, config: AgentConfig) -> Outbox:
        """The outbox an agent config describes ([outbox], default under state_dir)."""
        return cls(
            config.outbox_path,
            max_messages=config.outbox.max_messages,
            max_bytes=config.outbox.max_bytes,
            synchronous=config.outbox.synchronous,
        )

    def put(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        priority: Priority = Priority.EVENT,
        correlation_data: bytes | None = None,
    ) -> int | None:
        """Queue a message durably; its sequence number, or None if the bound dropped it.

        Raises OutboxError when the database cannot be written (disk full, I/O error);
        the outbox stays usable and counts the failure in `stats().write_errors`.
        """
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {qos}")
        data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    seq, self._count, self._bytes = self._insert(
                        topic, data, qos, retain, priority, correlation_data
                    )
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:  # SQLite may have rolled back already
                        self._conn.execute("ROLLBACK")
                    raise
            except (sqlite3.Error, OSError) as exc:
                self._write_errors += 1
                self._recount()
                hint = (
                    " (disk full, or the database at its size limit)" if "full" in str(exc) else ""
                )
                raise OutboxError(
                    f"{self.path}: cannot queue a message for {topic}: {exc}{hint}"
                ) from exc
        return seq

    def _insert(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        priority: Priority,
        correlation: bytes | None,
    ) -> tuple[int | None, int, int]:
        """Insert, then drop the lowest-priority, oldest rows until the bounds hold."""
        if len(data) > self.max_bytes:  # would empty the queue and still not fit
            self._count_drop(priority, f"a {len(data)}-byte message for {topic} > max_bytes")
            return None, self._count, self._bytes
        seq = self._conn.execute(
            "INSERT INTO messages (topic, payload, qos, retain, priority, created, correlation)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (topic, data, qos, int(retain), int(priority), time.time(), correlation),
        ).lastrowid
        count, size = self._count + 1, self._bytes + len(data)
        kept = True
        while count > self.max_messages or size > self.max_bytes:
            victim, victim_size, victim_priority = self._conn.execute(
                "SELECT seq, LENGTH(payload), priority FROM messages ORDER BY priority, seq LIMIT 1"
            ).fetchone()
            self._conn.execute("DELETE FROM messages WHERE seq = ?", (victim,))
            self._count_drop(Priority(victim_priority), f"message {victim}: outbox full")
            count, size = count - 1, size - victim_size
            kept = kept and victim != seq
        return (seq if kept else None), count, size

    def _count_drop(self, priority: Priority, why: str) -> None:
        name = priority.name.lower()
        if name not in self._drop_logged:  # once per priority and run; stats() has the counts
            self._drop_logged.add(name)
            log.warning("outbox %s: dropping %s messages (%s)", self.path, name, why)
        self._conn.execute(
            "INSERT INTO counters (name, value) VALUES (?, 1)"
            " ON CONFLICT (name) DO UPDATE SET value = value + 1",
            (f"dropped.{name}",),
        )

    def _recount(self) -> None:
        """After a failed write: the in-memory totals from the table again."""
        try:
            self._count, self._bytes = self._totals()
        except sqlite3.Error:
            log.exception("outbox %s: cannot recount after a failed write", self.path)

    def _totals(self) -> tuple[int, int]:
        count, size = self._conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages"
        ).fetchone()
        return int(count), int(size)

    def peek_batch(self, n: int, after_seq: int = 0) -> list[OutboxMessage]:
        """Up to `n` messages with seq > after_seq, oldest first; nothing is removed."""
        with self._lock:
            try:
                rows = self._conn.execute(
                    "SELECT seq, topic, payload, qos, retain, priority, created, correlation"
                    " FROM messages WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after_seq, n),
                ).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(f"{self.path}: cannot read the outbox: {exc}") from exc
        return [
            OutboxMessage(
                seq,
                topic,
                bytes(payload),
                qos,
                bool(retain),
                Priority(prio),
                created,
                bytes(corr) if corr is not None else None,
            )
            for seq, topic, payload, qos, retain, prio, created, corr in rows
        ]

    def ack(self, seq: int) -> bool:
        """Remove a message the broker acknowledged; False if it was already gone."""
        with self._lock:
            try:
                # No DELETE ... RETURNING: Debian bullseye ships SQLite 3.34.
                row = self._conn.execute(
                    "SELECT LENGTH(payload) FROM messages WHERE seq = ?", (seq,)
                ).fetchone()
                if row is not None:
                    self._conn.execute("DELETE FROM messages WHERE seq = ?", (seq,))
            except sqlite3.Error as exc:
                self._write_errors += 1
                raise OutboxError(f"{self.path}: cannot remove acked message {seq}: {exc}") from exc
            if row is None:
                return False
            self._count -= 1
            self._bytes -= row[0]
        return True

    def __len__(self) -> int:
        with self._lock:
            return int(self._count)

    def stats(self) -> OutboxStats:
        """Counts for telemetry: what is queued, what was dropped per priority, write errors."""
        with self._lock:
            try:
                counters = dict(self._conn.execute("SELECT name, value FROM counters").fetchall())
                row = self._conn.execute(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'messages'"
                ).fetchone()
            except sqlite3.Error as exc:
                raise OutboxError(f"{self.path}: cannot read outbox counters: {exc}") from exc
            dropped = {
                p.name.lower(): int(counters.get(f"dropped.{p.name.lower()}", 0)) for p in Priority
            }
            return OutboxStats(
                messages=int(self._count),
                bytes=int(self._bytes),
                last_seq=int(row[0]) if row else 0,
                dropped=dropped,
                write_errors=self._write_errors,
            )

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
