"""The Stable-Diffusion directory layout as optimum exports it, and its components' runtimes.

`text_encoder/`, `unet/`, `vae_decoder/` (each `model.onnx` or `model.tflite` with an optional
`config.json`), `tokenizer/`, `scheduler/scheduler_config.json`, optionally `adapter/`.
"""

from __future__ import annotations

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
    `names`, the names optimum gives these inputs.
    """

    def __init__(self, name: str, path: Path, options: RuntimeOptions) -> None:
        self.name = name
        self.path = path
        self.runtime: Runtime = load(path, options=options)
        self.inputs: list[TensorInfo] = self.runtime.inputs()
        self.input_names = [i.name for i in self.inputs]

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
        return self.runtime.run(cast)

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
