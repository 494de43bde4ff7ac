"""The controller's device registry: devices (status, reported, telemetry, tags), the last
desired document per device, rollouts and their per-device results. SQLite (WAL) by default.

The SQL is plain and portable (no SQLite-only syntax beyond the connection pragmas), behind
the `Registry` methods, so a PostgreSQL implementation can take its place.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtimes.errors import EdgeAgentError

SCHEMA_VERSION = 1

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS devices (
        id TEXT PRIMARY KEY, online INTEGER NOT NULL DEFAULT 0, last_seen REAL,
        agent_version TEXT, status TEXT, reported TEXT, telemetry TEXT, fps REAL,
        tags TEXT NOT NULL DEFAULT '[]', revoked INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS desired (
        device TEXT PRIMARY KEY, revision INTEGER NOT NULL, doc TEXT NOT NULL,
        published_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS rollouts (
        id INTEGER PRIMARY KEY, package TEXT NOT NULL, pipeline TEXT, selector TEXT NOT NULL,
        stages TEXT NOT NULL, max_failures INTEGER NOT NULL, device_timeout REAL NOT NULL,
        state TEXT NOT NULL, stage INTEGER NOT NULL DEFAULT 0, reason TEXT,
        created_at REAL NOT NULL, updated_at REAL NOT NULL, heartbeat REAL)""",
    """CREATE TABLE IF NOT EXISTS rollout_devices (
        rollout INTEGER NOT NULL, device TEXT NOT NULL, position INTEGER NOT NULL,
        stage INTEGER, previous TEXT, state TEXT NOT NULL, reason TEXT,
        started_at REAL, updated_at REAL, PRIMARY KEY (rollout, device))""",
)


class RegistryError(EdgeAgentError):
    """The registry cannot be opened, has a newer schema, or lacks what was asked for."""


@dataclass
class Device:
    """One device as the registry knows it."""

    id: str
    online: bool = False
    last_seen: float | None = None
    agent_version: str | None = None
    status: dict[str, Any] = field(default_factory=dict)
    reported: dict[str, Any] = field(default_factory=dict)
    telemetry: dict[str, Any] = field(default_factory=dict)
    fps: float | None = None
    tags: list[str] = field(default_factory=list)
    revoked: bool = False

    def pipelines(self) -> list[str]:
        names = set(self.reported.get("pipelines") or {})
        names |= set((self.reported.get("ota") or {}).get("pipelines") or {})
        return sorted(names)

    def models(self) -> dict[str, str]:
        """pipeline -> "name@version" running now (OTA's current first, then the label)."""
        out: dict[str, str] = {}
        for name, pipe in (self.reported.get("pipelines") or {}).items():
            if isinstance(pipe, dict) and pipe.get("model"):
                out[name] = str(pipe["model"])
        for name, ota in ((self.reported.get("ota") or {}).get("pipelines") or {}).items():
            cur = ota.get("current") if isinstance(ota, dict) else None
            if isinstance(cur, dict) and cur.get("name"):
                out[name] = f"{cur['name']}@{cur.get('version')}"
        return out

    def ota(self, pipeline: str) -> dict[str, Any]:
        pipes = (self.reported.get("ota") or {}).get("pipelines") or {}
        entry = pipes.get(pipeline)
        return entry if isinstance(entry, dict) else {}

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "online": self.online,
            "last_seen": self.last_seen,
            "agent_version": self.agent_version,
            "models": self.models(),
            "ota": {p: self.ota(p).get("state") for p in self.pipelines() if self.ota(p)},
            "fps": self.fps,
            "tags": self.tags,
            "revoked": self.revoked,
        }


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else {}


def fps_of(telemetry: dict[str, Any]) -> float | None:
    """The sum of the pipelines' fps in a telemetry message."""
    pipes = telemetry.get("pipelines")
    if not isinstance(pipes, dict):
        return None
    values = [p.get("fps") for p in pipes.values() if isinstance(p, dict)]
    nums = [float(v) for v in values if isinstance(v, (int, float))]
    return round(sum(nums), 2) if nums else None


