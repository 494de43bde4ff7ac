"""The OTA state machine and its persistence (agent/ota/state.py), and the model store's
pointers, staging and clean-up (agent/ota/store.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agent.ota.state import (
    TRANSITIONS,
    OtaError,
    OtaState,
    PipelineOta,
    StateFiles,
    settled,
    transition,
)
from agent.ota.store import ModelStore, Pointer
from models.package import read_manifest
from models.zoo import BUNDLED_DIR

S = OtaState


def test_the_happy_path_and_what_is_refused() -> None:
    rec = PipelineOta("cam")
    for state in (S.DOWNLOADING, S.VERIFYING, S.VALIDATING, S.ACTIVATING, S.TRIAL, S.COMMITTED):
        transition(rec, state)
    assert rec.state is S.COMMITTED and settled(rec.state)
    with pytest.raises(OtaError, match="committed -> trial"):
        transition(rec, S.TRIAL)
    transition(rec, S.DOWNLOADING)
    with pytest.raises(OtaError):
        transition(rec, S.COMMITTED)  # never without verify, validate, activate, trial
    transition(rec, S.REJECTED, "bad_signature: x")
    assert rec.reason == "bad_signature: x"
    # a trial only ends in commit or roll back; every busy state can be left
    assert TRANSITIONS[S.TRIAL] == {S.COMMITTED, S.ROLLED_BACK}
    assert all(TRANSITIONS[s] for s in OtaState)


def test_records_persist_atomically(tmp_path: Path) -> None:
    files = StateFiles(tmp_path)
    rec = PipelineOta("cam", target={"name": "m", "version": "2", "package": "ab"}, revision=4)
    transition(rec, S.DOWNLOADING)
    rec.progress.bytes = 10
    rec.refused["cd"] = 3
    files.save(rec)
    again = files.load("cam")
    assert again == rec and again.state is S.DOWNLOADING
    assert not list((tmp_path / "ota").glob(".*tmp"))
    files.record_path("cam").write_text("{not json")
    damaged = files.load("cam")
    assert damaged.state is S.IDLE and damaged.target is None
    files.record_path("cam").write_text(json.dumps({"state": "bogus"}))
    assert files.load("cam").state is S.IDLE
    assert files.load_desired() is None
    files.save_desired({"revision": 3})
    assert files.load_desired() == {"revision": 3}


def _stage(store: ModelStore, name: str) -> str:
    src = BUNDLED_DIR / name
    manifest = read_manifest(src)
    for entry in manifest.files:
        shutil.copyfile(src / entry.path, store.blob_path(entry.sha256))
    doc = json.loads((src / "model.json").read_text())
    pid = name.replace("-", "")[:20]
    store.stage(pid, doc, manifest)
    return pid


def test_store_stages_points_and_rolls_back(tmp_path: Path) -> None:
    store = ModelStore(tmp_path).ensure()
    a = _stage(store, "yolox-nano-onnx-fp32")
    b = _stage(store, "yolox-nano-onnx-int8")
    assert store.has_package(a) and read_manifest(store.package_dir(a)).precision == "fp32"
    assert store.pointer("cam") == Pointer() and store.startup_models("cam") == []
    assert store.activate("cam", a) == Pointer(a, None)
    assert store.activate("cam", b) == Pointer(b, a)
    assert store.startup_models("cam") == [store.package_dir(b), store.package_dir(a)]
    assert store.rollback("cam", "other") == Pointer(b, a)  # not the current one: no change
    assert store.rollback("cam", b) == Pointer(a, None)
    assert store.rollback("cam", a) == Pointer(None, None)  # back to the config's model
    # clean-up keeps what the pointers name and the newest others up to the limit
    store.activate("cam", b)
    c = _stage(store, "yolox-nano-tflite-int8")
    removed = store.collect_garbage({b}, max_packages=2)
    assert removed == [a] and store.has_package(b) and store.has_package(c)
    assert sorted(p.name for p in store.blobs.iterdir()) == sorted(
        e.sha256
        for n in ("yolox-nano-onnx-int8", "yolox-nano-tflite-int8")
        for e in read_manifest(BUNDLED_DIR / n).files
    )
