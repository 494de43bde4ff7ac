"""Build the four bundled YOLOX-Nano packages: ONNX fp32/int8 and TFLite fp32/int8.

Run `.venv/bin/python -m models.scripts.build_yolox --help`. Intermediates go to
`models/scripts/work/yolox/` (git-ignored); each run overwrites them and the packages.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from models.package import Hardware, Manifest, file_entry, write_manifest

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "models" / "scripts" / "work" / "yolox"
ONNX2TF = REPO / ".venv-onnx2tf" / "bin" / "onnx2tf"
ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"

NAME = "yolox-nano"
VERSION = "0.1.0"
INPUT_NAME = "images"
OUTPUT_NAME = "output"
STRIDES = [8, 16, 32]
PAD_VALUE = 114
EXPORT_OPSET = 11  # as the official tools/export_onnx.py
QUANT_OPSET = 13  # ORT's per-channel QDQ (DequantizeLinear axis) needs >= 13

COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
]  # fmt: skip


def step(message: str) -> None:
    print(f"[build_yolox] {message}", flush=True)


# --------------------------------------------------------------------------- images


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """The detector's preprocessing: BGR uint8 HxWx3 -> float32 [3, size, size], 0..255.

    Resize keeping aspect (INTER_LINEAR), top-left placement, pad 114, no mean/std.
    """
    h, w = image.shape[:2]
    ratio = min(size / h, size / w)
    nh, nw = int(h * ratio), int(w * ratio)
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    canvas[:nh, :nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32)


def synthetic_image(rng: np.random.Generator) -> np.ndarray:
    """A deterministic BGR test scene: gradient + noise background, filled shapes, lines."""
    h, w = [(480, 640), (640, 480), (416, 416), (720, 1280), (300, 500)][int(rng.integers(5))]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = ((xx / w) * rng.uniform(-1, 1) + (yy / h) * rng.uniform(-1, 1)) % 1.0
    image = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    image += rng.normal(0, rng.uniform(2, 25), (h, w, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(3, 12))):
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        sw, sh = int(rng.integers(10, w // 2)), int(rng.integers(10, h // 2))
        kind = int(rng.integers(4))
        if kind == 0:
            cv2.rectangle(image, (x, y), (x + sw, y + sh), color, -1)
        elif kind == 1:
            cv2.ellipse(image, (x, y), (sw // 2, sh // 2), float(rng.uniform(0, 180)), 0, 360,
                        color, -1)  # fmt: skip
        elif kind == 2:
            pts = rng.integers(0, [w, h], (int(rng.integers(3, 6)), 2)).astype(np.int32)
            cv2.fillPoly(image, [pts], color)
        else:
            cv2.line(image, (x, y), (x + sw, y + sh), color, int(rng.integers(1, 8)))
    if rng.uniform() < 0.3:
        image = cv2.GaussianBlur(image, (5, 5), 0)
    return image


def calibration_images(calib_dir: Path | None, count: int, seed: int) -> list[np.ndarray]:
    """BGR uint8 images: up to `count` from `calib_dir` (sorted), else synthetic ones."""
    if calib_dir is not None:
        exts = {".jpg", ".jpeg", ".png", ".bmp"}
        paths = sorted(p for p in calib_dir.rglob("*") if p.suffix.lower() in exts)[:count]
        images = [img for p in paths if (img := cv2.imread(str(p), cv2.IMREAD_COLOR)) is not None]
        if not images:
            raise SystemExit(f"--calib-dir {calib_dir}: no readable images")
        return images
    rng = np.random.default_rng(seed)
    return [synthetic_image(rng) for _ in range(count)]


# --------------------------------------------------------------------------- model


def resolve_classes(args: argparse.Namespace, ckpt_classes: int | None) -> list[str]:
    if args.class_names:
        names = [n.strip() for n in args.class_names.split(",") if n.strip()]
        if args.num_classes is not None and args.num_classes != len(names):
            raise SystemExit(f"--num-classes {args.num_classes} but {len(names)} class names")
        return names
    n = args.num_classes or ckpt_classes or len(COCO_CLASSES)
    return list(COCO_CLASSES) if n == len(COCO_CLASSES) else [f"class{i}" for i in range(n)]


def load_state_dict(path: Path) -> dict[str, Any]:
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise SystemExit(f"{path}: not a state_dict or a dict with key 'model'")
    return {k.removeprefix("module."): v for k, v in state.items()}


def build_model(args: argparse.Namespace) -> tuple[Any, list[str], str]:
    """The eval-mode YOLOX-Nano, its class names and a short description of its weights."""
    import torch

    from models.scripts.yolox_arch import build_nano

    state = load_state_dict(args.weights) if args.weights else None
    ckpt_classes = int(state["head.cls_preds.0.weight"].shape[0]) if state else None
    classes = resolve_classes(args, ckpt_classes)
    torch.manual_seed(args.seed)
    model = build_nano(len(classes))
    if state is None:
        weights = f"random (torch seed {args.seed})"
    else:
        model.load_state_dict(state, strict=True)
        digest = hashlib.sha256(args.weights.read_bytes()).hexdigest()[:12]
        weights = f"{args.weights.name} (sha256 {digest})"
    if args.weights_desc:
        weights = args.weights_desc
    model.eval()
    return model, classes, weights


def export_onnx(model: Any, size: int, path: Path) -> None:
    """Export as the official YOLOX tools/export_onnx.py: raw head outputs, opset 11."""
    import torch
    from torch import nn
    from yolox.models.network_blocks import SiLU
    from yolox.utils import replace_module

    model = replace_module(model, nn.SiLU, SiLU)
    model.head.decode_in_inference = False
    dummy = torch.randn(1, 3, size, size)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and meant here
        warnings.filterwarnings("ignore", ".*legacy TorchScript", DeprecationWarning)
        torch.onnx.export(
            model, (dummy,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            opset_version=EXPORT_OPSET, dynamo=False,
        )  # fmt: skip
    import onnx

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    try:
        from onnxsim import simplify
    except ImportError:
        step("  onnxsim not installed in this venv: not simplifying (optional)")
        return
    simplified, ok = simplify(proto)
    if ok:
        onnx.save(simplified, str(path))
        step("  simplified with onnxsim")


# --------------------------------------------------------------------------- ONNX int8


def output_tail_nodes(model: Any) -> list[str]:
    """Names of the non-Conv nodes between the prediction convs and the graph output.

    These (Sigmoid, per-level Concat, Reshape, final Concat, Transpose) are left in float:
    one int8 scale over the joined [box, obj, cls] tensor would flatten the scores.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    tail: list[str] = []
    stack = [o.name for o in model.graph.output]
    seen: set[str] = set()
    while stack:
        node = producers.get(stack.pop())
        if node is None or node.name in seen or node.op_type == "Conv":
            continue
        seen.add(node.name)
        tail.append(node.name)
        stack.extend(node.input)
    return tail


