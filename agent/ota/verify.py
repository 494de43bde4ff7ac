"""The checks before a package is used: signature by a trusted key, the manifest's shape,
version against what runs, hardware and runtime requirements, every file's sha256 and size.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from packaging.version import InvalidVersion, Version
from pydantic import ValidationError

from agent.config import AgentConfig
from agent.ota.state import OtaError
from models.package import Manifest, verify_files
from models.signing import SignatureError, load_trusted_keys, verify_document
from runtimes.errors import PackageError
from runtimes.hardware import onnx_report, tflite_report


def trusted_keys(config: AgentConfig) -> dict[str, Ed25519PublicKey]:
    """`<state_dir>/trust/*.pub` and `[ota] trusted_keys`, by key id."""
    try:
        return load_trusted_keys(config.device.state_dir / "trust", *config.ota.trusted_keys)
    except PackageError as exc:
        raise OtaError(f"trust: {exc}") from exc


def check_manifest(doc: dict[str, Any], trusted: dict[str, Ed25519PublicKey]) -> Manifest:
    """The signature first (by a trusted key, over the verbatim document), then the shape."""
    try:
        verify_document(doc, trusted, "model.json")
    except SignatureError as exc:
        raise OtaError(f"{exc.reason}: {exc}") from exc
    try:
        manifest = Manifest.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise OtaError(f"bad_manifest: {where}: {first['msg']}") from exc
    listed = {f.path for f in manifest.files}
    if manifest.model not in listed:
        raise OtaError(f"bad_manifest: model {manifest.model!r} is not listed in files")
    for entry in manifest.files:
        parts = Path(entry.path).parts
        if Path(entry.path).is_absolute() or ".." in parts or not parts:
            raise OtaError(f"bad_manifest: file path {entry.path!r} leaves the package")
    for vector in manifest.test_vectors:
        for name in (vector.input, *vector.outputs):
            if name not in listed:
                raise OtaError(f"bad_manifest: test vector file {name!r} is not in files")
    return manifest


def newer(candidate: str, installed: str) -> bool:
    """PEP 440 order when both parse, else dotted parts (numbers as numbers)."""
    try:
        return Version(candidate) > Version(installed)
    except InvalidVersion:
        pass

    def key(text: str) -> list[tuple[int, int, str]]:
        return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.+-]", text)]

    return key(candidate) > key(installed)


def check_version(manifest: Manifest, installed: Manifest | None, allow_downgrade: bool) -> None:
    """Only a higher version of the same model name, unless the desired state allows less."""
    if installed is None or installed.name != manifest.name or allow_downgrade:
        return
    if not newer(manifest.version, installed.version):
        raise OtaError(f"downgrade: {manifest.version} <= {installed.version}")


@functools.lru_cache(maxsize=1)
def _available() -> tuple[frozenset[str], frozenset[str]]:
    """Runtimes that import here, and accelerators we can see (ONNX providers, delegates)."""
    runtimes: set[str] = set()
    accelerators: set[str] = {"cpu"}
    onnx = onnx_report()
    if onnx.error is None:
        runtimes.add("onnx")
        providers = onnx.detail.get("providers", [])
        if "TensorrtExecutionProvider" in providers:
            runtimes.add("tensorrt")
            accelerators.add("tensorrt")
        if "CUDAExecutionProvider" in providers:
            accelerators.add("cuda")
        if "OpenVINOExecutionProvider" in providers:
            accelerators.add("openvino")
    tflite = tflite_report()
    if tflite.error is None:
        runtimes.add("tflite")
        for kind, ok in tflite.detail.get("delegates", {}).items():
            if ok:
                accelerators.add(kind)
    return frozenset(runtimes), frozenset(accelerators)


def _mem_available_mb() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return None


def check_requirements(manifest: Manifest) -> None:
    """A YOLOX detection model, a runtime that is installed, the accelerators and memory."""
    if manifest.task != "detection" or manifest.family != "yolox":
        raise OtaError(
            f"requirements: a detection pipeline runs yolox models, not "
            f"{manifest.task}/{manifest.family}"
        )
    runtimes, accelerators = _available()
    if manifest.runtime not in runtimes:
        raise OtaError(f"requirements: runtime {manifest.runtime} is not installed here")
    lacking = [a for a in manifest.hardware.accelerators if a.lower() not in accelerators]
    if lacking:
        raise OtaError(
            f"requirements: needs accelerator(s) {lacking}; this device has {sorted(accelerators)}"
        )
    free = _mem_available_mb()
    if free is not None and manifest.hardware.min_memory_mb > free:
        raise OtaError(
            f"requirements: needs {manifest.hardware.min_memory_mb} MB, {free} MB available"
        )


def check_files(directory: Path, manifest: Manifest) -> None:
    """Every file's size and sha256 in the staged package."""
    try:
        verify_files(directory, manifest)
    except PackageError as exc:
        text = str(exc)
        kind = "size mismatch" if " size " in text else "sha256 mismatch"
        raise OtaError(f"{kind}: {text}") from exc
