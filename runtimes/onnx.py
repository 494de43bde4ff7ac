"""ONNX Runtime backend: execution providers by preference, filtered to what is installed.

Graph optimisation level and thread counts come from `RuntimeOptions`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from runtimes.base import RuntimeOptions, TensorInfo, check_shape, order_feeds
from runtimes.errors import (
    BackendUnavailable,
    DelegateError,
    InputError,
    ModelFormatError,
    ModelNotFound,
)

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'edge-agent[onnx]'  (onnxruntime)"

DEFAULT_PREFERENCE = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "OpenVINOExecutionProvider",
    "CPUExecutionProvider",
)

ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "cpu": "CPUExecutionProvider",
}

PROVIDER_HINTS = {
    "TensorrtExecutionProvider": "pip install 'edge-agent[onnx-gpu]' (onnxruntime-gpu) with "
    "TensorRT and CUDA libraries (JetPack on Jetson; Jetson wheels from the Jetson AI Lab index)",
    "CUDAExecutionProvider": "pip install 'edge-agent[onnx-gpu]' (onnxruntime-gpu) with CUDA "
    "and cuDNN libraries on the library path",
    "OpenVINOExecutionProvider": "pip install onnxruntime-openvino (instead of onnxruntime)",
    "CPUExecutionProvider": INSTALL_HINT,
}

OPT_LEVELS = ("disable", "basic", "extended", "all")

ONNX_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


def import_ort() -> ModuleType:
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailable(
            f"onnxruntime is not installed ({exc}). Install: {INSTALL_HINT}"
        ) from exc
    return onnxruntime


def canonical_provider(name: str) -> str:
    return ALIASES.get(name.lower(), name)


def choose_providers(
    requested: Sequence[str] | None, available: Sequence[str], fallback: bool
) -> list[str]:
    """The providers to ask ONNX Runtime for, in order; always ends with the CPU."""
    if requested is None:
        chosen = [p for p in DEFAULT_PREFERENCE if p in available]
    else:
        chosen = []
        for raw in requested:
            name = canonical_provider(raw)
            if name in available:
                chosen.append(name)
                continue
            hint = PROVIDER_HINTS.get(name, "check the provider name")
            message = (
                f"execution provider {name} is not available in this onnxruntime "
                f"(available: {', '.join(available)}). To get it: {hint}"
            )
            if not fallback:
                raise DelegateError(message)
            log.warning("%s; falling back", message)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def _tensor_info(node: Any) -> TensorInfo:
    dtype = ONNX_DTYPES.get(node.type)
    if dtype is None:
        raise ModelFormatError(f"tensor {node.name!r} has unsupported type {node.type}")
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in node.shape)
    return TensorInfo(name=node.name, shape=shape, dtype=np.dtype(dtype))


class OnnxRuntime:
    """An ONNX model in one ONNX Runtime inference session."""

    backend = "onnx"

    def __init__(self, path: Path, options: RuntimeOptions | None = None) -> None:
        self.path = Path(path)
        self.options = options or RuntimeOptions()
        if not self.path.exists():
            raise ModelNotFound(f"{self.path}: no such model file")
        if not self.path.is_file():
            raise ModelFormatError(f"{self.path}: is not a file")
        ort = import_ort()
        session_options = ort.SessionOptions()
        level = self.options.graph_optimization
        if level not in OPT_LEVELS:
            raise DelegateError(f"graph_optimization must be one of {OPT_LEVELS}, got {level!r}")
        session_options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[level]
        if self.options.threads:
            session_options.intra_op_num_threads = self.options.threads
        if self.options.inter_op_threads:
            session_options.inter_op_num_threads = self.options.inter_op_threads
        session_options.log_severity_level = 3
        providers = choose_providers(
            self.options.providers, ort.get_available_providers(), self.options.fallback
        )
        try:
            self._session = ort.InferenceSession(
                str(self.path), sess_options=session_options, providers=providers
            )
        except Exception as exc:  # ORT raises its own pybind classes; translate them all.
            raise ModelFormatError(
                f"{self.path}: ONNX Runtime cannot load this model (expected a complete ONNX "
                f"protobuf): {type(exc).__name__}: {exc}"
            ) from exc
        active = self._session.get_providers()
        lost = [p for p in providers if p not in active]
        if lost and self.options.providers is not None:
            message = f"{self.path}: execution provider(s) {lost} failed to initialise"
            if not self.options.fallback:
                raise DelegateError(message + f"; to get them: {PROVIDER_HINTS.get(lost[0])}")
            log.warning("%s; running on %s", message, active)
        self._inputs = [_tensor_info(n) for n in self._session.get_inputs()]
        self._outputs = [_tensor_info(n) for n in self._session.get_outputs()]
        self._input_names = [i.name for i in self._inputs]

    def inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    def outputs(self) -> list[TensorInfo]:
        return list(self._outputs)

    def accelerators(self) -> list[str]:
        return list(self._session.get_providers())

    def run(self, feeds: Sequence[np.ndarray] | Mapping[str, np.ndarray]) -> list[np.ndarray]:
        arrays = order_feeds(self.path, self._inputs, feeds)
        for info, array in zip(self._inputs, arrays):
            check_shape(self.path, info, array)
            if array.dtype != info.dtype:
                raise InputError(
                    f"{self.path}: input {info.name!r} expects {info.dtype}, got {array.dtype}"
                )
        try:
            outputs = self._session.run(None, dict(zip(self._input_names, arrays)))
        except Exception as exc:
            raise InputError(f"{self.path}: inference failed: {exc}") from exc
        return [np.asarray(o) for o in outputs]

    def close(self) -> None:
        self._session = None