def _reader(tensors: np.ndarray) -> Any:
    """An ORT CalibrationDataReader over preprocessed NCHW tensors, one per batch."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[np.ndarray] = iter(tensors)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {INPUT_NAME: batch[None]}

    return Reader()


def quantize_onnx(fp32: Path, out: Path, calib: np.ndarray, work: Path) -> int:
    """Static QDQ (per-channel int8 weights, uint8 activations, MinMax); returns #float nodes."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    converted = work / "fp32_opset13.onnx"
    onnx.save(version_converter.convert_version(onnx.load(str(fp32)), QUANT_OPSET), str(converted))
    prepared = work / "fp32_opset13_prep.onnx"
    quant_pre_process(str(converted), str(prepared))
    exclude = output_tail_nodes(onnx.load(str(prepared)))
    quantize_static(
        str(prepared), str(out), _reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
        # U8S8 (uint8 activations, int8 weights) is ONNX Runtime's fast x86 path: measured
        # here 11.8 ms against 23 ms for S8S8 on the same Nano graph (1 thread).
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
    )  # fmt: skip
    # quant_pre_process declares every ORT domain; keep only those the nodes use.
    quantized = onnx.load(str(out))
    used = {node.domain or "" for node in quantized.graph.node} | {""}
    kept = [o for o in quantized.opset_import if (o.domain or "") in used]
    del quantized.opset_import[:]
    quantized.opset_import.extend(kept)
    onnx.checker.check_model(quantized)
    onnx.save(quantized, str(out))
    return len(exclude)


# --------------------------------------------------------------------------- TFLite


