"""`edge-agent provision` (enrol with a claim token) and `edge-agent renew` (rotate the
device certificate); registered through `agent.cli.COMMAND_MODULES`."""

from __future__ import annotations

import argparse
import datetime as dt
import socket
import sys
from pathlib import Path

from agent.config import load_config
from provisioning.device import provision, renew
from provisioning.identity import load_cert, parse_duration
from runtimes.errors import EdgeAgentError

DEFAULT_CONFIG = Path("/etc/edge-agent/agent.toml")
DEFAULT_STATE = Path("/var/lib/edge-agent")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    prov = sub.add_parser(
        "provision", help="enrol this device with a claim token: key, certificate, agent.toml"
    )
    prov.add_argument("--broker", required=True, help="mqtts://HOST[:8883] of the fleet broker")
    prov.add_argument("--claim-token", required=True, help="token from `edge-fleet claim create`")
    prov.add_argument("--ca", type=Path, required=True, help="the fleet CA certificate (PEM)")
    prov.add_argument(
        "--claim-cert",
        type=Path,
        help="the shared claim certificate (default: claim.pem beside --ca)",
    )
    prov.add_argument("--claim-key", type=Path, help="its key (default: claim.key beside --ca)")
    prov.add_argument("--device-id", help="device id (default: this host's name)")
    prov.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE, help=f"state directory ({DEFAULT_STATE})"
    )
    prov.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"agent.toml to write ({DEFAULT_CONFIG})",
    )
    prov.add_argument("--force", action="store_true", help="replace an existing identity/config")
    prov.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (30)")
    prov.set_defaults(run=_provision)

    ren = sub.add_parser("renew", help="replace the device certificate before it expires")
    ren.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help=f"agent.toml ({DEFAULT_CONFIG})"
    )
    ren.add_argument(
        "--if-expiring-within",
        metavar="DURATION",
        help="only renew when the certificate expires within this (30d, 12h); default: always",
    )
    ren.add_argument(
        "--check",
        action="store_true",
        help="renew nothing: exit 1 when not due, 0 otherwise (a systemd ExecCondition)",
    )
    ren.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (30)")
    ren.set_defaults(run=_renew)


def _provision(args: argparse.Namespace) -> int:
    ca_dir = args.ca.parent
    outcome = provision(
        broker=args.broker,
        token=args.claim_token,
        ca_file=args.ca,
        claim_cert=args.claim_cert or ca_dir / "claim.pem",
        claim_key=args.claim_key or ca_dir / "claim.key",
        device_id=args.device_id or socket.gethostname().split(".")[0],
        state_dir=args.state_dir,
        config_out=args.config,
        force=args.force,
        timeout=args.timeout,
    )
    print(f"enrolled as {outcome.device_id}: certificate {outcome.cert}")
    print(f"valid until {outcome.not_after:%Y-%m-%d %H:%M}Z; config written to {outcome.config}")
    for path in outcome.trust:
        print(f"trusted package-signing key: {path}")
    return 0


def _renew(args: argparse.Namespace) -> int:
    within = None
    if args.if_expiring_within:
        try:
            within = parse_duration(args.if_expiring_within)
        except ValueError as exc:
            print(f"error: --if-expiring-within {exc}", file=sys.stderr)
            return 2
    if args.check:
        return _renew_due(args.config, within)
    outcome = renew(args.config, within=within, timeout=args.timeout)
    if not outcome.renewed:
        print(f"{outcome.cert} is valid until {outcome.not_after:%Y-%m-%d %H:%M}Z: not renewed")
        return 0
    print(f"renewed {outcome.cert}: valid until {outcome.not_after:%Y-%m-%d %H:%M}Z")
    return 0


def _renew_due(config: Path, within: dt.timedelta | None) -> int:
    """1 when the certificate is valid beyond `within`; 0 when due, or when anything is wrong
    (then the renewal itself runs and reports the problem)."""
    try:
        cert = load_config(config).mqtt.tls
        if cert is None or cert.cert_file is None or within is None:
            return 0
        left = load_cert(cert.cert_file).not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    except EdgeAgentError:
        return 0
    if left > within:
        print(f"{cert.cert_file}: valid for {left.days} more days, not due")
        return 1
    return 0
