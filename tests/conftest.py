"""Shared fixtures: the bundled model packages and sample media."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.zoo import BUNDLED_DIR, SAMPLES_DIR

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    ("onnx", "fp32"): BUNDLED_DIR / "yolox-nano-onnx-fp32",
    ("onnx", "int8"): BUNDLED_DIR / "yolox-nano-onnx-int8",
    ("tflite", "fp32"): BUNDLED_DIR / "yolox-nano-tflite-fp32",
    ("tflite", "int8"): BUNDLED_DIR / "yolox-nano-tflite-int8",
}


def model_file(runtime: str, precision: str) -> Path:
    directory = PACKAGES[(runtime, precision)]
    return directory / ("model.onnx" if runtime == "onnx" else "model.tflite")


@pytest.fixture(params=sorted(PACKAGES), ids=lambda p: f"{p[0]}-{p[1]}")
def package(request: pytest.FixtureRequest) -> Path:
    return PACKAGES[request.param]


@pytest.fixture
def samples_dir() -> Path:
    return SAMPLES_DIR
