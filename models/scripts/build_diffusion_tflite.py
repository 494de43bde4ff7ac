"""Convert the tiny diffusion pipeline's ONNX components to TFLite (fp32) with onnx2tf.

Build-time only; needs `.venv-onnx2tf` (models/README.md) beside the build venv.

    .venv/bin/python -m models.scripts.build_diffusion_tflite   # -> models/bundled/tiny-sd-tflite

Each component is converted at a fixed batch (BATCH) and the package's image size (TFLite
graphs from onnx2tf have fixed shapes; other batches run in slices of it). onnx2tf
turns channel-first tensors channel-last and renames them, so beside each `model.tflite`
the script writes `tflite_io.json`: for each TFLite input the ONNX name and the transpose
from the ONNX layout, for each ONNX output the TFLite output and the transpose back. The
transposes are found by comparing shapes and checked by running both files on the same
random inputs; the largest difference per component is printed and kept in model.json.
A component that does not convert stays ONNX (the layout mixes runtimes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.diffusion.layout import IO_MAP, read_layout
from models.package import Hardware, Manifest, file_entry, read_manifest, write_manifest
from models.zoo import BUNDLED_DIR
from runtimes.base import RuntimeOptions
from runtimes.registry import load

REPO = Path(__file__).resolve().parents[2]
ONNX2TF = REPO / ".venv-onnx2tf" / "bin" / "onnx2tf"
ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "adapter")
# The batch each is converted at. The UNet at 2, a guided step's cond/uncond pair (at batch 1
# onnx2tf mislays a channel axis in its attention reshapes); the rest at 1.
BATCH = {"unet": 2}
TOLERANCE = 1e-3  # largest abs difference against ONNX Runtime accepted for a component


def step(msg: str) -> None:
    print(msg, flush=True)


def static_shapes(onnx_path: Path, component: str, size: int, vae_factor: int, batch: int) -> dict:
    """Every input's shape at `batch` and `size` px: dynamic spatial dims from the names
    optimum and build_diffusion give them (height/width, h<i>/w<i> for the residuals)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    latent = size // vae_factor
    spatial = size if component == "adapter" else latent
    shapes: dict[str, tuple[list[int], int]] = {}
    for inp in model.graph.input:
        dims = []
        for d in inp.type.tensor_type.shape.dim:
            if d.dim_value:
                dims.append(d.dim_value)
            elif d.dim_param == "batch":
                dims.append(batch)
            elif d.dim_param in ("height", "width"):
                dims.append(spatial)
            elif d.dim_param[:1] in ("h", "w") and d.dim_param[1:].isdigit():
                dims.append(max(latent >> int(d.dim_param[1:]), 1))
            else:
                raise SystemExit(f"{onnx_path}: no size for dimension {d.dim_param!r}")
        shapes[inp.name] = (dims, inp.type.tensor_type.elem_type)
    return shapes


def run_onnx2tf(onnx_path: Path, shapes: dict, work: Path) -> Path:
    work.mkdir(parents=True)
    np.save(work / ONNX2TF_SAMPLE, np.zeros((20, 128, 128, 3), np.float32))  # no download
    shutil.copyfile(onnx_path, work / "model.onnx")  # onnx2tf overwrites its input
    ois = [f"{name}:{','.join(map(str, dims))}" for name, (dims, _) in shapes.items()]
    # Erf (exact GELU) would be a Flex op the plain interpreter lacks: onnx2tf's pseudo-op.
    cmd = [str(ONNX2TF), "-i", "model.onnx", "-o", "out", "-rtpo", "Erf", "-v", "warn"]
    cmd += ["-ois", *ois]
    step(f"  (cd {work} && {' '.join(cmd)})")
    path = f"{ONNX2TF.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    log = work / "onnx2tf.log"
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=work, stdout=fh, stderr=subprocess.STDOUT, env=env)
    out = work / "out" / "model_float32.tflite"
    if proc.returncode != 0 or not out.exists():
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"onnx2tf failed (rc {proc.returncode}); log {log}:\n{tail}")
    return out


def _perms(src: tuple[int, ...], dst: tuple[int, ...]) -> list[list[int]]:
    """Every permutation p with src[p] == dst (identity first)."""
    return [
        list(p)
        for p in itertools.permutations(range(len(src)))
        if tuple(src[i] for i in p) == tuple(dst)
    ]


