"""Helpers for the OTA tests: a fleet home with a signing key, and signed packages made
from the bundled models (new name/version, optionally test vectors)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from fleet.cli_package import build_package, init_keys
from fleet.home import FleetHome
from models.signing import load_private_key
from models.zoo import BUNDLED_DIR

ONNX_FP32 = BUNDLED_DIR / "yolox-nano-onnx-fp32"
ONNX_INT8 = BUNDLED_DIR / "yolox-nano-onnx-int8"


def fleet_home(root: Path) -> FleetHome:
    home = FleetHome(root)
    init_keys(home)
    return home


def signed_package(
    home: FleetHome,
    dest: Path,
    version: str,
    *,
    source: Path = ONNX_FP32,
    name: str = "yolox-nano",
    vector: bool = False,
    **kwargs: Any,
) -> tuple[Path, dict[str, Any]]:
    """Copy a bundled package to `dest`, sign it as name@version; returns (dir, signed doc)."""
    shutil.copytree(source, dest)
    vectors: list[tuple[Path, list[Path]]] | None = None
    if vector:
        rng = np.random.default_rng(0)
        np.save(dest / "probe.npy", rng.random((1, 3, 416, 416), dtype=np.float32))
        vectors = [(dest / "probe.npy", [])]
    doc = build_package(
        dest, name=name, version=version, key_path=home.signing_key, test_vectors=vectors, **kwargs
    )
    return dest, doc


def signing_key(home: FleetHome) -> Any:
    return load_private_key(home.signing_key)


def agent_toml(
    broker_host: str,
    broker_port: int,
    state: Path,
    trust: Path,
    *,
    device: str = "ota-dev",
    model: str = "yolox-nano-onnx-fp32",
    realtime: bool = True,
    **ota: Any,
) -> str:
    """An agent config: one pipeline `cam` on the demo clip, fast OTA timings."""
    from models.zoo import SAMPLES_DIR

    settings = {
        "trusted_keys": [str(trust)],
        "chunk_bytes": 65536,
        "request_timeout_s": 2.0,
        "trial_s": 1.0,
        "trial_frames": 10,
        "validate_timeout_s": 60.0,
        **ota,
    }
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    return f"""
[device]
id = "{device}"
state_dir = "{state}"

[mqtt]
host = "{broker_host}"
port = {broker_port}
reconnect_min_s = 0.1
reconnect_max_s = 0.5

[telemetry]
interval_s = 1.0

[[pipelines]]
name = "cam"
source = "{SAMPLES_DIR / "demo.mp4"}"
model = "{model}"
conf = 0.3
realtime = {"true" if realtime else "false"}

[pipelines.runtime]
type = "onnx"
threads = 1

[ota]
{lines}
"""


class RunningAgent:
    """An Agent in this process (real link, pipelines, OTA), run() on a thread."""

    def __init__(self, config_path: Path) -> None:
        import threading

        from agent.config import load_config
        from agent.daemon import Agent

        self.agent = Agent(load_config(config_path), config_path)
        self.agent.start()
        self._thread = threading.Thread(target=self.agent.run, name="test-agent", daemon=True)
        self._thread.start()

    def ota(self) -> Any:
        """The OTA extension of this agent."""
        return next(e for e in self.agent.extensions if e.name == "ota")

    def pipe(self, name: str = "cam") -> Any:
        return self.agent.pipelines[name]

    def stop(self) -> None:
        self.agent.stop_event.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "agent did not stop"


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
