"""Trainable weights recovered from the bundled fp32 ONNX detector (`train_yolox --init`
with a package): the eval-mode torch model must reproduce the file in ONNX Runtime, and the
re-split BatchNorms must leave train mode equal to eval mode on the measured images.
Needs the build extra (torch, pixeltable-yolox)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from agent.media import read_image
from models.yolox.preprocess import Letterbox
from models.zoo import SAMPLES_DIR
from tests.conftest import model_file

torch = pytest.importorskip("torch", reason="the import tests need the build extra")
pytest.importorskip("yolox", reason="the import tests need pixeltable-yolox")

pytestmark = pytest.mark.reference

ONNX_FP32 = model_file("onnx", "fp32")
SIZE = 416


def still_batch() -> np.ndarray:
    letterbox = Letterbox(SIZE, SIZE)
    stills = sorted(SAMPLES_DIR.glob("still_*.jpg"))[:4]
    assert stills, "the bundled stills are missing"
    batch = []
    for path in stills:
        letterbox(read_image(path))
        batch.append(letterbox.input[0].copy())
    return np.stack(batch)


def test_imported_weights_reproduce_the_onnx_file_and_train_mode_matches() -> None:
    from models.scripts.yolox_arch import build_nano
    from models.scripts.yolox_import import state_from_onnx

    images = still_batch()
    state = state_from_onnx(ONNX_FP32, torch.from_numpy(images), 6)
    model: Any = build_nano(6)
    model.load_state_dict(state, strict=True)
    model.eval()
    model.head.decode_in_inference = False
    session = ort.InferenceSession(str(ONNX_FP32), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ours = model(torch.from_numpy(images)).numpy()
    theirs = np.concatenate([session.run(None, {"images": img[None]})[0] for img in images])
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() < 1e-3

    # train-mode BatchNorm normalises with the batch's statistics: on the images the
    # statistics were measured on, the features must not move
    with torch.no_grad():
        eval_features = model.backbone(torch.from_numpy(images))
        model.train()
        train_features = model.backbone(torch.from_numpy(images))
    for e, t in zip(eval_features, train_features, strict=True):
        scale = float(e.abs().max())
        assert float((e - t).abs().max()) < 1e-3 * max(scale, 1.0)


def test_an_onnx_file_that_is_not_yolox_nano_is_refused(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from models.scripts.yolox_import import state_from_onnx

    weight = numpy_helper.from_array(np.ones((8, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["output"], name="only_conv")],
        "one_conv",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 8, 30, 30])],
        [weight],
    )
    path = tmp_path / "one_conv.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ValueError, match="1 Conv nodes, YOLOX-Nano has"):
        state_from_onnx(path, torch.zeros(1, 3, 64, 64), 6)