class Registry:
    """One connection, shared by the MQTT worker and the main thread under a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, timeout=10.0, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise RegistryError(f"{path}: cannot open the registry: {exc}") from exc
        self._lock = threading.Lock()
        self._migrate()

    def _migrate(self) -> None:
        with self._lock, self._db:
            for stmt in _SCHEMA:
                self._db.execute(stmt)
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
                )
            elif int(row[0]) > SCHEMA_VERSION:
                raise RegistryError(
                    f"{self.path}: schema {row[0]} is newer than this edge-fleet "
                    f"({SCHEMA_VERSION}); upgrade edge-fleet"
                )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _exec(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock, self._db:
            return list(self._db.execute(sql, params).fetchall())

    def _ensure(self, device_id: str) -> None:
        self._exec("INSERT INTO devices (id) VALUES (?) ON CONFLICT (id) DO NOTHING", (device_id,))

    # --- devices, from the wire ------------------------------------------------------

    def update_status(self, device_id: str, body: dict[str, Any]) -> None:
        self._ensure(device_id)
        online = 1 if body.get("status") == "online" else 0
        self._exec(
            "UPDATE devices SET online = ?, status = ?, agent_version = COALESCE(?, "
            "agent_version), last_seen = ? WHERE id = ?",
            (online, json.dumps(body), body.get("version"), time.time(), device_id),
        )

    def update_reported(self, device_id: str, body: dict[str, Any]) -> None:
        self._ensure(device_id)
        version = body.get("agent_version")
        self._exec(
            "UPDATE devices SET reported = ?, agent_version = COALESCE(?, agent_version), "
            "last_seen = ? WHERE id = ?",
            (json.dumps(body), version, time.time(), device_id),
        )

    def update_telemetry(self, device_id: str, body: dict[str, Any]) -> None:
        self._ensure(device_id)
        self._exec(
            "UPDATE devices SET telemetry = ?, fps = ?, last_seen = ? WHERE id = ?",
            (json.dumps(body), fps_of(body), time.time(), device_id),
        )

    def set_tags(self, device_id: str, tags: list[str]) -> None:
        self._ensure(device_id)
        self._exec(
            "UPDATE devices SET tags = ? WHERE id = ?", (json.dumps(sorted(set(tags))), device_id)
        )

    def set_revoked(self, device_id: str, revoked: bool = True) -> None:
        self._ensure(device_id)
        self._exec("UPDATE devices SET revoked = ? WHERE id = ?", (int(revoked), device_id))

    def device(self, device_id: str) -> Device | None:
        rows = self._exec(_DEVICE_SELECT + " WHERE id = ?", (device_id,))
        return _device(rows[0]) if rows else None

    def devices(self) -> list[Device]:
        return [_device(r) for r in self._exec(_DEVICE_SELECT + " ORDER BY id")]

    # --- desired --------------------------------------------------------------------

    def desired(self, device_id: str) -> tuple[int, dict[str, Any]] | None:
        rows = self._exec("SELECT revision, doc FROM desired WHERE device = ?", (device_id,))
        return (int(rows[0][0]), json.loads(rows[0][1])) if rows else None

    def save_desired(self, device_id: str, revision: int, doc: dict[str, Any]) -> None:
        self._exec("DELETE FROM desired WHERE device = ?", (device_id,))
        self._exec(
            "INSERT INTO desired (device, revision, doc, published_at) VALUES (?, ?, ?, ?)",
            (device_id, revision, json.dumps(doc), time.time()),
        )

    # --- rollouts -------------------------------------------------------------------

    def create_rollout(
        self,
        package: str,
        pipeline: str | None,
        selector: str,
        stages: list[int],
        max_failures: int,
        device_timeout: float,
        devices: list[tuple[str, str | None]],
    ) -> int:
        """A new rollout over `devices` (id, previous package id) in that order."""
        now = time.time()
        with self._lock, self._db:
            cur = self._db.execute(
                "INSERT INTO rollouts (package, pipeline, selector, stages, max_failures, "
                "device_timeout, state, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, "
                "'running', ?, ?)",
                (
                    package,
                    pipeline,
                    selector,
                    json.dumps(stages),
                    max_failures,
                    device_timeout,
                    now,
                    now,
                ),
            )
            rid = int(cur.lastrowid or 0)
            for pos, (dev, prev) in enumerate(devices):
                self._db.execute(
                    "INSERT INTO rollout_devices (rollout, device, position, previous, state, "
                    "updated_at) VALUES (?, ?, ?, ?, 'waiting', ?)",
                    (rid, dev, pos, prev, now),
                )
        return rid

    def rollout(self, rollout_id: int) -> dict[str, Any]:
        rows = self._exec(_ROLLOUT_SELECT + " WHERE id = ?", (rollout_id,))
        if not rows:
            raise RegistryError(f"no rollout {rollout_id}")
        out = _rollout(rows[0])
        out["devices"] = [
            {
                "device": d,
                "position": p,
                "stage": s,
                "previous": prev,
                "state": st,
                "reason": why,
                "started_at": t0,
                "updated_at": t1,
            }
            for d, p, s, prev, st, why, t0, t1 in self._exec(
                "SELECT device, position, stage, previous, state, reason, started_at, "
                "updated_at FROM rollout_devices WHERE rollout = ? ORDER BY position",
                (rollout_id,),
            )
        ]
        return out

    def rollouts(self) -> list[dict[str, Any]]:
        return [_rollout(r) for r in self._exec(_ROLLOUT_SELECT + " ORDER BY id")]

    def set_rollout(self, rollout_id: int, **values: Any) -> None:
        allowed = {"state", "stage", "reason", "heartbeat"}
        if not values or set(values) - allowed:
            raise RegistryError(f"set_rollout: bad fields {sorted(values)}")
        cols = ", ".join(f"{k} = ?" for k in values)
        self._exec(
            f"UPDATE rollouts SET {cols}, updated_at = ? WHERE id = ?",
            (*values.values(), time.time(), rollout_id),
        )

    def claim_rollout(self, rollout_id: int, lease_s: float, now: float | None = None) -> bool:
        """Take the drive of a running rollout whose heartbeat is older than `lease_s` (or
        that never beat), in one UPDATE, so that two drivers cannot both win; True if won."""
        now = time.time() if now is None else now
        with self._lock, self._db:
            cur = self._db.execute(
                "UPDATE rollouts SET heartbeat = ?, updated_at = ? WHERE id = ? AND "
                "state = 'running' AND (heartbeat IS NULL OR heartbeat < ?)",
                (now, now, rollout_id, now - lease_s),
            )
            return cur.rowcount == 1

    def set_rollout_device(
        self,
        rollout_id: int,
        device: str,
        state: str,
        reason: str | None = None,
        stage: int | None = None,
    ) -> None:
        now = time.time()
        if stage is not None:
            self._exec(
                "UPDATE rollout_devices SET stage = ?, started_at = ? WHERE rollout = ? "
                "AND device = ?",
                (stage, now, rollout_id, device),
            )
        self._exec(
            "UPDATE rollout_devices SET state = ?, reason = ?, updated_at = ? "
            "WHERE rollout = ? AND device = ?",
            (state, reason, now, rollout_id, device),
        )


_DEVICE_SELECT = (
    "SELECT id, online, last_seen, agent_version, status, reported, telemetry, fps, tags, "
    "revoked FROM devices"
)
_ROLLOUT_SELECT = (
    "SELECT id, package, pipeline, selector, stages, max_failures, device_timeout, state, "
    "stage, reason, created_at, updated_at, heartbeat FROM rollouts"
)


def _device(row: tuple[Any, ...]) -> Device:
    return Device(
        id=row[0],
        online=bool(row[1]),
        last_seen=row[2],
        agent_version=row[3],
        status=_loads(row[4]),
        reported=_loads(row[5]),
        telemetry=_loads(row[6]),
        fps=row[7],
        tags=list(json.loads(row[8] or "[]")),
        revoked=bool(row[9]),
    )


def _rollout(row: tuple[Any, ...]) -> dict[str, Any]:
    keys = (
        "id",
        "package",
        "pipeline",
        "selector",
        "stages",
        "max_failures",
        "device_timeout",
        "state",
        "stage",
        "reason",
        "created_at",
        "updated_at",
        "heartbeat",
    )
    out = dict(zip(keys, row))
    out["stages"] = json.loads(out["stages"])
    return out
