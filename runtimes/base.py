"""The one `Runtime` interface every backend implements, and its value types.

A runtime loads one model file, describes its tensors, runs it and closes; it knows
no model family and no networking.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from runtimes.errors import InputError


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape (None for a dynamic dimension), dtype and quantization of a tensor."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype[Any]
    scale: float | None = None
    zero_point: int | None = None

    @property
    def quantized(self) -> bool:
        return self.scale is not None and self.scale != 0.0

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": str(self.dtype),
        }
        if self.quantized:
            out["scale"] = self.scale
            out["zero_point"] = self.zero_point
        return out


@dataclass(frozen=True)
class DelegateSpec:
    """A TFLite delegate: `edgetpu`, `gpu`, or `external` with a library path and options."""

    kind: str
    library: str | None = None
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RuntimeOptions:
    """Options common to every backend; a backend ignores what does not apply to it.

    threads: intra-op threads (None: the backend's default).
    raw_io: TFLite only; pass quantized tensors through instead of (de)quantizing.
    delegates: TFLite delegates to load in order.
    xnnpack: TFLite only; use the XNNPACK CPU delegate (default on).
    providers: ONNX Runtime execution providers in order of preference
        (None: TensorRT, CUDA, OpenVINO, CPU, filtered to what is installed).
    graph_optimization: ONNX Runtime level: disable, basic, extended or all.
    fallback: when a requested delegate/provider cannot load, warn and use the CPU
        instead of failing.
    """

    threads: int | None = None
    raw_io: bool = False
    delegates: tuple[DelegateSpec, ...] = ()
    xnnpack: bool = True
    providers: tuple[str, ...] | None = None
    graph_optimization: str = "all"
    inter_op_threads: int | None = None
    fallback: bool = False


@runtime_checkable
class Runtime(Protocol):
    """A loaded model. Backends live in `runtimes.registry.BACKENDS`."""

    backend: str
    path: Path

    def inputs(self) -> list[TensorInfo]: ...

    def outputs(self) -> list[TensorInfo]: ...

    def run(self, feeds: Sequence[np.ndarray] | Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once; feeds by position or by input name; outputs in `outputs()` order."""
        ...

    def close(self) -> None: ...

    def accelerators(self) -> list[str]:
        """The delegates or execution providers actually in use, best first."""
        ...


def order_feeds(
    path: Path,
    infos: Sequence[TensorInfo],
    feeds: Sequence[np.ndarray] | Mapping[str, np.ndarray],
) -> list[np.ndarray]:
    """Put feeds in input order, checking count and names."""
    if isinstance(feeds, Mapping):
        names = [i.name for i in infos]
        unknown = sorted(set(feeds) - set(names))
        missing = [n for n in names if n not in feeds]
        if unknown or missing:
            raise InputError(
                f"{path}: inputs {names} expected; unknown {unknown}, missing {missing}"
            )
        return [feeds[n] for n in names]
    arrays = list(feeds)
    if len(arrays) != len(infos):
        raise InputError(f"{path}: {len(infos)} input(s) expected, got {len(arrays)}")
    return arrays


def check_shape(path: Path, info: TensorInfo, array: np.ndarray) -> None:
    """Raise InputError unless `array` fits the tensor's rank and fixed dimensions."""
    shape = array.shape
    fits = len(shape) == len(info.shape) and all(
        want is None or want == got for want, got in zip(info.shape, shape)
    )
    if not fits:
        want = "x".join("?" if d is None else str(d) for d in info.shape)
        raise InputError(f"{path}: input {info.name!r} expects shape [{want}], got {list(shape)}")
