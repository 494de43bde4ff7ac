"""TFLite / LiteRT backend: ai-edge-litert's interpreter, else tflite-runtime's.

Threads, XNNPACK by default, EdgeTPU / GPU / external delegates, and (de)quantization
of int8/uint8 tensors with each tensor's own scale and zero point.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from runtimes.base import (
    DelegateSpec,
    RuntimeOptions,
    TensorInfo,
    check_shape,
    order_feeds,
)
from runtimes.errors import (
    BackendUnavailable,
    DelegateError,
    InputError,
    ModelFormatError,
    ModelNotFound,
)

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'edge-agent[tflite]'  (ai-edge-litert)"

# Default library names and where to get them, per delegate kind.
DELEGATE_LIBRARIES: dict[str, tuple[str, str]] = {
    "edgetpu": (
        "libedgetpu.so.1",
        "install the Edge TPU runtime: apt-get install libedgetpu1-std (Coral apt repository)",
    ),
    "gpu": (
        "libtensorflowlite_gpu_delegate.so",
        "build the TFLite GPU delegate for this board (bazel build "
        "//tensorflow/lite/delegates/gpu:libtensorflowlite_gpu_delegate.so) and give its path",
    ),
}

TFLITE_IDENTIFIER = b"TFL3"


def import_interpreter() -> tuple[ModuleType, str]:
    """Return (interpreter module, package name): ai-edge-litert first, tflite-runtime next."""
    errors: list[str] = []
    try:
        from ai_edge_litert import interpreter as litert

        return litert, "ai-edge-litert"
    except ImportError as exc:
        errors.append(f"ai-edge-litert: {exc}")
    try:
        from tflite_runtime import interpreter as legacy

        return legacy, "tflite-runtime"
    except (ImportError, AttributeError) as exc:
        # tflite-runtime 2.14 is built against NumPy 1.x and fails to import under 2.x.
        errors.append(f"tflite-runtime: {exc}")
    raise BackendUnavailable(
        "no TFLite interpreter is installed (" + "; ".join(errors) + f"). Install: {INSTALL_HINT}"
    )


def check_tflite_file(path: Path) -> bytes:
    """Read the file, checking it exists and carries the TFLite flatbuffer identifier."""
    if not path.exists():
        raise ModelNotFound(f"{path}: no such model file")
    if not path.is_file():
        raise ModelFormatError(f"{path}: is not a file")
    content = path.read_bytes()
    if len(content) < 8 or content[4:8] != TFLITE_IDENTIFIER:
        raise ModelFormatError(
            f"{path}: not a TFLite model (expected the flatbuffer identifier "
            f"{TFLITE_IDENTIFIER.decode()} at byte 4)"
        )
    return content


def _tensor_info(detail: Mapping[str, Any]) -> TensorInfo:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    fixed = [int(d) for d in detail["shape"]]
    signature = detail.get("shape_signature")
    shape: tuple[int | None, ...] = tuple(fixed)
    if signature is not None and len(signature) == len(fixed):
        shape = tuple(None if int(s) < 0 else d for s, d in zip(signature, fixed))
    quantized = bool(scale) and np.dtype(detail["dtype"]).kind in "iu"
    return TensorInfo(
        name=str(detail["name"]),
        shape=shape,
        dtype=np.dtype(detail["dtype"]),
        scale=float(scale) if quantized else None,
        zero_point=int(zero_point) if quantized else None,
    )


def quantize(values: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Float -> the tensor's integer type with its scale and zero point (round, saturate)."""
    assert info.scale is not None and info.zero_point is not None
    limits = np.iinfo(info.dtype)
    q = np.round(values.astype(np.float32, copy=False) / np.float32(info.scale))
    q += info.zero_point
    np.clip(q, limits.min, limits.max, out=q)
    return q.astype(info.dtype)


def dequantize(values: np.ndarray, info: TensorInfo) -> np.ndarray:
    """The tensor's integer type -> float32 with its scale and zero point."""
    assert info.scale is not None and info.zero_point is not None
    out = values.astype(np.float32)
    out -= np.float32(info.zero_point)
    out *= np.float32(info.scale)
    return out


