"""The YOLOX detector: letterbox -> runtime.run -> decode + NMS; only `forward` touches
the runtime. Works with NCHW or NHWC inputs, float or quantized (int8/uint8) tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.yolox.postprocess import DEFAULT_STRIDES, Detections, postprocess
from models.yolox.preprocess import Letterbox, leave_cores_to_the_runtime
from models.zoo import ModelRef, resolve
from runtimes.base import Runtime, RuntimeOptions, TensorInfo
from runtimes.errors import ModelFormatError
from runtimes.registry import load

COCO_NAMES_COUNT = 80


def input_layout(info: TensorInfo) -> tuple[str, int, int]:
    """(layout, height, width) from a 4-D image input: [1,3,H,W] or [1,H,W,3]."""
    shape = info.shape
    if len(shape) != 4:
        raise ModelFormatError(
            f"input {info.name!r} has shape {list(shape)}; YOLOX takes 4-D images"
        )
    if shape[1] == 3 and shape[2] and shape[3]:
        return "nchw", int(shape[2]), int(shape[3])
    if shape[3] == 3 and shape[1] and shape[2]:
        return "nhwc", int(shape[1]), int(shape[2])
    raise ModelFormatError(
        f"input {info.name!r} has shape {list(shape)}; expected [1,3,H,W] or [1,H,W,3] "
        f"with a fixed size"
    )


class YoloxDetector:
    """One YOLOX model ready to detect on BGR/gray/BGRA frames of any size."""

    def __init__(
        self,
        path: str | Path,
        class_names: Sequence[str] | None = None,
        runtime: str | None = None,
        options: RuntimeOptions | None = None,
        legacy: bool = False,
        decode_in_graph: bool = False,
        strides: Sequence[int] = DEFAULT_STRIDES,
        conf: float = 0.25,
        nms: float = 0.45,
    ) -> None:
        # Quantized tensors are (de)quantized here, folded into the letterbox table and
        # the score filter, so the runtime passes them through raw.
        opts = dataclasses.replace(options or RuntimeOptions(), raw_io=True)
        leave_cores_to_the_runtime()
        self.runtime: Runtime = load(path, runtime, opts)
        self.conf, self.nms = conf, nms
        self.strides = tuple(strides)
        self.decode_in_graph = decode_in_graph
        inputs, outputs = self.runtime.inputs(), self.runtime.outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelFormatError(
                f"{path}: YOLOX has one input and one output; this model has "
                f"{len(inputs)} and {len(outputs)}"
            )
        self.input_info, self.output_info = inputs[0], outputs[0]
        self.layout, self.height, self.width = input_layout(self.input_info)
        self.letterbox = Letterbox(
            self.height,
            self.width,
            self.layout,
            self.input_info.dtype,
            legacy=legacy,
            scale=self.input_info.scale,
            zero_point=self.input_info.zero_point,
        )
        # The largest class score the output can carry: dequantized int8 may exceed 1.
        self.class_score_max = 1.0
        info = self.output_info
        if info.quantized and info.scale is not None and info.zero_point is not None:
            top = float(np.iinfo(info.dtype).max - info.zero_point) * info.scale
            self.class_score_max = max(1.0, top)
        per_anchor = self.output_info.shape[-1]
        classes = (per_anchor - 5) if per_anchor else COCO_NAMES_COUNT
        self.class_names = list(class_names) if class_names else [str(i) for i in range(classes)]
        if per_anchor and len(self.class_names) != classes:
            raise ModelFormatError(
                f"{path}: the model predicts {classes} classes but {len(self.class_names)} "
                f"class names were given"
            )

    @classmethod
    def from_ref(
        cls,
        reference: str | Path | ModelRef,
        runtime: str | None = None,
        options: RuntimeOptions | None = None,
        **overrides: Any,
    ) -> YoloxDetector:
        """Load from a package directory, model.json, model file or bundled name."""
        ref = reference if isinstance(reference, ModelRef) else resolve(reference)
        params: dict[str, Any] = dict(ref.manifest.params) if ref.manifest else {}
        if ref.manifest and ref.manifest.family != "yolox":
            raise ModelFormatError(f"{ref.path}: family {ref.manifest.family!r} is not yolox")
        kwargs: dict[str, Any] = {
            "class_names": params.get("class_names"),
            "legacy": bool(params.get("legacy", False)),
            "decode_in_graph": bool(params.get("decode_in_graph", False)),
            "strides": tuple(params.get("strides", DEFAULT_STRIDES)),
        }
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        if runtime is None and ref.manifest:
            runtime = ref.manifest.runtime
        return cls(ref.path, runtime=runtime, options=options, **kwargs)

    def preprocess(self, image: np.ndarray) -> float:
        """Letterbox `image` into the preallocated input; return the ratio."""
        return self.letterbox(image)

    def forward(self) -> np.ndarray:
        """Run the model on the current input; the raw head output as float32 [N, 5+C]."""
        (raw,) = self.runtime.run([self.letterbox.input])
        info = self.output_info
        if info.quantized:
            assert info.scale is not None and info.zero_point is not None
            values = raw.astype(np.float32)
            values -= np.float32(info.zero_point)
            values *= np.float32(info.scale)
            raw = values
        raw = raw.reshape(-1, raw.shape[-1])
        return raw

    def postprocess(self, raw: np.ndarray, ratio: float, image_hw: tuple[int, int]) -> Detections:
        return postprocess(
            raw,
            (self.height, self.width),
            ratio,
            image_hw,
            conf=self.conf,
            nms=self.nms,
            decoded=self.decode_in_graph,
            strides=self.strides,
            class_score_max=self.class_score_max,
        )

    def detect(self, image: np.ndarray) -> Detections:
        ratio = self.preprocess(image)
        raw = self.forward()
        return self.postprocess(raw, ratio, (int(image.shape[0]), int(image.shape[1])))

    def close(self) -> None:
        self.runtime.close()
