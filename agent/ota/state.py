"""The OTA state machine of one pipeline: the states, the transitions allowed from each, and
the record persisted (atomic write + fsync) before any step that cannot be undone.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from agent.atomic import write_atomically
from agent.errors import AgentError

log = logging.getLogger(__name__)


class OtaError(AgentError):
    """An OTA step failed; `reason` is the short cause reported (e.g. `bad_signature: …`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class OtaState(str, Enum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    VALIDATING = "validating"
    ACTIVATING = "activating"
    TRIAL = "trial"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    REJECTED = "rejected"


_S = OtaState
_SETTLED = (_S.IDLE, _S.COMMITTED, _S.ROLLED_BACK, _S.REJECTED)
# From each state, where it may go. A settled state may start a new update; any busy state
# may end in `rejected` (a check failed, or a newer desired state replaced the target).
TRANSITIONS: dict[OtaState, frozenset[OtaState]] = {
    **{s: frozenset({_S.DOWNLOADING, _S.REJECTED}) for s in _SETTLED},
    _S.DOWNLOADING: frozenset({_S.VERIFYING, _S.REJECTED, _S.DOWNLOADING}),
    # a restart in these resumes from the download (what is on disk is kept)
    _S.VERIFYING: frozenset({_S.VALIDATING, _S.REJECTED, _S.DOWNLOADING}),
    _S.VALIDATING: frozenset({_S.ACTIVATING, _S.REJECTED, _S.DOWNLOADING}),
    _S.ACTIVATING: frozenset({_S.TRIAL, _S.ROLLED_BACK, _S.REJECTED}),
    _S.TRIAL: frozenset({_S.COMMITTED, _S.ROLLED_BACK}),
}
BUSY = frozenset(s for s in OtaState if s not in _SETTLED)


def settled(state: OtaState) -> bool:
    return state not in BUSY


@dataclass
class Progress:
    bytes: int = 0
    total: int = 0
    percent: float = 0.0
    bytes_per_s: float = 0.0
    refetched_bytes: int = 0  # bytes received that were already on disk (duplicates)
    retries: int = 0  # chunk requests sent again after a timeout


@dataclass
class PipelineOta:
    """What one pipeline's OTA stands at; persisted as `<state_dir>/ota/<pipeline>.json`."""

    pipeline: str
    state: OtaState = OtaState.IDLE
    target: dict[str, Any] | None = None  # {name, version, package}
    revision: int | None = None  # the desired revision that asked for `target`
    reason: str | None = None
    updated_at: float = field(default_factory=time.time)
    trial_started_at: float | None = None
    progress: Progress = field(default_factory=Progress)
    # package id -> the desired revision at which it was rejected or rolled back: it is
    # tried again only for a higher revision
    refused: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PipelineOta:
        progress = Progress(**data.pop("progress", {}))
        state = OtaState(data.pop("state", "idle"))
        return cls(state=state, progress=progress, **data)


def transition(record: PipelineOta, to: OtaState, reason: str | None = None) -> None:
    """Move `record` to `to`, or raise OtaError for a transition the machine does not allow."""
    if to not in TRANSITIONS[record.state]:
        raise OtaError(f"internal: transition {record.state.value} -> {to.value} not allowed")
    record.state = to
    record.reason = reason
    record.updated_at = time.time()


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON to `path` crash-safely (temp file, fsync, rename, fsync the directory)."""
    write_atomically(path, json.dumps(data, indent=1, sort_keys=True), mode=0o644)


def read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing or unreadable (logged)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.error("%s: unreadable, ignored: %s", path, exc)
        return None


class StateFiles:
    """`<state_dir>/ota/`: one record per pipeline and the last accepted desired state."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "ota"

    def record_path(self, pipeline: str) -> Path:
        return self.root / f"{pipeline}.json"

    def load(self, pipeline: str) -> PipelineOta:
        data = read_json(self.record_path(pipeline))
        if isinstance(data, dict):
            try:
                return PipelineOta.from_json({**data, "pipeline": pipeline})
            except (TypeError, ValueError) as exc:
                log.error("OTA record of %s is damaged, starting idle: %s", pipeline, exc)
        return PipelineOta(pipeline)

    def save(self, record: PipelineOta) -> None:
        atomic_write_json(self.record_path(record.pipeline), record.to_json())

    @property
    def desired_path(self) -> Path:
        return self.root / "desired.json"

    def load_desired(self) -> dict[str, Any] | None:
        data = read_json(self.desired_path)
        return data if isinstance(data, dict) else None

    def save_desired(self, doc: dict[str, Any]) -> None:
        atomic_write_json(self.desired_path, doc)
