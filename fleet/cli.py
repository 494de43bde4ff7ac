"""The `edge-fleet` command line (controller side)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from models.package import read_manifest, verify_files
from runtimes.errors import EdgeAgentError

# Sub-commands that live beside the feature they drive. Each module has
# `register(sub)`, which adds its parsers and sets `run=callable(args) -> int` on them.
COMMAND_MODULES: tuple[str, ...] = ()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-fleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    package = sub.add_parser("package", help="model packages")
    psub = package.add_subparsers(dest="package_command", required=True)
    inspect = psub.add_parser("inspect", help="print a package's model.json")
    inspect.add_argument("directory", type=Path)
    inspect.set_defaults(run=_package_inspect)
    verify = psub.add_parser("verify", help="check every file's size and sha256")
    verify.add_argument("directory", type=Path)
    verify.set_defaults(run=_package_verify)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _package_inspect(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.directory)
    print(json.dumps(manifest.model_dump(mode="json", by_alias=True), indent=2))
    return 0


def _package_verify(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.directory)
    verify_files(args.directory, manifest)
    print(f"{args.directory}: {manifest.name} {manifest.version}, {len(manifest.files)} file(s) ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
    except EdgeAgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
