"""`edge-fleet keys init` and `edge-fleet package build|inspect|verify|publish`: the fleet
signing key, and signed model packages (model.json with hashes, test vectors, signature).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from fleet.home import FleetHome, add_home_arg
from models.desired import package_id
from models.package import MANIFEST, Manifest, file_entry, read_manifest, verify_files
from models.signing import (
    generate_key,
    key_id,
    load_private_key,
    load_trusted_keys,
    save_private_key,
    save_public_key,
    sign_document,
    verify_document,
)
from runtimes.base import RuntimeOptions
from runtimes.errors import PackageError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="the fleet signing key")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    init = ksub.add_parser("init", help="make the fleet's Ed25519 package-signing key")
    add_home_arg(init)
    init.add_argument("--force", action="store_true", help="replace an existing key")
    init.set_defaults(run=_keys_init)

    package = sub.add_parser("package", help="model packages")
    psub = package.add_subparsers(dest="package_command", required=True)
    build = psub.add_parser("build", help="write a signed model.json for a directory")
    build.add_argument("directory", type=Path)
    build.add_argument("--name", required=True, help="model name, stable across versions")
    build.add_argument("--version", required=True, help="version (compared per name)")
    build.add_argument("--model", help="the main model file (default: the one model file)")
    build.add_argument("--task", choices=("detection", "llm", "diffusion"))
    build.add_argument("--family", help="model family (default: yolox for detection)")
    build.add_argument("--runtime", choices=("tflite", "onnx", "tensorrt"))
    build.add_argument("--precision", choices=("fp32", "fp16", "int8", "int16x8", "int4"))
    build.add_argument(
        "--param", action="append", default=[], metavar="KEY=JSON", help="a family parameter"
    )
    build.add_argument("--min-memory-mb", type=int)
    build.add_argument("--accelerator", action="append", help="a required accelerator")
    build.add_argument("--description")
    build.add_argument(
        "--file", action="append", default=[], help="another file of the package (e.g. labels)"
    )
    build.add_argument(
        "--test-vector",
        action="append",
        default=[],
        metavar="INPUT.npy[:OUT.npy,...]",
        help="an input and its expected outputs; without outputs they are computed by "
        "running the model",
    )
    build.add_argument("--atol", type=float, default=1e-3, help="test vector tolerance")
    build.add_argument("--rtol", type=float, default=1e-3, help="test vector tolerance")
    build.add_argument("--key", type=Path, help="signing key (default: the home's)")
    add_home_arg(build)
    build.set_defaults(run=_package_build)

    inspect = psub.add_parser("inspect", help="print a package's model.json")
    inspect.add_argument("directory", type=Path)
    inspect.set_defaults(run=_package_inspect)

    verify = psub.add_parser("verify", help="check files, sizes, sha256 and the signature")
    verify.add_argument("directory", type=Path)
    verify.add_argument(
        "--trust", type=Path, action="append", default=[], help="a trusted .pub (or dir)"
    )
    verify.add_argument("--unsigned-ok", action="store_true", help="skip the signature check")
    add_home_arg(verify)
    verify.set_defaults(run=_package_verify)

    publish = psub.add_parser("publish", help="copy a package into the home's blob store")
    publish.add_argument("directory", type=Path)
    add_home_arg(publish)
    publish.set_defaults(run=_package_publish)


# --- keys ----------------------------------------------------------------------------------


def init_keys(home: FleetHome, force: bool = False) -> str:
    """Make the fleet signing key; returns its key id. Refuses to replace one unless forced."""
    if home.signing_key.exists() and not force:
        raise PackageError(
            f"{home.signing_key} exists; --force replaces it (devices trusting the old "
            "public key will refuse packages signed by the new one)"
        )
    home.ensure()
    key = generate_key()
    save_private_key(home.signing_key, key)
    save_public_key(home.signing_pub, key.public_key())
    return key_id(key.public_key())


def _keys_init(args: argparse.Namespace) -> int:
    home = FleetHome.from_args(args)
    kid = init_keys(home, args.force)
    print(f"fleet signing key {kid}: {home.signing_key}; give devices {home.signing_pub}")
    return 0


# --- build -----------------------------------------------------------------------------------


def _existing(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        return {}
    try:
        doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PackageError(f"{path}: not valid JSON: {exc}") from exc
    return doc


def _guess_model(directory: Path) -> str:
    found = sorted(
        p.name
        for p in directory.iterdir()
        if p.suffix in (".onnx", ".tflite", ".engine", ".plan", ".gguf")
    )
    if len(found) != 1:
        raise PackageError(f"{directory}: found {found or 'no model files'}; name one with --model")
    return found[0]


def _runtime_for(model: str) -> str:
    return "tflite" if model.endswith(".tflite") else "onnx"


def compute_outputs(model_path: Path, runtime: str, feed: np.ndarray) -> list[np.ndarray]:
    """Run the model once on `feed` (the runtime's own (de)quantization on)."""
    from runtimes.registry import load

    rt = load(model_path, runtime if runtime != "tensorrt" else "onnx", RuntimeOptions())
    try:
        return [np.asarray(o) for o in rt.run([feed])]
    finally:
        rt.close()


def build_package(
    directory: Path,
    *,
    name: str,
    version: str,
    key_path: Path,
    model: str | None = None,
    task: str | None = None,
    family: str | None = None,
    runtime: str | None = None,
    precision: str | None = None,
    params: dict[str, Any] | None = None,
    min_memory_mb: int | None = None,
    accelerators: list[str] | None = None,
    description: str | None = None,
    extra_files: list[str] | None = None,
    test_vectors: list[tuple[Path, list[Path]]] | None = None,
    atol: float = 1e-3,
    rtol: float = 1e-3,
) -> dict[str, Any]:
    """Write a signed model.json into `directory`; returns the signed document.

    What is not given comes from an existing model.json there, else sensible defaults.
    Test vectors given without outputs get them by running the model.
    """
    if not directory.is_dir():
        raise PackageError(f"{directory}: not a directory")
    old = _existing(directory)
    model = model or old.get("model") or _guess_model(directory)
    if not (directory / model).is_file():
        raise PackageError(f"{directory / model}: no such model file")
    runtime = runtime or old.get("runtime") or _runtime_for(model)
    hardware = dict(old.get("hardware", {}))
    if min_memory_mb is not None:
        hardware["min_memory_mb"] = min_memory_mb
    if accelerators is not None:
        hardware["accelerators"] = accelerators
    files = [model, *(_inside(directory, Path(f)) for f in extra_files or [])]
    vectors: list[dict[str, Any]] = []
    for index, (feed_path, outputs) in enumerate(test_vectors or []):
        feed_name = _inside(directory, feed_path)
        if not outputs:
            feed = np.load(directory / feed_name, allow_pickle=False)
            computed = compute_outputs(directory / model, runtime, feed)
            outputs = []
            for o, array in enumerate(computed):
                out = directory / f"test{index}_out{o}.npy"
                np.save(out, array, allow_pickle=False)
                outputs.append(out)
        out_names = [_inside(directory, p) for p in outputs]
        files += [feed_name, *out_names]
        vectors.append({"input": feed_name, "outputs": out_names, "atol": atol, "rtol": rtol})
    doc: dict[str, Any] = {
        "schema": 1,
        "name": name,
        "version": version,
        "task": task or old.get("task") or "detection",
        "family": family or old.get("family") or "yolox",
        "runtime": runtime,
        "precision": precision or old.get("precision") or "fp32",
        "model": model,
        "files": [file_entry(directory, f).model_dump(mode="json") for f in dict.fromkeys(files)],
        "params": {**old.get("params", {}), **(params or {})},
        "hardware": hardware,
        "test_vectors": vectors,
        "description": description if description is not None else old.get("description", ""),
    }
    Manifest.model_validate(doc)  # our own output must parse
    signed = sign_document(doc, load_private_key(key_path))
    path = directory / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(signed, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
    read_manifest(directory)
    return signed


def _inside(directory: Path, path: Path) -> str:
    full = path if path.is_absolute() else (Path.cwd() / path)
    if not full.is_file():
        full = directory / path
    try:
        return str(full.resolve().relative_to(directory.resolve()))
    except ValueError:
        raise PackageError(f"{path}: test vector files must lie inside {directory}") from None


def _parse_param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise PackageError(f"--param {text!r}: expected KEY=JSON")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _package_build(args: argparse.Namespace) -> int:
    home = FleetHome.from_args(args)
    vectors = []
    for spec in args.test_vector:
        feed, _, outs = spec.partition(":")
        vectors.append((Path(feed), [Path(o) for o in outs.split(",") if o]))
    signed = build_package(
        args.directory,
        name=args.name,
        version=args.version,
        key_path=args.key or home.signing_key,
        model=args.model,
        task=args.task,
        family=args.family,
        runtime=args.runtime,
        precision=args.precision,
        params=dict(_parse_param(p) for p in args.param),
        min_memory_mb=args.min_memory_mb,
        accelerators=args.accelerator,
        description=args.description,
        extra_files=args.file,
        test_vectors=vectors,
        atol=args.atol,
        rtol=args.rtol,
    )
    print(
        f"{args.directory / MANIFEST}: {args.name} {args.version}, {len(signed['files'])} "
        f"file(s), signed by {signed['signature']['key_id']}, package {package_id(signed)}"
    )
    return 0


# --- inspect / verify / publish -------------------------------------------------------------


def _package_inspect(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.directory)
    print(json.dumps(manifest.model_dump(mode="json", by_alias=True), indent=2))
    return 0


def verify_package(directory: Path, trust: list[Path], unsigned_ok: bool = False) -> str:
    """Files, sizes, sha256 and (unless unsigned_ok) the signature; returns a summary."""
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    signer = "not checked"
    if not unsigned_ok:
        keys = load_trusted_keys(*trust)
        if not keys:
            raise PackageError("no trusted keys: give --trust KEY.pub or run `keys init`")
        doc = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        signer = "signed by " + verify_document(doc, keys, str(directory / MANIFEST))
    count = len(manifest.files)
    return f"{directory}: {manifest.name} {manifest.version}, {count} file(s) ok, {signer}"


def _package_verify(args: argparse.Namespace) -> int:
    trust = list(args.trust) or [FleetHome.from_args(args).signing_pub]
    print(verify_package(args.directory, trust, args.unsigned_ok))
    return 0


def _package_publish(args: argparse.Namespace) -> int:
    from fleet.blobs import BlobStore

    pid = BlobStore(FleetHome.from_args(args)).add_package(args.directory)
    print(pid)
    return 0
