"""Both backends on the real bundled model files: describe, run, quantized I/O, and
every kind of bad input ending in our own error."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from models.package import read_manifest
from runtimes.base import DelegateSpec, RuntimeOptions
from runtimes.errors import (
    DelegateError,
    EdgeAgentError,
    InputError,
    ModelFormatError,
    ModelNotFound,
)
from runtimes.registry import backend_for, load
from runtimes.tflite import dequantize, quantize
from tests.conftest import PACKAGES, model_file

RNG = np.random.default_rng(0)
# Values per anchor: box (4), objectness, one score per class of the bundled model.
HEAD = 5 + len(read_manifest(PACKAGES[("onnx", "fp32")]).params["class_names"])


def image_input(runtime: str) -> np.ndarray:
    chw = RNG.uniform(0, 255, (1, 3, 416, 416)).astype(np.float32)
    return chw if runtime == "onnx" else np.ascontiguousarray(chw.transpose(0, 2, 3, 1))


@pytest.mark.parametrize(
    "runtime,precision",
    [("onnx", "fp32"), ("onnx", "int8"), ("tflite", "fp32"), ("tflite", "int8")],
)
def test_describe_and_run(runtime: str, precision: str) -> None:
    rt = load(model_file(runtime, precision), options=RuntimeOptions(threads=2))
    assert rt.backend == runtime
    (inp,), (out,) = rt.inputs(), rt.outputs()
    expected_in = (1, 3, 416, 416) if runtime == "onnx" else (1, 416, 416, 3)
    assert inp.shape == expected_in
    assert out.shape == (1, 3549, HEAD)
    (result,) = rt.run([image_input(runtime)])
    assert result.shape == (1, 3549, HEAD)
    assert result.dtype == np.float32  # quantized outputs come back dequantized
    assert np.isfinite(result).all()
    assert rt.accelerators()[-1] in ("cpu", "CPUExecutionProvider")
    rt.close()


def test_tflite_int8_tensors_carry_scale_and_zero_point() -> None:
    rt = load(model_file("tflite", "int8"))
    (inp,), (out,) = rt.inputs(), rt.outputs()
    assert inp.dtype in (np.int8, np.uint8) and inp.quantized
    assert out.dtype in (np.int8, np.uint8) and out.quantized
    assert inp.describe()["scale"] == inp.scale


def test_tflite_raw_io_matches_float_io() -> None:
    path = model_file("tflite", "int8")
    floats = load(path)
    raw = load(path, options=RuntimeOptions(raw_io=True))
    (inp,), (out,) = raw.inputs(), raw.outputs()
    x = image_input("tflite")
    (raw_out,) = raw.run([quantize(x, inp)])
    assert raw_out.dtype == out.dtype
    (float_out,) = floats.run([x])
    np.testing.assert_array_equal(dequantize(raw_out, out), float_out)


def test_feeds_by_name() -> None:
    rt = load(model_file("onnx", "fp32"))
    (out,) = rt.run({"images": image_input("onnx")})
    assert out.shape == (1, 3549, HEAD)
    with pytest.raises(InputError, match="missing"):
        rt.run({"pictures": image_input("onnx")})


@pytest.mark.parametrize("runtime", ["onnx", "tflite"])
def test_wrong_shape_and_dtype(runtime: str) -> None:
    rt = load(model_file(runtime, "fp32"))
    with pytest.raises(InputError, match=r"expects shape"):
        rt.run([np.zeros((1, 3, 320, 320), np.float32)])
    good = image_input(runtime)
    with pytest.raises(InputError, match="float32"):
        rt.run([good.astype(np.float64)])
    with pytest.raises(InputError, match="1 input"):
        rt.run([good, good])


def test_quantized_model_refuses_integer_input_when_converting() -> None:
    rt = load(model_file("tflite", "int8"))
    with pytest.raises(InputError, match="takes float"):
        rt.run([np.zeros((1, 416, 416, 3), np.int32)])


@pytest.mark.parametrize("suffix", [".onnx", ".tflite"])
def test_missing_file(tmp_path: Path, suffix: str) -> None:
    with pytest.raises(ModelNotFound, match="no such"):
        load(tmp_path / f"absent{suffix}")


@pytest.mark.parametrize("suffix", [".onnx", ".tflite"])
def test_not_a_model(tmp_path: Path, suffix: str) -> None:
    bad = tmp_path / f"notes{suffix}"
    bad.write_text("this is a shopping list, not a model\n")
    with pytest.raises(ModelFormatError, match=str(bad)):
        load(bad)


@pytest.mark.parametrize("suffix", [".onnx", ".tflite"])
def test_empty_file(tmp_path: Path, suffix: str) -> None:
    bad = tmp_path / f"empty{suffix}"
    bad.write_bytes(b"")
    with pytest.raises(ModelFormatError):
        load(bad)


@pytest.mark.parametrize("runtime", ["onnx", "tflite"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.97])
def test_truncated_model(tmp_path: Path, runtime: str, fraction: float) -> None:
    data = model_file(runtime, "fp32").read_bytes()
    bad = tmp_path / f"cut.{runtime}"
    bad.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelFormatError):
        load(bad)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    folder = tmp_path / "m.onnx"
    folder.mkdir()
    with pytest.raises(ModelFormatError, match="not a file"):
        load(folder)


def test_format_from_content_when_suffix_is_unknown(tmp_path: Path) -> None:
    for runtime in ("onnx", "tflite"):
        copy = tmp_path / f"model-{runtime}.bin"
        copy.write_bytes(model_file(runtime, "fp32").read_bytes())
        assert backend_for(copy) == runtime
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelFormatError, match="cannot tell"):
        backend_for(junk)
    with pytest.raises(EdgeAgentError, match="unknown runtime"):
        load(model_file("onnx", "fp32"), runtime="caffe")


def test_missing_edgetpu_delegate_names_the_library() -> None:
    options = RuntimeOptions(delegates=(DelegateSpec("edgetpu"),))
    with pytest.raises(DelegateError, match=r"libedgetpu\.so\.1.*libedgetpu1-std"):
        load(model_file("tflite", "int8"), options=options)


def test_missing_delegate_falls_back_to_cpu_when_allowed(caplog: pytest.LogCaptureFixture) -> None:
    options = RuntimeOptions(
        delegates=(DelegateSpec("external", library="/nonexistent/libvendor_delegate.so"),),
        fallback=True,
    )
    with caplog.at_level(logging.WARNING):
        rt = load(model_file("tflite", "int8"), options=options)
    assert "falling back to the CPU" in caplog.text
    assert "libvendor_delegate" in caplog.text
    assert rt.run([image_input("tflite")])[0].shape == (1, 3549, HEAD)


def test_unknown_delegate_kind() -> None:
    with pytest.raises(DelegateError, match="unknown TFLite delegate"):
        load(model_file("tflite", "fp32"), options=RuntimeOptions(delegates=(DelegateSpec("npu"),)))


def test_tflite_without_xnnpack_still_runs() -> None:
    rt = load(model_file("tflite", "fp32"), options=RuntimeOptions(xnnpack=False))
    assert "xnnpack" not in rt.accelerators()
    assert rt.run([image_input("tflite")])[0].shape == (1, 3549, HEAD)


def test_missing_onnx_provider_names_the_package() -> None:
    with pytest.raises(DelegateError, match="onnxruntime-gpu"):
        load(model_file("onnx", "fp32"), options=RuntimeOptions(providers=("cuda",)))


def test_missing_onnx_provider_falls_back_when_allowed(caplog: pytest.LogCaptureFixture) -> None:
    options = RuntimeOptions(providers=("tensorrt", "cuda"), fallback=True)
    with caplog.at_level(logging.WARNING):
        rt = load(model_file("onnx", "fp32"), options=options)
    assert rt.accelerators() == ["CPUExecutionProvider"]
    assert "TensorrtExecutionProvider" in caplog.text


def test_graph_optimisation_levels_and_threads() -> None:
    x = image_input("onnx")
    outputs = []
    for level in ("disable", "all"):
        rt = load(
            model_file("onnx", "fp32"), options=RuntimeOptions(graph_optimization=level, threads=1)
        )
        outputs.append(rt.run([x])[0])
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-3)
    with pytest.raises(DelegateError, match="graph_optimization"):
        load(model_file("onnx", "fp32"), options=RuntimeOptions(graph_optimization="max"))
