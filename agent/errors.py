"""The daemon's errors, under the project's one root in `runtimes.errors`.

    EdgeAgentError                  (runtimes.errors) root: caught at the CLI and daemon edges
    ├── ConfigError                 (runtimes.errors) bad agent config: `file:line: field: problem`
    └── AgentError                  the daemon could not do something at run time
        ├── OutboxError             the outbox database cannot be opened or written (disk full)
        ├── LinkError               the MQTT link cannot be set up (TLS files, credentials)
        └── PayloadError            an inbound MQTT payload is not what its handler expects

sqlite3 and paho-mqtt errors are caught where they enter and re-raised as one of these,
with the path or topic and what was expected.
"""

from __future__ import annotations

from runtimes.errors import ConfigError, EdgeAgentError

__all__ = [
    "AgentError",
    "ConfigError",
    "EdgeAgentError",
    "LinkError",
    "OutboxError",
    "PayloadError",
]


class AgentError(EdgeAgentError):
    """The daemon failed at run time."""


class OutboxError(AgentError):
    """The outbox database cannot be opened, read or written."""


class LinkError(AgentError):
    """The MQTT link cannot be set up or used."""


class PayloadError(AgentError):
    """An inbound MQTT payload is malformed (not JSON, too large, wrong shape)."""
