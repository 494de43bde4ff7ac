"""`edge-fleet` commands of the fleet CA and enrolment: ca init / issue-server / issue-client /
crl, claim create, revoke, enrol-serve (the enrolment service on its own)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from fleet.ca import CA_DAYS, CLIENT_DAYS, DEVICE_DAYS, SERVER_DAYS, CAError, FleetCA
from fleet.enrol import EnrolService, enrol_db, refresh_crl, revoke_device
from fleet.enrol_store import EnrolDenied
from fleet.home import FleetHome, add_home_arg
from fleet.mqtt import add_broker_args, connect
from fleet.registry import Registry
from provisioning.identity import parse_duration


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ca = sub.add_parser("ca", help="the fleet CA: device, broker and controller certificates")
    csub = ca.add_subparsers(dest="ca_command", required=True)

    init = csub.add_parser("init", help="make the fleet CA key, certificate and an empty CRL")
    add_home_arg(init)
    init.add_argument("--name", default="edge-fleet CA", help="the CA's CN")
    init.add_argument("--days", type=int, default=CA_DAYS, help=f"validity ({CA_DAYS})")
    init.set_defaults(run=_ca_init)

    server = csub.add_parser("issue-server", help="a certificate for the broker's TLS listener")
    add_home_arg(server)
    server.add_argument("--dns", action="append", default=[], help="DNS name (repeatable)")
    server.add_argument("--ip", action="append", default=[], help="IP address (repeatable)")
    server.add_argument("--days", type=int, default=SERVER_DAYS, help=f"validity ({SERVER_DAYS})")
    server.add_argument("--out", type=Path, help="directory (default: the CA directory)")
    server.add_argument("--force", action="store_true", help="replace existing files")
    server.set_defaults(run=_ca_issue_server)

    client = csub.add_parser(
        "issue-client", help="a client certificate for the controller or the shared claim one"
    )
    add_home_arg(client)
    client.add_argument(
        "name",
        choices=["fleet-controller", "claim"],
        help="fleet-controller (edge-fleet itself) or claim (what unenrolled devices use)",
    )
    client.add_argument("--days", type=int, default=CLIENT_DAYS, help=f"validity ({CLIENT_DAYS})")
    client.add_argument("--out", type=Path, help="directory (default: the CA directory)")
    client.add_argument("--force", action="store_true", help="replace existing files")
    client.set_defaults(run=_ca_issue_client)

    crl = csub.add_parser("crl", help="write the CRL again (do so before its next update)")
    add_home_arg(crl)
    crl.set_defaults(run=_ca_crl)

    claim = sub.add_parser("claim", help="claim tokens for enrolling devices")
    clsub = claim.add_subparsers(dest="claim_command", required=True)
    create = clsub.add_parser("create", help="make single-use claim tokens and print them")
    add_home_arg(create)
    create.add_argument("--count", type=int, default=1, help="how many (1)")
    create.add_argument("--expires", default="7d", help="lifetime: 7d, 12h, 90m (7d)")
    create.add_argument("--note", default="", help="a note kept with the tokens")
    create.set_defaults(run=_claim_create)

    revoke = sub.add_parser("revoke", help="cut a device off: CRL and no more renewals")
    add_home_arg(revoke)
    revoke.add_argument("device_id")
    revoke.set_defaults(run=_revoke)

    serve = sub.add_parser(
        "enrol-serve", help="answer enrolment and renewal requests until stopped"
    )
    add_home_arg(serve)
    add_broker_args(serve)
    serve.add_argument(
        "--cert-days", type=int, default=DEVICE_DAYS, help=f"device cert validity ({DEVICE_DAYS})"
    )
    serve.set_defaults(run=_enrol_serve)


def _ca_init(args: argparse.Namespace) -> int:
    home = FleetHome.from_args(args)
    ca = FleetCA.init(home, name=args.name, days=args.days)
    print(f"fleet CA: {ca.cert_path} (key {ca.dir / 'ca.key'}, mode 0600)")
    print(f"CRL: {ca.crl_path} (mosquitto crlfile)")
    print(f"valid until {ca.cert.not_valid_after_utc:%Y-%m-%d}")
    return 0


def _ca_issue_server(args: argparse.Namespace) -> int:
    ca = FleetCA.load(FleetHome.from_args(args))
    cn = (args.dns or args.ip or [""])[0]
    if not cn:
        raise CAError("a server certificate needs at least one --dns or --ip")
    cert, key = ca.issue_keypair(
        cn,
        args.out or ca.dir,
        usage="server",
        days=args.days,
        dns=args.dns,
        ips=args.ip,
        force=args.force,
        stem="server",
    )
    print(f"server certificate: {cert}\nkey: {key} (mode 0600)")
    return 0


def _ca_issue_client(args: argparse.Namespace) -> int:
    ca = FleetCA.load(FleetHome.from_args(args))
    cert, key = ca.issue_keypair(
        args.name, args.out or ca.dir, usage="client", days=args.days, force=args.force
    )
    print(f"client certificate {args.name}: {cert}\nkey: {key} (mode 0600)")
    return 0


def _ca_crl(args: argparse.Namespace) -> int:
    path = refresh_crl(FleetHome.from_args(args))
    print(f"CRL written: {path}; reload mosquitto to use it")
    return 0


def _claim_create(args: argparse.Namespace) -> int:
    if not 1 <= args.count <= 10000:
        print("error: --count must be between 1 and 10000", file=sys.stderr)
        return 2
    try:
        ttl = parse_duration(args.expires)
    except ValueError as exc:
        print(f"error: --expires {exc}", file=sys.stderr)
        return 2
    home = FleetHome.from_args(args)
    FleetCA.load(home)  # tokens are useless without a CA: say so now
    with enrol_db(home) as store:
        tokens = store.create_claims(args.count, ttl, args.note)
    for token in tokens:
        print(token)
    print(f"{len(tokens)} claim token(s), single use, valid for {args.expires}", file=sys.stderr)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    home = FleetHome.from_args(args)
    try:
        count, crl = revoke_device(home, args.device_id)
    except EnrolDenied as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with Registry(home.registry) as registry:  # deploys and rollouts leave it out from now
        registry.set_revoked(args.device_id)
    print(
        f"revoked {args.device_id} ({count} certificate(s)); CRL written to {crl}.\n"
        "mosquitto reads the CRL only at start: restart it (systemctl restart mosquitto) "
        "to refuse the device's connections."
    )
    return 0


def _enrol_serve(args: argparse.Namespace) -> int:
    home = FleetHome.from_args(args)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    client = connect(args, client_id=None)
    try:
        service = EnrolService(client, home, cert_days=args.cert_days)
        service.start()
        print(f"enrolment service on {client.settings.url}; SIGTERM stops", flush=True)
        stop.wait()
        service.stop()
    finally:
        client.close()
    return 0
