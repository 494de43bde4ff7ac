"""`edge-fleet keys init` and `package build/verify` (fleet/cli_package.py), in process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fleet.cli import main
from models.package import read_manifest
from models.zoo import BUNDLED_DIR


def test_keys_build_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    assert main(["keys", "init", "--home", str(home)]) == 0
    assert (home / "keys" / "fleet.key").stat().st_mode & 0o777 == 0o600
    assert main(["keys", "init", "--home", str(home)]) == 1
    assert "exists" in capsys.readouterr().err
    pkg = tmp_path / "pkg"
    shutil.copytree(BUNDLED_DIR / "yolox-nano-onnx-int8", pkg)
    np.save(pkg / "in.npy", np.zeros((1, 3, 416, 416), np.float32))
    args = ["package", "build", str(pkg), "--name", "n", "--version", "2.0.0", "--home", str(home)]
    assert main([*args, "--test-vector", "in.npy", "--atol", "0.01"]) == 0
    manifest = read_manifest(pkg)
    assert manifest.version == "2.0.0" and manifest.precision == "int8"
    assert manifest.params["class_names"][0] == "circle"  # kept from the old model.json
    vector = manifest.test_vectors[0]
    assert vector.input == "in.npy" and vector.outputs == ["test0_out0.npy"]
    assert np.load(pkg / "test0_out0.npy").shape[-1] == 11 and vector.atol == 0.01
    assert {f.path for f in manifest.files} == {"model.onnx", "in.npy", "test0_out0.npy"}
    capsys.readouterr()
    assert main(["package", "verify", str(pkg), "--home", str(home)]) == 0
    assert "signed by" in capsys.readouterr().out
    other = tmp_path / "other"
    assert main(["keys", "init", "--home", str(other)]) == 0
    assert main(["package", "verify", str(pkg), "--trust", str(other / "keys/fleet.pub")]) == 1
    assert "not a trusted one" in capsys.readouterr().err
    doc = json.loads((pkg / "model.json").read_text())
    doc["version"] = "3.0.0"
    (pkg / "model.json").write_text(json.dumps(doc))
    assert main(["package", "verify", str(pkg), "--home", str(home)]) == 1
    assert "does not match" in capsys.readouterr().err


def test_build_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    assert main(["keys", "init", "--home", str(home)]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        main(["package", "build", str(empty), "--name", "n", "--version", "1", "--home", str(home)])
        == 1
    )
    assert "no model files" in capsys.readouterr().err
    assert (
        main(
            [
                "package",
                "build",
                str(tmp_path / "nope"),
                "--name",
                "n",
                "--version",
                "1",
                "--home",
                str(home),
            ]
        )
        == 1
    )
    assert "not a directory" in capsys.readouterr().err
