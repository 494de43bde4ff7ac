"""Ed25519 signatures over canonical JSON (models/signing.py)."""

from __future__ import annotations

import copy
import json
import stat

import pytest

from models.signing import (
    SignatureError,
    canonical_json,
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    load_trusted_keys,
    save_private_key,
    save_public_key,
    sign_document,
    verify_document,
)
from runtimes.errors import PackageError


@pytest.fixture()
def key():
    return generate_key()


def trusted(*keys):
    return {key_id(k.public_key()): k.public_key() for k in keys}


def test_canonical_json_is_order_and_space_independent():
    a = json.loads('{"b": [1, 2], "a": {"y": 1, "x": "é"}}')
    b = json.loads('{"a":{"x":"é","y":1},"b":[1,2]}')
    assert canonical_json(a) == canonical_json(b) == '{"a":{"x":"é","y":1},"b":[1,2]}'.encode()


def test_sign_and_verify_round_trip_through_json(key):
    doc = sign_document({"name": "m", "version": "1.0", "files": [{"path": "a"}]}, key)
    reread = json.loads(json.dumps(doc, indent=4))
    assert verify_document(reread, trusted(key)) == key_id(key.public_key())


def test_resigning_replaces_the_old_signature(key):
    other = generate_key()
    doc = sign_document(sign_document({"a": 1}, other), key)
    assert doc["signature"]["key_id"] == key_id(key.public_key())
    verify_document(doc, trusted(key))


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d.pop("signature"), "unsigned"),
        (lambda d: d["signature"].update(alg="rsa"), "bad_format"),
        (lambda d: d["signature"].update(value="%%%"), "bad_format"),
        (lambda d: d["signature"].update(key_id="0" * 16), "unknown_key"),
        (lambda d: d.update(version="9.9"), "bad_signature"),
        (lambda d: d.update(extra=True), "bad_signature"),
    ],
)
def test_tampering_is_caught_with_its_reason(key, mutate, reason):
    doc = sign_document({"name": "m", "version": "1.0"}, key)
    bad = copy.deepcopy(doc)
    mutate(bad)
    with pytest.raises(SignatureError) as info:
        verify_document(bad, trusted(key), what="model.json")
    assert info.value.reason == reason
    assert "model.json" in str(info.value)


def test_signature_by_an_untrusted_key_is_refused(key):
    doc = sign_document({"a": 1}, generate_key())
    with pytest.raises(SignatureError) as info:
        verify_document(doc, trusted(key))
    assert info.value.reason == "unknown_key"


def test_keys_on_disk(tmp_path, key):
    save_private_key(tmp_path / "fleet.key", key)
    save_public_key(tmp_path / "trust" / "fleet.pub", key.public_key())
    assert stat.S_IMODE((tmp_path / "fleet.key").stat().st_mode) == 0o600
    again = load_private_key(tmp_path / "fleet.key")
    assert key_id(again.public_key()) == key_id(key.public_key())
    assert key_id(load_public_key(tmp_path / "trust" / "fleet.pub")) == key_id(key.public_key())
    keys = load_trusted_keys(tmp_path / "trust", tmp_path / "missing.pub")
    assert list(keys) == [key_id(key.public_key())]


def test_bad_key_files_name_the_path(tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    with pytest.raises(PackageError, match=r"junk\.pem"):
        load_private_key(junk)
    with pytest.raises(PackageError, match=r"junk\.pem"):
        load_public_key(junk)
    with pytest.raises(PackageError, match="cannot read"):
        load_private_key(tmp_path / "absent.key")