class TFLiteRuntime:
    """A TFLite model loaded in one interpreter."""

    backend = "tflite"

    def __init__(self, path: Path, options: RuntimeOptions | None = None) -> None:
        self.path = Path(path)
        self.options = options or RuntimeOptions()
        content = check_tflite_file(self.path)
        module, self.package = import_interpreter()
        self._delegate_names: list[str] = []
        delegates = self._load_delegates(module, self.options.delegates)
        kwargs: dict[str, Any] = {
            "model_content": content,
            "experimental_delegates": delegates or None,
            "num_threads": self.options.threads,
        }
        if not self.options.xnnpack:
            kwargs["experimental_op_resolver_type"] = (
                module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            )
        try:
            self._interp = module.Interpreter(**kwargs)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            if delegates:
                raise DelegateError(
                    f"{self.path}: the model does not run with delegates "
                    f"{self._delegate_names}: {exc}"
                ) from exc
            raise ModelFormatError(f"{self.path}: TFLite cannot load this model: {exc}") from exc
        self._in_details = self._interp.get_input_details()
        self._out_details = self._interp.get_output_details()
        self._inputs = [_tensor_info(d) for d in self._in_details]
        self._outputs = [_tensor_info(d) for d in self._out_details]
        self._in_index = [int(d["index"]) for d in self._in_details]
        self._out_index = [int(d["index"]) for d in self._out_details]
        if self.options.xnnpack:
            self._delegate_names.append("xnnpack")
        self._delegate_names.append("cpu")

    def _load_delegates(self, module: ModuleType, specs: Sequence[DelegateSpec]) -> list[Any]:
        loaded: list[Any] = []
        for spec in specs:
            if spec.kind == "external":
                if not spec.library:
                    raise DelegateError("an external delegate needs a library path")
                library, how = spec.library, "check the path and that its dependencies load"
            elif spec.kind in DELEGATE_LIBRARIES:
                default, how = DELEGATE_LIBRARIES[spec.kind]
                library = spec.library or default
            else:
                raise DelegateError(
                    f"unknown TFLite delegate {spec.kind!r}; "
                    f"use one of {[*DELEGATE_LIBRARIES, 'external']}"
                )
            try:
                # Open the library first: LiteRT's Delegate object breaks in __del__ when
                # its own loading fails, so a missing library never reaches it.
                ctypes.CDLL(library)
                loaded.append(module.load_delegate(library, dict(spec.options) or None))
                self._delegate_names.append(spec.kind)
            except (ValueError, OSError, RuntimeError) as exc:
                message = (
                    f"cannot load the {spec.kind} delegate from {library}: {exc}. To get it: {how}"
                )
                if not self.options.fallback:
                    raise DelegateError(message) from exc
                log.warning("%s; falling back to the CPU", message)
        return loaded

    def inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    def outputs(self) -> list[TensorInfo]:
        return list(self._outputs)

    def accelerators(self) -> list[str]:
        return list(self._delegate_names)

    def run(self, feeds: Sequence[np.ndarray] | Mapping[str, np.ndarray]) -> list[np.ndarray]:
        arrays = order_feeds(self.path, self._inputs, feeds)
        for info, index, array in zip(self._inputs, self._in_index, arrays):
            check_shape(self.path, info, array)
            if info.quantized and not self.options.raw_io:
                if array.dtype.kind != "f":
                    raise InputError(
                        f"{self.path}: input {info.name!r} takes float values (quantized to "
                        f"{info.dtype} by the runtime); got {array.dtype}"
                    )
                array = quantize(array, info)
            elif array.dtype != info.dtype:
                raise InputError(
                    f"{self.path}: input {info.name!r} expects {info.dtype}, got {array.dtype}"
                )
            self._interp.set_tensor(index, array)
        try:
            self._interp.invoke()
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"{self.path}: inference failed: {exc}") from exc
        results: list[np.ndarray] = []
        for info, index in zip(self._outputs, self._out_index):
            value = self._interp.get_tensor(index)
            if info.quantized and not self.options.raw_io:
                value = dequantize(value, info)
            results.append(value)
        return results

    def close(self) -> None:
        self._interp = None
