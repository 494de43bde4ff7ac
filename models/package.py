"""The model package format: a directory with `model.json` and the files it lists.

`model.json` names the package and version, the task and family, the runtime and
precision, each file's sha256 and size, the family's parameters and hardware needs.
Signing (issue: OTA) adds a detached Ed25519 signature over the canonical JSON.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runtimes.errors import ModelNotFound, PackageError

MANIFEST = "model.json"


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="File name relative to the package directory")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex sha256 of the file")
    size: int = Field(ge=0, description="Size in bytes")


class Hardware(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_memory_mb: int = Field(default=0, ge=0, description="RAM the model needs")
    accelerators: list[str] = Field(
        default_factory=list,
        description="Accelerators required (e.g. 'edgetpu', 'cuda'); empty: CPU is enough",
    )


class Signature(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alg: Literal["ed25519"] = "ed25519"
    key_id: str = Field(description="First 16 hex digits of sha256(raw public key)")
    value: str = Field(description="Base64 Ed25519 signature over the canonical JSON")


class TestVector(BaseModel):
    """An input and the outputs the model must give for it (raw runtime tensors, .npy files
    listed in `files`)."""

    model_config = ConfigDict(extra="forbid")
    __test__: ClassVar[bool] = False  # not a pytest class

    input: str = Field(description="A .npy file: the model's input tensor, as the runtime takes it")
    outputs: list[str] = Field(min_length=1, description=".npy files, one per model output")
    atol: float = Field(default=1e-3, ge=0, description="Absolute tolerance")
    rtol: float = Field(default=1e-3, ge=0, description="Relative tolerance")


class Manifest(BaseModel):
    """The parsed `model.json`."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = Field(default=1, alias="schema", description="Format version")
    name: str = Field(min_length=1, description="Model name, stable across versions")
    version: str = Field(min_length=1, description="Version, compared per name")
    task: Literal["detection", "llm", "diffusion"]
    family: str = Field(description="Model family, e.g. 'yolox'")
    runtime: Literal["tflite", "onnx", "tensorrt"]
    precision: Literal["fp32", "fp16", "int8", "int16x8", "int4"]
    model: str = Field(description="The main model file, one of `files`")
    files: list[FileEntry] = Field(min_length=1)
    params: dict[str, Any] = Field(
        default_factory=dict, description="Family parameters (input size, class names, ...)"
    )
    hardware: Hardware = Field(default_factory=Hardware)
    test_vectors: list[TestVector] = Field(
        default_factory=list, description="Inputs with expected outputs, checked before use"
    )
    description: str = ""
    signature: Signature | None = Field(
        default=None, description="Ed25519 signature by the fleet key (models/signing.py)"
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(directory: Path, name: str) -> FileEntry:
    path = directory / name
    return FileEntry(path=name, sha256=sha256_file(path), size=path.stat().st_size)


def read_manifest(directory: Path) -> Manifest:
    """Parse `directory/model.json`; errors name the file and the field."""
    path = directory / MANIFEST
    if not path.is_file():
        raise ModelNotFound(f"{path}: no {MANIFEST} here; a model package needs one")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{path}: not valid JSON: {exc}") from exc
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise PackageError(f"{path}: {problems}") from exc
    if manifest.model not in {f.path for f in manifest.files}:
        raise PackageError(f"{path}: model {manifest.model!r} is not listed in files")
    for entry in manifest.files:
        if Path(entry.path).is_absolute() or ".." in Path(entry.path).parts:
            raise PackageError(f"{path}: file path {entry.path!r} leaves the package")
    listed = {f.path for f in manifest.files}
    for vector in manifest.test_vectors:
        for name in (vector.input, *vector.outputs):
            if name not in listed:
                raise PackageError(f"{path}: test vector file {name!r} is not listed in files")
    return manifest


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Check every listed file's size and sha256; raise PackageError on the first mismatch."""
    for entry in manifest.files:
        path = directory / entry.path
        if not path.is_file():
            raise PackageError(f"{path}: listed in {MANIFEST} but missing")
        size = path.stat().st_size
        if size != entry.size:
            raise PackageError(f"{path}: size {size} bytes, {MANIFEST} says {entry.size}")
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise PackageError(f"{path}: sha256 {digest} does not match {MANIFEST}")


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write model.json atomically (temp file + rename)."""
    path = directory / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    data = manifest.model_dump(mode="json", by_alias=True, exclude_none=True)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
