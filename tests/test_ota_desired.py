"""The signed desired-state document and the package id (models/desired.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from models.desired import DesiredError, build_desired, package_id, verify_desired
from models.signing import canonical_json, generate_key, key_id, sign_document
from tests.ota_support import fleet_home, signed_package, signing_key


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    root = tmp_path_factory.mktemp("desired")
    home = fleet_home(root / "home")
    _, doc = signed_package(home, root / "pkg", "0.2.0")
    key = signing_key(home)
    return key, {key_id(key.public_key()): key.public_key()}, doc


def test_package_id_is_sha256_of_canonical_json(setup: Any) -> None:
    _, _, doc = setup
    import hashlib

    assert package_id(doc) == hashlib.sha256(canonical_json(doc)).hexdigest()
    reordered = json.loads(json.dumps(doc, indent=3, sort_keys=False))
    assert package_id(reordered) == package_id(doc)
    changed = copy.deepcopy(doc)
    changed["version"] = "9.9.9"
    assert package_id(changed) != package_id(doc)


def test_round_trip(setup: Any) -> None:
    key, trusted, doc = setup
    desired = build_desired("dev-1", 7, {"cam": (doc, False), "door": (doc, True)}, key)
    state = verify_desired(json.loads(json.dumps(desired)), trusted, "dev-1", min_revision=7)
    assert state.revision == 7 and state.device == "dev-1"
    assert state.models["cam"].package_id == package_id(doc)
    assert state.models["cam"].manifest.version == "0.2.0"
    assert state.models["door"].allow_downgrade and not state.models["cam"].allow_downgrade
    assert state.key_id == key_id(key.public_key())


def _reject(doc: Any, trusted: Any, detail: str, device: str = "dev-1", **kw: Any) -> None:
    with pytest.raises(DesiredError) as info:
        verify_desired(doc, trusted, device, **kw)
    assert info.value.detail == detail and info.value.reason == "bad_desired"


def test_rejections(setup: Any) -> None:
    key, trusted, doc = setup
    desired = build_desired("dev-1", 3, {"cam": (doc, False)}, key)
    _reject(desired, trusted, "wrong_device", device="dev-2")
    _reject(desired, trusted, "stale_revision", min_revision=4)
    _reject({k: v for k, v in desired.items() if k != "signature"}, trusted, "unsigned")
    _reject(build_desired("dev-1", 3, {}, generate_key()), trusted, "unknown_key")
    tampered = copy.deepcopy(desired)
    tampered["models"]["cam"]["allow_downgrade"] = True
    _reject(tampered, trusted, "bad_signature")
    _reject([1, 2], trusted, "bad_format")
    bad_manifest = sign_document({**desired, "models": {"cam": {"manifest": {"name": 1}}}}, key)
    _reject(bad_manifest, trusted, "bad_format")
    bad_rev = sign_document({**desired, "revision": "3"}, key)
    _reject(bad_rev, trusted, "bad_format")
    extra = sign_document({**desired, "models": {"cam": {"manifest": doc, "x": 1}}}, key)
    _reject(extra, trusted, "bad_format")


def test_build_refuses_a_negative_revision(setup: Any, tmp_path: Path) -> None:
    key, _, doc = setup
    from runtimes.errors import PackageError

    with pytest.raises(PackageError, match="revision"):
        build_desired("dev-1", -1, {"cam": (doc, False)}, key)


def test_https_urls(setup: Any) -> None:
    from runtimes.errors import PackageError

    key, trusted, doc = setup
    desired = build_desired("dev-1", 1, {"cam": (doc, False)}, key, urls={"cam": "https://h/b/"})
    assert verify_desired(desired, trusted, "dev-1").models["cam"].url == "https://h/b/"
    assert (
        verify_desired(build_desired("dev-1", 1, {"cam": (doc, False)}, key), trusted, "dev-1")
        .models["cam"]
        .url
        is None
    )
    with pytest.raises(PackageError, match="must be https://"):
        build_desired("dev-1", 1, {"cam": (doc, False)}, key, urls={"cam": "http://h/"})
    plain = sign_document({**desired, "models": {"cam": {"manifest": doc, "url": "ftp://h/"}}}, key)
    _reject(plain, trusted, "bad_format")
