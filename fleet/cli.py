"""The `edge-fleet` command line (controller side)."""

from __future__ import annotations

import argparse
import importlib
import sys

from runtimes.errors import EdgeAgentError

# Sub-commands that live beside the feature they drive. Each module has
# `register(sub)`, which adds its parsers and sets `run=callable(args) -> int` on them.
COMMAND_MODULES: tuple[str, ...] = ("fleet.cli_package", "fleet.cli_ca", "fleet.cli_fleet")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-fleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


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
