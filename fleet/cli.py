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


def _tags_after_the_device(argv: list[str]) -> list[str]:
    """`edge-fleet tag ID -north`: a -TAG is a tag to remove, not an option. Put `--` in
    front of the positionals so that argparse does not read them as options."""
    if not argv or argv[0] != "tag" or "--" in argv:
        return argv
    options: list[str] = []
    positionals: list[str] = []
    rest = iter(argv[1:])
    for token in rest:
        if token in ("-h", "--help") or token.startswith("--home="):
            options.append(token)
        elif token == "--home":
            options += [token, next(rest, "")]
        else:
            positionals.append(token)
    return ["tag", *options, "--", *positionals]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(_tags_after_the_device(argv))
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
    except EdgeAgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
