"""model.json: reading, validation errors that name the field, file verification, and the
`edge-fleet package` commands run as a user runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models.package import read_manifest, verify_files
from models.zoo import BUNDLED_DIR, bundled_names, resolve
from runtimes.errors import ModelNotFound, PackageError
from tests.conftest import PACKAGES

EDGE_FLEET = Path(sys.executable).parent / "edge-fleet"


def copy_package(tmp_path: Path) -> Path:
    target = tmp_path / "pkg"
    shutil.copytree(PACKAGES[("onnx", "int8")], target)
    return target


def test_every_bundled_package_verifies() -> None:
    names = bundled_names()
    detectors = bundled_names("detection")
    assert len(detectors) >= 4 and set(detectors) < set(names)
    assert {"llm", "diffusion"} <= {read_manifest(BUNDLED_DIR / n).task for n in names}
    for name in names:
        ref = resolve(name)
        assert ref.manifest is not None and ref.directory is not None
        verify_files(ref.directory, ref.manifest)
        if name in detectors:
            assert ref.manifest.params["input_size"] == [416, 416]
            assert len(ref.manifest.params["class_names"]) >= 1


def test_tampered_file_is_caught(tmp_path: Path) -> None:
    pkg = copy_package(tmp_path)
    model = pkg / "model.onnx"
    data = bytearray(model.read_bytes())
    data[1000] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="sha256"):
        verify_files(pkg, read_manifest(pkg))
    model.write_bytes(bytes(data[:-10]))
    with pytest.raises(PackageError, match="size"):
        verify_files(pkg, read_manifest(pkg))


def test_manifest_errors_name_the_field(tmp_path: Path) -> None:
    pkg = copy_package(tmp_path)
    raw = json.loads((pkg / "model.json").read_text())
    raw["precision"] = "int3"
    raw["surprise"] = 1
    (pkg / "model.json").write_text(json.dumps(raw))
    with pytest.raises(PackageError) as info:
        read_manifest(pkg)
    assert "precision" in str(info.value) and "surprise" in str(info.value)


def test_paths_may_not_leave_the_package(tmp_path: Path) -> None:
    pkg = copy_package(tmp_path)
    raw = json.loads((pkg / "model.json").read_text())
    raw["files"][0]["path"] = "../../etc/passwd"
    raw["model"] = "../../etc/passwd"
    (pkg / "model.json").write_text(json.dumps(raw))
    with pytest.raises(PackageError, match="leaves the package"):
        read_manifest(pkg)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"model\.json"):
        read_manifest(tmp_path)


def test_edge_fleet_package_verify_cli(tmp_path: Path) -> None:
    pkg = copy_package(tmp_path)
    ok = subprocess.run(
        [str(EDGE_FLEET), "package", "verify", "--unsigned-ok", str(pkg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and "1 file(s) ok" in ok.stdout
    (pkg / "model.onnx").write_bytes(b"tampered")
    bad = subprocess.run(
        [str(EDGE_FLEET), "package", "verify", "--unsigned-ok", str(pkg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "size" in bad.stderr
