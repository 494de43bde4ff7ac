"""Optional parts of the agent (OTA, LLM, diffusion, serial I/O) plug in here.

Each entry of `FACTORIES` names `module:function`; the function takes the `Agent` and returns
an `Extension`, or None when its config section is absent. The agent starts extensions after
its pipelines and link, stops them before the link (so their last messages still go out), and
merges their `reported()` and `telemetry()` under their `name`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from agent.daemon import Agent

FACTORIES: tuple[str, ...] = (
    "agent.ota.service:create",
    "agent.serial_ext:create",
    "agent.llm_service:create",
    "agent.diffusion_service:create",
)


class Extension(Protocol):
    name: str

    def start(self) -> None: ...

    def stop(self, timeout: float) -> bool:
        """Stop within `timeout` seconds; False if something did not stop."""
        ...

    def reported(self) -> dict[str, Any]: ...

    def telemetry(self) -> dict[str, Any]: ...


def load_extensions(agent: Agent, factories: tuple[str, ...] = FACTORIES) -> list[Extension]:
    found: list[Extension] = []
    for spec in factories:
        module, _, func = spec.partition(":")
        ext = getattr(importlib.import_module(module), func)(agent)
        if ext is not None:
            found.append(ext)
    return found
