"""The `edge-fleet` command line (controller side). Today: inspecting and checking model
packages; enrolment, signing, rollouts and `serve` arrive with the OTA issue.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models.package import read_manifest, verify_files
from runtimes.errors import EdgeAgentError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-fleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    package = sub.add_parser("package", help="model packages")
    psub = package.add_subparsers(dest="package_command", required=True)
    inspect = psub.add_parser("inspect", help="print a package's model.json")
    inspect.add_argument("directory", type=Path)
    verify = psub.add_parser("verify", help="check every file's size and sha256")
    verify.add_argument("directory", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = read_manifest(args.directory)
        if args.package_command == "inspect":
            print(json.dumps(manifest.model_dump(mode="json", by_alias=True), indent=2))
            return 0
        verify_files(args.directory, manifest)
        print(
            f"{args.directory}: {manifest.name} {manifest.version}, "
            f"{len(manifest.files)} file(s) ok"
        )
        return 0
    except EdgeAgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
