"""Validation of a staged package in a child process (`python -m agent.ota.validate`): load
with the target runtime, run a probe and the test vectors, check the YOLOX head and latency.

The parent (`validate_package`) survives whatever the child does: a crash, an exit, a hang
past the timeout (killed) are each a rejection with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

CRASH_ENV = "EDGE_AGENT_OTA_VALIDATE_CRASH"  # test hook: "segv", "exit" or "hang" in the child
_RESULT = "OTA-VALIDATE-RESULT "


# --- parent side -------------------------------------------------------------------------------


def validate_package(
    package_dir: Path,
    runtime: dict[str, Any] | None,
    classes: list[str] | None,
    timeout_s: float,
    budget_ms: float,
    stop: threading.Event,
) -> dict[str, Any]:
    """Run the child; its result dict on success, else OtaError with the reason."""
    from agent.ota.state import OtaError

    args = [
        sys.executable,
        "-m",
        "agent.ota.validate",
        str(package_dir),
        "--budget-ms",
        str(budget_ms),
        "--runtime",
        json.dumps(runtime),
        "--classes",
        json.dumps(classes),
    ]
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    child = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    try:
        while child.poll() is None:
            if stop.is_set():
                raise OtaError("validation: the agent is stopping")
            if time.monotonic() > deadline:
                raise OtaError(f"validation: no result within {timeout_s:g} s (hung); killed")
            time.sleep(0.05)
        out, err = child.communicate()
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    code = child.returncode
    result: dict[str, Any] | None = None
    for line in out.decode(errors="replace").splitlines():
        if line.startswith(_RESULT):
            result = json.loads(line[len(_RESULT) :])
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        raise OtaError(f"validation: the child crashed ({name})")
    if result is None:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise OtaError(f"validation: the child exited with code {code} and no result: {tail[0]}")
    if not result.get("ok"):
        raise OtaError(f"validation: {result.get('reason')}")
    return result


# --- child side ----------------------------------------------------------------------------


def _watch_parent() -> None:
    """End when the agent that started us is gone (so a killed agent leaves no child)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def _options(runtime: dict[str, Any] | None) -> Any:
    from runtimes.base import DelegateSpec, RuntimeOptions

    if not runtime:
        return RuntimeOptions()
    values = dict(runtime)
    values["delegates"] = tuple(DelegateSpec(**d) for d in values.get("delegates", ()))
    if values.get("providers") is not None:
        values["providers"] = tuple(values["providers"])
    return RuntimeOptions(**values)


def _check(
    package: Path, runtime: dict[str, Any] | None, classes: list[str] | None, budget_ms: float
) -> dict[str, Any]:
    from models.package import read_manifest
    from models.yolox.detector import YoloxDetector
    from models.yolox.postprocess import anchor_grid
    from runtimes.registry import load

    manifest = read_manifest(package)
    kind = (runtime or {}).get("type")
    options = _options({k: v for k, v in (runtime or {}).items() if k != "type"})
    use = manifest.runtime if kind != manifest.runtime else kind
    if kind is not None and kind != manifest.runtime:
        from runtimes.base import RuntimeOptions

        options = RuntimeOptions()
    detector = YoloxDetector.from_ref(package, runtime=use, options=options)
    try:
        shape = detector.output_info.shape
        if shape[-1] is not None and shape[-1] != 5 + len(detector.class_names):
            return {
                "ok": False,
                "reason": f"output {list(shape)} does not fit {len(detector.class_names)} classes",
            }
        missing = [c for c in classes or [] if c not in detector.class_names]
        if missing:
            return {"ok": False, "reason": f"the pipeline's classes {missing} are not in the model"}
        rng = np.random.default_rng(0)
        frame = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            ratio = detector.preprocess(frame)
            raw = detector.forward()
            detector.postprocess(raw, ratio, (480, 640))
            times.append(time.perf_counter() - t0)
        anchors = len(anchor_grid(detector.height, detector.width, detector.strides)[0])
        if raw.shape != (anchors, 5 + len(detector.class_names)):
            return {
                "ok": False,
                "reason": f"YOLOX head {list(raw.shape)}, expected "
                f"[{anchors}, {5 + len(detector.class_names)}]",
            }
        if not np.isfinite(raw).all():
            return {"ok": False, "reason": "the probe output has NaN or infinite values"}
        latency = min(times) * 1e3
        if latency > budget_ms:
            return {
                "ok": False,
                "reason": f"latency {latency:.1f} ms above the budget {budget_ms:g} ms",
            }
    finally:
        detector.close()
    vectors = []
    if manifest.test_vectors:
        rt = load(package / manifest.model, use, options)
        try:
            for i, vector in enumerate(manifest.test_vectors):
                feed = np.load(package / vector.input, allow_pickle=False)
                got = rt.run([feed])
                if len(got) != len(vector.outputs):
                    return {
                        "ok": False,
                        "reason": f"test vector {i}: {len(got)} outputs, "
                        f"expected {len(vector.outputs)}",
                    }
                for o, name in enumerate(vector.outputs):
                    want = np.load(package / name, allow_pickle=False)
                    have = np.asarray(got[o], dtype=np.float64)
                    if have.shape != want.shape:
                        return {
                            "ok": False,
                            "reason": f"test vector {i} output {o}: shape "
                            f"{list(have.shape)}, expected {list(want.shape)}",
                        }
                    off = float(np.max(np.abs(have - want))) if have.size else 0.0
                    if not np.allclose(have, want, atol=vector.atol, rtol=vector.rtol):
                        return {
                            "ok": False,
                            "reason": f"test vector {i} output {o} off by {off:.3g}",
                        }
                vectors.append(i)
        finally:
            rt.close()
    return {
        "ok": True,
        "latency_ms": round(latency, 3),
        "classes": detector.class_names,
        "runtime": use,
        "test_vectors": len(vectors),
        "input": {**asdict(detector.input_info), "dtype": str(detector.input_info.dtype)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.ota.validate")
    parser.add_argument("package", type=Path)
    parser.add_argument("--budget-ms", type=float, default=1000.0)
    parser.add_argument("--runtime", default="null", help="runtime config as JSON")
    parser.add_argument("--classes", default="null", help="the pipeline's class filter, JSON")
    args = parser.parse_args(argv)
    _watch_parent()
    crash = os.environ.get(CRASH_ENV)
    if crash == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif crash == "exit":
        os._exit(7)
    elif crash == "hang":
        time.sleep(3600)
    try:
        result = _check(
            args.package, json.loads(args.runtime), json.loads(args.classes), args.budget_ms
        )
    except Exception as exc:  # every failure is a result the parent reports
        result = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"}
    print(_RESULT + json.dumps(result), flush=True)
    return 0 if result["ok"] else 2


if __name__ == "__main__":
    sys.exit(main())
