"""The Stable-Diffusion directory layout as optimum exports it, and its components' runtimes.

`text_encoder/`, `unet/`, `vae_decoder/` (each `model.onnx` or `model.tflite` with an optional
`config.json`), `tokenizer/`, `scheduler/scheduler_config.json`, optionally `adapter/`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.package import MANIFEST, Manifest, read_manifest, verify_files
from models.zoo import BUNDLED_DIR, bundled_names
from runtimes.base import Runtime, RuntimeOptions, TensorInfo
from runtimes.errors import InputError, ModelNotFound, PackageError
from runtimes.registry import load

REQUIRED = ("text_encoder", "unet", "vae_decoder")
OPTIONAL = ("adapter",)
MODEL_FILES = ("model.onnx", "model.tflite")
IO_MAP = "tflite_io.json"  # beside a converted model.tflite: names and transposes (see Component)
LAYOUT_HINT = (
    "a Stable-Diffusion export has text_encoder/, unet/, vae_decoder/ (model.onnx or "
    "model.tflite each), tokenizer/ and scheduler/scheduler_config.json"
)


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PackageError(f"{path}: expected a JSON object")
    return data


def _model_file(directory: Path) -> Path | None:
    for name in MODEL_FILES:
        if (directory / name).is_file():
            return directory / name
    found = sorted(p for p in directory.glob("*") if p.suffix in (".onnx", ".tflite"))
    return found[0] if found else None


@dataclass(frozen=True)
class Layout:
    """Where each part of a pipeline lies, and the configs that go with it."""

    root: Path
    models: dict[str, Path]
    configs: dict[str, dict[str, Any]]
    scheduler: dict[str, Any]
    tokenizer: Path
    manifest: Manifest | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.manifest is not None:
            return f"{self.manifest.name}@{self.manifest.version}"
        return self.root.name


def find_root(reference: str | Path) -> Path:
    """A pipeline directory, its model.json, or the name of a bundled diffusion package."""
    path = Path(reference)
    if path.name == MANIFEST and path.is_file():
        return path.parent
    if path.is_dir():
        return path
    if "/" not in str(reference) and (BUNDLED_DIR / str(reference)).is_dir():
        return BUNDLED_DIR / str(reference)
    raise ModelNotFound(
        f"{reference}: no such pipeline directory or bundled model "
        f"(bundled: {', '.join(bundled_names()) or 'none'})"
    )


def read_layout(reference: str | Path, verify: bool = False) -> Layout:
    """Find every component; PackageError names what is missing and what a layout holds."""
    root = find_root(reference)
    manifest = read_manifest(root) if (root / MANIFEST).is_file() else None
    if manifest is not None:
        if manifest.task != "diffusion":
            raise PackageError(f"{root}: model.json says task {manifest.task!r}, not diffusion")
        if verify:
            verify_files(root, manifest)
    models: dict[str, Path] = {}
    missing: list[str] = []
    for name in (*REQUIRED, *OPTIONAL):
        directory = root / name
        model = _model_file(directory) if directory.is_dir() else None
        if model is not None:
            models[name] = model
        elif name in REQUIRED:
            missing.append(f"{name}/ (model.onnx or model.tflite)")
    tokenizer = root / "tokenizer"
    if not tokenizer.is_dir():
        missing.append("tokenizer/")
    scheduler_path = root / "scheduler" / "scheduler_config.json"
    if not scheduler_path.is_file():
        missing.append("scheduler/scheduler_config.json")
    if missing:
        raise PackageError(f"{root}: missing {', '.join(missing)}; {LAYOUT_HINT}")
    configs = {name: _json(root / name / "config.json") for name in models}
    configs["text_encoder"] = configs.get("text_encoder", {})
    return Layout(
        root=root,
        models=models,
        configs=configs,
        scheduler=_json(scheduler_path),
        tokenizer=tokenizer,
        manifest=manifest,
        params=dict(manifest.params) if manifest is not None else {},
    )


class Component:
    """One component's runtime, fed by input name; casts to the dtypes the model declares.

    Models whose tensor names differ (a converted TFLite file) are fed in the order of
    `names`, the names optimum gives these inputs. A TFLite file converted by onnx2tf has
    its tensors channel-last and renamed: `tflite_io.json` beside it (written by
    models/scripts/build_diffusion_tflite.py) gives, for each TFLite input, the ONNX name
    and the transpose from the ONNX layout, and for each ONNX output the TFLite output and
    the transpose back. With it, `inputs` and `run` speak ONNX names and layouts, and a
    model fixed at batch B runs any batch in slices of B rows (the last padded).
    """

    def __init__(self, name: str, path: Path, options: RuntimeOptions) -> None:
        self.name = name
        self.path = path
        self.runtime: Runtime = load(path, options=options)
        self._in_perms: list[list[int] | None] = []
        self._outs: list[tuple[int, list[int] | None]] = []
        self._batch: int | None = None  # the fixed batch of a mapped TFLite model
        mapping = path.with_name(IO_MAP)
        raw = self.runtime.inputs()
        if path.suffix == ".tflite" and mapping.is_file():
            self.inputs = self._read_map(mapping, raw)
        else:
            self.inputs = raw
        self.input_names = [i.name for i in self.inputs]

    def _read_map(self, mapping: Path, raw: list[TensorInfo]) -> list[TensorInfo]:
        data = _json(mapping)
        ins, outs = data.get("inputs"), data.get("outputs")
        n_out = len(self.runtime.outputs())
        try:
            if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(raw):
                raise ValueError(f"{len(raw)} inputs and a list of outputs expected")
            infos = []
            for entry, info in zip(ins, raw):
                perm = [int(v) for v in entry["perm"]]
                if sorted(perm) != list(range(len(info.shape))):
                    raise ValueError(f"{entry['name']}: perm {perm} for shape {info.shape}")
                inverse = np.argsort(perm)
                shape = tuple(info.shape[k] for k in inverse)
                infos.append(dataclasses.replace(info, name=str(entry["name"]), shape=shape))
                self._in_perms.append(None if perm == sorted(perm) else perm)
            for entry in outs:
                index, perm = int(entry["index"]), [int(v) for v in entry["perm"]]
                if not 0 <= index < n_out:
                    raise ValueError(f"output index {index} of {n_out}")
                self._outs.append((index, None if perm == sorted(perm) else perm))
        except (KeyError, TypeError, ValueError) as exc:
            raise PackageError(f"{mapping}: not a valid TFLite I/O map: {exc}") from exc
        batches = {i.shape[0] if i.shape else None for i in raw}
        self._batch = batches.pop() if len(batches) == 1 else None
        return infos

    def info(self, name: str) -> TensorInfo | None:
        return next((i for i in self.inputs if i.name == name), None)

    def run(self, feeds: Mapping[str, np.ndarray], order: list[str]) -> list[np.ndarray]:
        if set(self.input_names) <= set(feeds):
            arrays = [feeds[n] for n in self.input_names]
        else:
            given = [n for n in order if n in feeds]
            if len(given) != len(self.inputs):
                raise InputError(
                    f"{self.path}: inputs {self.input_names} expected; have {sorted(feeds)}"
                )
            arrays = [feeds[n] for n in given]
        cast = [
            a if a.dtype == info.dtype else a.astype(info.dtype)
            for a, info in zip(arrays, self.inputs)
        ]
        if not self._outs:
            return self.runtime.run(cast)
        size = self._batch
        batch = cast[0].shape[0] if cast and cast[0].ndim else 0
        if not size or batch == size or not all(a.ndim and a.shape[0] == batch for a in cast):
            return self._run_mapped(cast)
        # Fixed at `size` rows: run slices of it, the last one padded with its own last row.
        parts = []
        for start in range(0, batch, size):
            rows = [a[start : start + size] for a in cast]
            short = size - rows[0].shape[0]
            if short:
                rows = [np.concatenate([r, np.repeat(r[-1:], short, axis=0)]) for r in rows]
            parts.append([o[: size - short] for o in self._run_mapped(rows)])
        return [np.concatenate(outs) for outs in zip(*parts)]

    def _run_mapped(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        moved = [
            a if perm is None else np.ascontiguousarray(a.transpose(perm))
            for a, perm in zip(arrays, self._in_perms)
        ]
        got = self.runtime.run(moved)
        return [
            got[index] if perm is None else np.ascontiguousarray(got[index].transpose(perm))
            for index, perm in self._outs
        ]

    def close(self) -> None:
        self.runtime.close()


def open_components(layout: Layout, options: RuntimeOptions) -> dict[str, Component]:
    """Load every component found; a failure closes what was opened and names the part."""
    opened: dict[str, Component] = {}
    try:
        for name, path in layout.models.items():
            opened[name] = Component(name, path, options)
    except Exception:
        for component in opened.values():
            component.close()
        raise
    return opened
