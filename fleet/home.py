"""Where the controller keeps its state: signing keys, the fleet CA, the registry and the
blobs it serves. One directory, `--home` or `$EDGE_FLEET_HOME`, default `~/.edge-fleet`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "EDGE_FLEET_HOME"


def default_home() -> Path:
    env = os.environ.get(HOME_ENV)
    return Path(env) if env else Path.home() / ".edge-fleet"


def add_home_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help=f"controller state directory (env {HOME_ENV}; default ~/.edge-fleet)",
    )


@dataclass(frozen=True)
class FleetHome:
    """The layout of the controller's state directory."""

    root: Path

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FleetHome:
        return cls(getattr(args, "home", None) or default_home())

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def signing_key(self) -> Path:
        """The fleet's Ed25519 package-signing key (PEM, mode 0600)."""
        return self.keys_dir / "fleet.key"

    @property
    def signing_pub(self) -> Path:
        """Its public half: what devices trust (`<state_dir>/trust/*.pub`)."""
        return self.keys_dir / "fleet.pub"

    @property
    def ca_dir(self) -> Path:
        """The fleet CA that signs device certificates (provisioning)."""
        return self.root / "ca"

    @property
    def registry(self) -> Path:
        """The SQLite device registry."""
        return self.root / "registry.db"

    @property
    def blobs_dir(self) -> Path:
        """Package files by sha256, served to devices over MQTT."""
        return self.root / "blobs"

    @property
    def packages_dir(self) -> Path:
        """Published packages' signed model.json by package id."""
        return self.root / "packages"

    def ensure(self) -> FleetHome:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for d in (self.keys_dir, self.blobs_dir, self.packages_dir):
            d.mkdir(exist_ok=True, mode=0o700)
        return self