def convert_tflite(fp32: Path, calib_nhwc: np.ndarray, work: Path) -> tuple[Path, Path]:
    """onnx2tf in its own venv -> (float32 .tflite, full-integer int8-I/O .tflite)."""
    if not ONNX2TF.exists():
        raise SystemExit(f"{ONNX2TF} missing: create .venv-onnx2tf (see models/scripts/README.md)")
    tf_dir = work / "onnx2tf"
    tf_dir.mkdir(parents=True)
    # onnx2tf downloads this sample from GitHub unless it is in the working directory.
    small = np.stack([cv2.resize(x, (128, 128)) for x in calib_nhwc[:20]]) / 255.0
    np.save(tf_dir / ONNX2TF_SAMPLE, small.astype(np.float32))
    np.save(tf_dir / "calib.npy", calib_nhwc.astype(np.float32))
    model_copy = tf_dir / "model.onnx"  # onnx2tf overwrites its input
    shutil.copyfile(fp32, model_copy)
    out_dir = tf_dir / "out"
    cmd = [
        str(ONNX2TF), "-i", model_copy.name, "-o", out_dir.name, "-oiqt", "-qt", "per-channel",
        "-cind", INPUT_NAME, "calib.npy", "[[[[0,0,0]]]]", "[[[[1,1,1]]]]",
        "-iqd", "int8", "-oqd", "int8", "-v", "warn",
    ]  # fmt: skip
    step(f"  (cd {tf_dir.relative_to(REPO)} && {' '.join(cmd)})")
    log = tf_dir / "onnx2tf.log"
    # onnx2tf runs `onnxsim` from PATH; without it conversion of the Focus stem fails.
    path = f"{ONNX2TF.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=tf_dir, stdout=fh, stderr=subprocess.STDOUT, env=env)
    fp32_tfl = out_dir / "model_float32.tflite"
    int8_tfl = out_dir / "model_full_integer_quant.tflite"
    if proc.returncode != 0 or not fp32_tfl.exists() or not int8_tfl.exists():
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"onnx2tf failed (rc {proc.returncode}); log {log}:\n{tail}")
    return fp32_tfl, int8_tfl


# --------------------------------------------------------------------------- packages


@dataclass(frozen=True)
class Variant:
    directory: str
    runtime: Literal["onnx", "tflite"]
    precision: Literal["fp32", "int8"]
    filename: str
    layout: str


VARIANTS = [
    Variant("yolox-nano-onnx-fp32", "onnx", "fp32", "model.onnx", "nchw"),
    Variant("yolox-nano-onnx-int8", "onnx", "int8", "model.onnx", "nchw"),
    Variant("yolox-nano-tflite-fp32", "tflite", "fp32", "model.tflite", "nhwc"),
    Variant("yolox-nano-tflite-int8", "tflite", "int8", "model.tflite", "nhwc"),
]

DESCRIPTIONS = {
    "yolox-nano-onnx-fp32": "float32 NCHW input, float32 output",
    "yolox-nano-onnx-int8": "QDQ int8 (per-channel); float32 NCHW input, float32 output",
    "yolox-nano-tflite-fp32": "float32 NHWC input, float32 output",
    "yolox-nano-tflite-int8": "full-integer int8 (per-channel); int8 NHWC input and int8 "
    "output, with scale/zero point in the tensor details",
}


def write_package(
    out: Path, variant: Variant, source: Path, size: int, classes: list[str], weights: str
) -> Path:
    directory = out / variant.directory
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    shutil.copyfile(source, directory / variant.filename)
    manifest = Manifest(
        name=NAME, version=VERSION, task="detection", family="yolox", runtime=variant.runtime,
        precision=variant.precision, model=variant.filename,
        files=[file_entry(directory, variant.filename)],
        params={
            "input_size": [size, size], "class_names": classes, "strides": STRIDES,
            "legacy": False, "decode_in_graph": False, "layout": variant.layout,
            "weights": weights,
        },
        hardware=Hardware(min_memory_mb=64),
        description=f"YOLOX-Nano {size}x{size}, raw head outputs [1, N, 5 + classes] "
        f"(box xywh offsets, obj and class sigmoids; decode on the host): "
        f"{DESCRIPTIONS[variant.directory]}",
    )  # fmt: skip
    write_manifest(directory, manifest)
    return directory / variant.filename


# --------------------------------------------------------------------------- checks


def _tensor_info(detail: dict[str, Any]) -> str:
    scale, zero = detail["quantization"]
    quant = f" scale={scale:.6g} zero_point={zero}" if scale else ""
    shape = [int(d) for d in detail["shape"]]
    return f"{detail['name']} {shape} {np.dtype(detail['dtype']).name}{quant}"


def run_onnx(path: Path, x: np.ndarray) -> tuple[np.ndarray, str]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    i, o = sess.get_inputs()[0], sess.get_outputs()[0]
    y = sess.run(None, {i.name: x[None]})[0]
    return y, f"in {i.name} {i.shape} {i.type}; out {o.name} {o.shape} {o.type}"


