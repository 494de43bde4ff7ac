"""The detector on the input layouts and dtypes converters produce: NCHW and NHWC, float,
raw uint8 and quantized int8, and graphs exported with the decode inside."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from agent.media import read_image
from models.yolox.detector import YoloxDetector
from models.yolox.postprocess import Detections
from models.zoo import SAMPLES_DIR
from tests.conftest import PACKAGES, model_file


def frame() -> np.ndarray:
    return read_image(SAMPLES_DIR / "still_0.jpg")


def wrap_input(tmp_path: Path, name: str, shape: list[int], elem: int, nodes: list) -> Path:
    """The bundled fp32 ONNX with a new input `x` feeding `images` through `nodes`."""
    model = onnx.load(str(model_file("onnx", "fp32")))
    graph = model.graph
    old = graph.input[0]
    graph.input.remove(old)
    graph.input.insert(0, helper.make_tensor_value_info("x", elem, shape))
    for node in reversed(nodes):
        graph.node.insert(0, node)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def rows(d: Detections) -> np.ndarray:
    table = np.column_stack([d.boxes, d.scores, d.class_ids.astype(np.float32)])
    keys = [np.round(table[:, i], 1) for i in (3, 2, 1, 0)] + [table[:, 5]]
    return table[np.lexsort(keys)]


def same(a: Detections, b: Detections) -> None:
    """Same detections, in an order that does not depend on how score ties fall."""
    assert len(a) == len(b) and len(a) > 0
    ra, rb = rows(a), rows(b)
    np.testing.assert_array_equal(ra[:, 5], rb[:, 5])
    np.testing.assert_allclose(ra[:, :4], rb[:, :4], atol=1e-2)
    np.testing.assert_allclose(ra[:, 4], rb[:, 4], atol=1e-5)


def busy_threshold(detector: YoloxDetector) -> float:
    """A score threshold that leaves ~40 detections on the sample frame, whatever the weights."""
    detector.preprocess(frame())
    raw = detector.forward()
    return float(np.sort(raw[:, 4] * raw[:, 5:].max(axis=1))[-40])


@pytest.fixture
def reference() -> YoloxDetector:
    detector = YoloxDetector.from_ref(PACKAGES[("onnx", "fp32")])
    detector.conf = busy_threshold(detector)
    return detector


def test_nhwc_onnx(tmp_path: Path, reference: YoloxDetector) -> None:
    path = wrap_input(
        tmp_path,
        "nhwc",
        [1, 416, 416, 3],
        TensorProto.FLOAT,
        [helper.make_node("Transpose", ["x"], ["images"], perm=[0, 3, 1, 2])],
    )
    detector = YoloxDetector(path, class_names=reference.class_names, conf=reference.conf)
    assert detector.layout == "nhwc"
    same(detector.detect(frame()), reference.detect(frame()))


def test_uint8_input_onnx(tmp_path: Path, reference: YoloxDetector) -> None:
    path = wrap_input(
        tmp_path,
        "u8",
        [1, 3, 416, 416],
        TensorProto.UINT8,
        [helper.make_node("Cast", ["x"], ["images"], to=TensorProto.FLOAT)],
    )
    detector = YoloxDetector(path, class_names=reference.class_names, conf=reference.conf)
    assert detector.letterbox.input.dtype == np.uint8
    same(detector.detect(frame()), reference.detect(frame()))


def test_int8_tflite_close_to_fp32_tflite() -> None:
    fp32 = YoloxDetector.from_ref(PACKAGES[("tflite", "fp32")], conf=0.001)
    int8 = YoloxDetector.from_ref(PACKAGES[("tflite", "int8")], conf=0.001)
    assert int8.layout == "nhwc" and int8.letterbox.input.dtype in (np.int8, np.uint8)
    ratio = fp32.preprocess(frame())
    int8.preprocess(frame())
    a, b = fp32.forward(), int8.forward()
    # Objectness and class probabilities agree to within a few quantization steps.
    scale = int8.output_info.scale
    assert scale is not None
    assert np.abs(a[:, 4:] - b[:, 4:]).mean() < 4 * scale
    assert ratio == pytest.approx(416 / 640)


def test_decode_in_graph_matches_host_decode(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="needs the build extra")
    from models.scripts.yolox_arch import build_nano

    torch.manual_seed(0)
    model: Any = build_nano(6).eval()
    x = torch.zeros(1, 3, 416, 416)
    paths = {}
    for decode in (False, True):
        model.head.decode_in_inference = decode
        paths[decode] = tmp_path / f"decode_{decode}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter
            torch.onnx.export(
                model,
                x,
                str(paths[decode]),
                input_names=["images"],
                output_names=["output"],
                opset_version=11,
                dynamo=False,
            )
    names = [str(i) for i in range(6)]
    host = YoloxDetector(paths[False], class_names=names)
    host.conf = busy_threshold(host)
    graph = YoloxDetector(paths[True], class_names=names, conf=host.conf, decode_in_graph=True)
    same(graph.detect(frame()), host.detect(frame()))
