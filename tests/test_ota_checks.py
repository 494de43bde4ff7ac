"""The checks before use (agent/ota/verify.py) and the trial verdicts (agent/ota/trial.py)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from agent.config import OtaConfig
from agent.ota.state import OtaError
from agent.ota.trial import Snapshot, Trial
from agent.ota.verify import check_files, check_manifest, check_requirements, check_version, newer
from models.package import Manifest, read_manifest
from models.signing import generate_key, key_id, sign_document
from models.zoo import BUNDLED_DIR

SRC = BUNDLED_DIR / "yolox-nano-onnx-fp32"


@pytest.fixture(scope="module")
def signed() -> tuple[dict[str, Any], Any]:
    key = generate_key()
    doc = sign_document(json.loads((SRC / "model.json").read_text()), key)
    return doc, {key_id(key.public_key()): key.public_key()}


def test_versions() -> None:
    assert newer("1.10.0", "1.9.0") and newer("1.0.0", "1.0.0rc1") and not newer("1.0", "1.0.0")
    assert newer("2024.10-b", "2024.9-z") and not newer("0.1.0", "0.2.0")
    old = read_manifest(SRC)
    new = old.model_copy(update={"version": "0.2.0"})
    check_version(new, old, False)
    check_version(old, None, False)
    check_version(old.model_copy(update={"name": "other"}), new, False)
    with pytest.raises(OtaError, match=r"^downgrade: 0.1.0 <= 0.2.0$"):
        check_version(old, new, False)
    with pytest.raises(OtaError, match=r"downgrade: 0.1.0 <= 0.1.0"):
        check_version(old, old, False)
    check_version(old, new, True)


def test_manifest_checks(signed: tuple[dict[str, Any], Any]) -> None:
    doc, trusted = signed
    assert check_manifest(doc, trusted).name == "yolox-nano"
    with pytest.raises(OtaError, match=r"^unsigned:"):
        check_manifest({k: v for k, v in doc.items() if k != "signature"}, trusted)
    with pytest.raises(OtaError, match=r"^unknown_key:"):
        check_manifest(doc, {})
    with pytest.raises(OtaError, match=r"^bad_signature:"):
        check_manifest({**doc, "version": "9"}, trusted)
    key = generate_key()
    keys = {key_id(key.public_key()): key.public_key()}
    evil = copy.deepcopy(doc)
    evil["files"][0]["path"] = "../../etc/passwd"
    evil["model"] = "../../etc/passwd"
    with pytest.raises(OtaError, match="leaves the package"):
        check_manifest(sign_document(evil, key), keys)
    with pytest.raises(OtaError, match=r"^bad_manifest: task"):
        check_manifest(sign_document({**doc, "task": "dance"}, key), keys)


def test_requirements() -> None:
    m = read_manifest(SRC)
    check_requirements(m)
    with pytest.raises(OtaError, match="runs yolox models, not llm/"):
        check_requirements(m.model_copy(update={"task": "llm"}))
    with pytest.raises(OtaError, match=r"accelerator\(s\) \['edgetpu-x'\]"):
        check_requirements(
            m.model_copy(
                update={"hardware": m.hardware.model_copy(update={"accelerators": ["edgetpu-x"]})}
            )
        )
    with pytest.raises(OtaError, match="MB available"):
        check_requirements(
            m.model_copy(
                update={"hardware": m.hardware.model_copy(update={"min_memory_mb": 1 << 30})}
            )
        )


def test_files(tmp_path: Path) -> None:
    pkg = tmp_path / "p"
    shutil.copytree(SRC, pkg)
    manifest: Manifest = read_manifest(pkg)
    check_files(pkg, manifest)
    data = (pkg / "model.onnx").read_bytes()
    (pkg / "model.onnx").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(OtaError, match=r"^sha256 mismatch:"):
        check_files(pkg, manifest)
    (pkg / "model.onnx").write_bytes(data[:100])
    with pytest.raises(OtaError, match=r"^size mismatch:"):
        check_files(pkg, manifest)


class Pipe:
    """The counters a trial reads (a stand-in for a running pipeline in a unit test)."""

    def __init__(self, frames: int = 0, errors: int = 0, detections: int = 0, p95: float = 10):
        self.frames, self.errors, self.detections, self.p95 = frames, errors, detections, p95

    def stats(self) -> dict[str, Any]:
        return {"latency": {"infer": {"p95_ms": self.p95}}}


def test_trial_verdicts() -> None:
    cfg = OtaConfig(trial_s=5, trial_frames=20, trial_timeout_s=60, max_error_rate=0.1)
    base = Snapshot(frames=100, errors=0, detections=200, p95_ms=10.0)

    def trial(pipe: Pipe) -> Trial:
        t = Trial(cfg, base, started=0.0)
        t.start = Snapshot(0, 0, 0, 0.0)
        t.started = 0.0
        return t

    assert trial(Pipe(10, 0, 20)).check(Pipe(10, 0, 20), now=10).decision == "running"
    assert trial(Pipe()).check(Pipe(30, 0, 60), now=2).decision == "running"  # not 5 s yet
    assert trial(Pipe()).check(Pipe(30, 0, 60), now=6).decision == "commit"
    bad = trial(Pipe()).check(Pipe(20, 5, 40), now=1)
    assert bad.decision == "rollback" and bad.reason == "trial: error rate 0.20 above 0.1"
    slow = trial(Pipe()).check(Pipe(30, 0, 60, p95=31), now=6)
    assert slow.reason is not None and slow.reason.startswith("trial: p95 latency 31.0 ms")
    blind = trial(Pipe()).check(Pipe(30, 0, 0), now=6)
    assert blind.reason is not None and "0.00 detections per frame vs 2.00" in blind.reason
    stuck = trial(Pipe()).check(Pipe(3, 0, 6), now=61)
    assert stuck.reason == "trial: only 3 of 20 frames in 61 s"


def test_validation_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import numpy as np

    from agent.ota.validate import CRASH_ENV, validate_package
    from fleet.cli_package import build_package, init_keys
    from fleet.home import FleetHome

    home = FleetHome(tmp_path / "home")
    init_keys(home)
    pkg = tmp_path / "pkg"
    shutil.copytree(SRC, pkg)
    np.save(pkg / "in.npy", np.full((1, 3, 416, 416), 114.0, np.float32))
    build_package(
        pkg, name="n", version="1", key_path=home.signing_key, test_vectors=[(pkg / "in.npy", [])]
    )
    stop = threading.Event()
    result = validate_package(pkg, {"type": "tflite"}, ["circle"], 60, 5000, stop)
    assert result["ok"] and result["test_vectors"] == 1 and result["runtime"] == "onnx"
    with pytest.raises(OtaError, match=r"the pipeline's classes \['dog'\] are not in the model"):
        validate_package(pkg, None, ["dog"], 60, 5000, stop)
    with pytest.raises(OtaError, match=r"latency .* above the budget 0.001 ms"):
        validate_package(pkg, None, None, 60, 0.001, stop)
    monkeypatch.setenv(CRASH_ENV, "exit")
    with pytest.raises(OtaError, match="exited with code 7 and no result"):
        validate_package(pkg, None, None, 60, 5000, stop)
