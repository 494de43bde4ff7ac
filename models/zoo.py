"""Finding a model: a package directory, its model.json, a bare model file, or the name of
a package bundled under `models/bundled/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.package import MANIFEST, Manifest, read_manifest
from runtimes.errors import ModelNotFound

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
ALIASES = {"yolox-nano": "yolox-nano-onnx-fp32"}


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: the file to load and, when there is one, its package manifest."""

    path: Path
    manifest: Manifest | None
    directory: Path | None


def bundled_names(task: str | None = None) -> list[str]:
    """Bundled package names, all of them or only those of one task (`detection`, ...)."""
    if not BUNDLED_DIR.is_dir():
        return []
    names = sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / MANIFEST).is_file())
    if task is None:
        return names
    return [n for n in names if read_manifest(BUNDLED_DIR / n).task == task]


def resolve(reference: str | Path) -> ModelRef:
    """Resolve what a user typed into a model file and its manifest."""
    path = Path(reference)
    if not path.exists():
        name = ALIASES.get(str(reference), str(reference))
        candidate = BUNDLED_DIR / name
        if "/" not in str(reference) and (candidate / MANIFEST).is_file():
            path = candidate
        else:
            known = ", ".join(bundled_names()) or "none"
            raise ModelNotFound(
                f"{reference}: no such file, directory or bundled model (bundled: {known})"
            )
    if path.is_dir():
        manifest = read_manifest(path)
        return ModelRef(path / manifest.model, manifest, path)
    if path.name == MANIFEST:
        manifest = read_manifest(path.parent)
        return ModelRef(path.parent / manifest.model, manifest, path.parent)
    sibling = path.parent / MANIFEST
    if sibling.is_file():
        manifest = read_manifest(path.parent)
        if manifest.model == path.name:
            return ModelRef(path, manifest, path.parent)
    return ModelRef(path, None, None)