def run_tflite(path: Path, x: np.ndarray) -> tuple[np.ndarray, str]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=2)
    interp.allocate_tensors()
    inp, outp = interp.get_input_details()[0], interp.get_output_details()[0]
    data = x.transpose(1, 2, 0)[None]  # NCHW -> NHWC
    scale, zero = inp["quantization"]
    if scale:
        info = np.iinfo(inp["dtype"])
        data = np.clip(np.round(data / scale + zero), info.min, info.max)
    interp.set_tensor(inp["index"], data.astype(inp["dtype"]))
    interp.invoke()
    y = interp.get_tensor(outp["index"])
    scale, zero = outp["quantization"]
    if scale:
        y = (y.astype(np.float32) - zero) * scale
    return y, f"in {_tensor_info(inp)}; out {_tensor_info(outp)}"


def check_packages(paths: dict[str, Path], x: np.ndarray, num_outputs: int) -> None:
    expected = (1, num_outputs, None)
    reference: np.ndarray | None = None
    for name, path in paths.items():
        runner = run_onnx if path.suffix == ".onnx" else run_tflite
        y, info = runner(path, x)
        step(f"  {name}: {path.stat().st_size / 1e6:.2f} MB; {info}")
        if y.shape[:2] != expected[:2]:
            raise SystemExit(f"{path}: output shape {y.shape}, expected [1, {num_outputs}, C]")
        if reference is None:
            reference = y
            groups = {"box": y[..., :4], "obj": y[..., 4], "cls": y[..., 5:]}
            ranges = ", ".join(f"{k} [{v.min():.3f}, {v.max():.3f}]" for k, v in groups.items())
            step(f"    output ranges: {ranges}")
            continue
        d = np.abs(y - reference)
        step(
            f"    max |diff| vs onnx-fp32: all {d.max():.4f}, box {d[..., :4].max():.4f}, "
            f"obj {d[..., 4].max():.4f}, cls {d[..., 5:].max():.4f}"
        )


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", type=Path, help="state_dict checkpoint (dict with 'model' or raw)")
    p.add_argument("--num-classes", type=int, help="default: from --class-names/--weights, or 80")
    p.add_argument("--class-names", help="comma-separated class names (default: COCO's 80)")
    p.add_argument("--input-size", type=int, default=416)
    p.add_argument("--calib-dir", type=Path, help="calibration images (default: synthetic)")
    p.add_argument("--calib-count", type=int, default=64, help="calibration images to use")
    p.add_argument("--out", type=Path, default=REPO / "models" / "bundled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights-desc", help="params.weights in model.json (default: file + sha256)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    size = args.input_size
    if size % 32:
        raise SystemExit(f"--input-size {size}: must be a multiple of 32")
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)

    step("1/6 building YOLOX-Nano")
    model, classes, weights = build_model(args)
    num_outputs = sum((size // s) ** 2 for s in STRIDES)
    step(f"  {len(classes)} classes, weights: {weights}, output [1, {num_outputs}, "
         f"{5 + len(classes)}]")  # fmt: skip

    step(f"2/6 exporting fp32 ONNX (opset {EXPORT_OPSET})")
    onnx_fp32 = WORK / "yolox_nano_fp32.onnx"
    export_onnx(model, size, onnx_fp32)

    source = "synthetic" if args.calib_dir is None else str(args.calib_dir)
    step(f"3/6 preparing calibration data ({args.calib_count} images, {source})")
    images = calibration_images(args.calib_dir, args.calib_count, args.seed)
    calib = np.stack([letterbox(img, size) for img in images])  # [N, 3, H, W] BGR 0..255
    test = letterbox(synthetic_image(np.random.default_rng(args.seed + 1000)), size)

    step(f"4/6 quantizing ONNX int8 (QDQ, per-channel, opset {QUANT_OPSET})")
    onnx_int8 = WORK / "yolox_nano_int8.onnx"
    n_float = quantize_onnx(onnx_fp32, onnx_int8, calib, WORK)
    step(f"  {n_float} output-tail nodes kept in float")

    step("5/6 converting to TFLite with onnx2tf (a few minutes)")
    tfl_fp32, tfl_int8 = convert_tflite(onnx_fp32, calib.transpose(0, 2, 3, 1), WORK)

    step(f"6/6 writing packages under {args.out} and checking them")
    sources = [onnx_fp32, onnx_int8, tfl_fp32, tfl_int8]
    written = {
        v.directory: write_package(args.out, v, src, size, classes, weights)
        for v, src in zip(VARIANTS, sources, strict=True)
    }
    check_packages(written, test, num_outputs)
    step(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