def _feeds(shapes: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for name, (dims, elem) in shapes.items():
        if elem in (6, 7):  # int32 / int64: token ids
            feeds[name] = rng.integers(0, 32, dims).astype(np.int64 if elem == 7 else np.int32)
        elif name == "timestep":
            feeds[name] = np.full(dims, 500.0, np.float32)
        else:
            feeds[name] = rng.standard_normal(dims).astype(np.float32) * 0.5
    return feeds


def io_map(onnx_path: Path, tflite_path: Path, shapes: dict) -> tuple[dict[str, Any], float]:
    """tflite_io.json's content for this pair, and the largest difference of any output."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    tfl = load(tflite_path, options=RuntimeOptions(threads=1))
    try:
        names: list[str] = []
        candidates_of: list[list[list[int]]] = []
        for info in tfl.inputs():
            bare = info.name.removeprefix("serving_default_").split(":")[0]
            if bare not in shapes:
                raise RuntimeError(f"{tflite_path}: input {info.name} matches no ONNX input")
            candidates = _perms(tuple(shapes[bare][0]), tuple(d or 0 for d in info.shape))
            if not candidates:
                raise RuntimeError(f"{tflite_path}: no transpose of {bare} fits {info.shape}")
            names.append(bare)
            candidates_of.append(candidates)
        rng = np.random.default_rng(0)
        best: tuple[float, dict[str, Any]] | None = None
        for choice in itertools.product(*candidates_of):
            feeds = _feeds(shapes, rng)
            want = session.run(None, feeds)
            arrays = []
            for name, perm in zip(names, choice):
                a = feeds[name].transpose(perm)
                arrays.append(a.astype(np.int32) if a.dtype == np.int64 else a)
            arrays = [
                a if a.dtype == info.dtype else a.astype(info.dtype)
                for a, info in zip(arrays, tfl.inputs())
            ]
            got = tfl.run(arrays)
            outputs, worst = [], 0.0
            for out_info, ref in zip(session.get_outputs(), want):
                match = None
                for index, value in enumerate(got):
                    for perm in _perms(value.shape, ref.shape):
                        err = float(np.abs(value.transpose(perm) - ref).max())
                        if match is None or err < match[0]:
                            match = (err, index, perm)
                if match is None:
                    raise RuntimeError(f"{tflite_path}: no output fits {out_info.name}")
                worst = max(worst, match[0])
                outputs.append({"name": out_info.name, "index": match[1], "perm": match[2]})
            mapping = {
                "inputs": [{"name": n, "perm": p} for n, p in zip(names, choice)],
                "outputs": outputs,
            }
            if best is None or worst < best[0]:
                best = (worst, mapping)
        assert best is not None
        return best[1], best[0]
    finally:
        tfl.close()


def convert(src: Path, out: Path, components: list[str]) -> None:
    if not ONNX2TF.exists():
        raise SystemExit(f"{ONNX2TF} missing: create .venv-onnx2tf (see models/README.md)")
    layout = read_layout(src)
    manifest = read_manifest(src)
    size = int(layout.params["image_size"][0])
    vae_factor = int(layout.params["vae_scale_factor"])
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    diffs: dict[str, float] = {}
    batches: dict[str, int] = {}
    files: list[str] = ["model_index.json", "scheduler/scheduler_config.json"]
    shutil.copyfile(src / "model_index.json", out / "model_index.json")
    shutil.copytree(src / "scheduler", out / "scheduler")
    shutil.copytree(src / "tokenizer", out / "tokenizer")
    files += sorted(f"tokenizer/{p.name}" for p in (out / "tokenizer").iterdir())
    with tempfile.TemporaryDirectory(prefix="sd-tflite-") as tmp:
        for name in COMPONENTS:
            if name not in layout.models:
                continue
            onnx_path = layout.models[name]
            (out / name).mkdir()
            shutil.copyfile(src / name / "config.json", out / name / "config.json")
            files.append(f"{name}/config.json")
            if name not in components:
                shutil.copyfile(onnx_path, out / name / "model.onnx")
                files.append(f"{name}/model.onnx")
                continue
            step(f"{name}: converting")
            batch = BATCH.get(name, 1)
            shapes = static_shapes(onnx_path, name, size, vae_factor, batch)
            try:
                tflite = run_onnx2tf(onnx_path, shapes, Path(tmp) / name)
                mapping, worst = io_map(onnx_path, tflite, shapes)
                if worst > TOLERANCE:
                    raise RuntimeError(f"outputs differ from ONNX Runtime by {worst:.2e}")
            except RuntimeError as exc:
                step(f"{name}: stays ONNX ({exc})")
                shutil.copyfile(onnx_path, out / name / "model.onnx")
                files.append(f"{name}/model.onnx")
                continue
            shutil.copyfile(tflite, out / name / "model.tflite")
            (out / name / IO_MAP).write_text(json.dumps(mapping, indent=2) + "\n")
            files += [f"{name}/model.tflite", f"{name}/{IO_MAP}"]
            diffs[name] = worst
            batches[name] = batch
            step(f"{name}: TFLite, largest difference from ONNX Runtime {worst:.2e}")
    params = dict(manifest.params)
    params["tflite"] = {
        "converted": sorted(diffs),
        "batch": batches,
        "image_size": [size, size],
        "max_abs_diff": {k: float(f"{v:.3g}") for k, v in sorted(diffs.items())},
        "tool": "onnx2tf 1.29 (-rtpo Erf), float32",
    }
    new = Manifest(
        name="tiny-sd-tflite",
        version=manifest.version,
        task="diffusion",
        family=manifest.family,
        runtime="tflite" if "unet" in diffs else "onnx",
        precision="fp32",
        model="unet/model.tflite" if "unet" in diffs else "unet/model.onnx",
        files=[file_entry(out, f) for f in files],
        params=params,
        hardware=Hardware(min_memory_mb=128),
        description=f"tiny-sd with {', '.join(sorted(diffs)) or 'no'} components in TFLite "
        f"(fixed at {size}x{size} px and the batch in params.tflite; other batches run in "
        "slices of it), converted from the ONNX files by "
        "models/scripts/build_diffusion_tflite.py.",
    )
    write_manifest(out, new)
    step(f"wrote {out} ({sum((out / f).stat().st_size for f in files) / 1e6:.1f} MB)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, default=BUNDLED_DIR / "tiny-sd")
    p.add_argument("--out", type=Path, default=BUNDLED_DIR / "tiny-sd-tflite")
    p.add_argument(
        "--components",
        default=",".join(COMPONENTS),
        help="comma-separated components to convert; the rest are copied as ONNX",
    )
    args = p.parse_args(argv)
    convert(args.src, args.out, [c for c in args.components.split(",") if c])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
