"""Which backend loads a model: a dict from name to "module:Class", imported when chosen.

The backend is picked from the config when given, else from the file's suffix and
its first bytes.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import cast

from runtimes.base import Runtime, RuntimeOptions
from runtimes.errors import EdgeAgentError, ModelFormatError, ModelNotFound

BACKENDS: dict[str, str] = {
    "tflite": "runtimes.tflite:TFLiteRuntime",
    "onnx": "runtimes.onnx:OnnxRuntime",
}

SUFFIXES: dict[str, str] = {
    ".tflite": "tflite",
    ".lite": "tflite",
    ".onnx": "onnx",
}


def backend_for(path: Path, requested: str | None = None) -> str:
    """Name of the backend for `path`: `requested` if given, else by suffix or content."""
    if requested is not None:
        if requested not in BACKENDS:
            raise EdgeAgentError(
                f"unknown runtime {requested!r}; available: {', '.join(sorted(BACKENDS))}"
            )
        return requested
    if not path.exists():
        raise ModelNotFound(f"{path}: no such model file")
    by_suffix = SUFFIXES.get(path.suffix.lower())
    if by_suffix:
        return by_suffix
    with path.open("rb") as fh:
        head = fh.read(8)
    if head[4:8] == b"TFL3":
        return "tflite"
    if head[:1] == b"\x08":  # protobuf field 1 (ir_version), varint: how ONNX files begin
        return "onnx"
    raise ModelFormatError(
        f"{path}: cannot tell the model format (expected a .tflite or .onnx file); "
        f"name the runtime explicitly"
    )


def backend_class(name: str) -> type:
    module_name, _, class_name = BACKENDS[name].partition(":")
    module = importlib.import_module(module_name)
    return cast(type, getattr(module, class_name))


def load(
    path: str | Path, runtime: str | None = None, options: RuntimeOptions | None = None
) -> Runtime:
    """Load `path` with the chosen backend."""
    model_path = Path(path)
    name = backend_for(model_path, runtime)
    cls = backend_class(name)
    return cast(Runtime, cls(model_path, options or RuntimeOptions()))
