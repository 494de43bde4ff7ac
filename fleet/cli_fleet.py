"""`edge-fleet deploy|devices|status|cmd|tag|serve|rollout`: the operator's commands over
the registry, the blob store and the broker (parsing and printing; the work is elsewhere).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
import uuid
from typing import Any

from fleet.blobs import BlobStore
from fleet.deploy import (
    Deployer,
    DeployError,
    OutcomeWatcher,
    fetch_retained,
    resolve_package,
    signing_key,
)
from fleet.home import FleetHome, add_home_arg
from fleet.mqtt import FleetClient, FleetLinkError, Message, add_broker_args, connect
from fleet.registry import Registry
from fleet.rollout import LEASE_S, RolloutDriver, create_rollout, parse_stages

Sub = argparse._SubParsersAction


def register(sub: Sub) -> None:
    p = sub.add_parser("deploy", help="set a package as desired on devices")
    p.add_argument("package", help="package directory (published now) or package id")
    p.add_argument("--device", action="append", default=[], help="device id (repeatable)")
    p.add_argument("--tag", help="every registry device with this tag")
    p.add_argument("--pipeline", help="default: the device's first pipeline, else 'default'")
    p.add_argument("--allow-downgrade", action="store_true", help="sign an explicit downgrade")
    p.add_argument("--wait", action="store_true", help="follow each device's OTA state")
    p.add_argument("--timeout", type=float, default=600.0, help="--wait limit, seconds")
    _common(p, _deploy)

    p = sub.add_parser("devices", help="the registry's devices")
    p.add_argument("--json", action="store_true")
    add_home_arg(p)
    p.set_defaults(run=_devices)

    p = sub.add_parser("status", help="one device's reported state and last telemetry")
    p.add_argument("device")
    p.add_argument("--live", action="store_true", help="read retained topics from the broker")
    _common(p, _status)

    p = sub.add_parser("cmd", help="send a command to a device and print the reply")
    p.add_argument("device")
    p.add_argument("name", help="command name, e.g. ping, status, llm.generate")
    p.add_argument(
        "args", nargs="*", help="key=value pairs (values as JSON if they parse) or one JSON object"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds without a reply")
    _common(p, _cmd)

    p = sub.add_parser("tag", help="set a device's tags in the registry")
    p.add_argument("device")
    p.add_argument("tags", nargs="*", help="+TAG adds, -TAG removes, TAG sets")
    add_home_arg(p)
    p.set_defaults(run=_tag)

    p = sub.add_parser("serve", help="registry updater, blob server, rollouts, enrolment")
    p.add_argument("-v", "--verbose", action="store_true")
    _common(p, _serve)

    r = sub.add_parser("rollout", help="staged rollouts").add_subparsers(
        dest="rollout_command", required=True
    )
    p = r.add_parser("start", help="roll a package out in stages and wait for it")
    p.add_argument("package")
    p.add_argument("--select", required=True, help="all | tag=T | id1,id2,...")
    p.add_argument("--stages", default="1,10,50,100", help="percentages (default 1,10,50,100)")
    p.add_argument("--counts", action="store_true", help="--stages are device counts ('all')")
    p.add_argument("--max-failures", default="5%", help="tolerated failures: 5%% or 2")
    p.add_argument("--device-timeout", type=float, default=600.0, help="seconds per device")
    p.add_argument("--pipeline")
    p.add_argument("--detach", action="store_true", help="record it; `serve` drives it")
    _common(p, _rollout_start)
    p = r.add_parser("status", help="one rollout, or all")
    p.add_argument("id", nargs="?", type=int)
    p.add_argument("--json", action="store_true")
    add_home_arg(p)
    p.set_defaults(run=_rollout_status)
    p = r.add_parser("abort", help="stop a rollout (devices keep what they run)")
    p.add_argument("id", type=int)
    add_home_arg(p)
    p.set_defaults(run=_rollout_abort)
    p = r.add_parser("resume", help="drive a running rollout whose driver stopped")
    p.add_argument("id", type=int)
    _common(p, _rollout_resume)


def _common(p: argparse.ArgumentParser, run: Any) -> None:
    add_home_arg(p)
    add_broker_args(p)
    p.set_defaults(run=run)


def _registry(args: argparse.Namespace) -> tuple[FleetHome, Registry]:
    home = FleetHome.from_args(args)
    home.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return home, Registry(home.registry)


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    s = max(0.0, time.time() - ts)
    return (
        f"{s:.0f}s ago"
        if s < 120
        else f"{s / 60:.0f}m ago"
        if s < 7200
        else (f"{s / 3600:.0f}h ago")
    )


# --- deploy ------------------------------------------------------------------------------


def _deploy(args: argparse.Namespace) -> int:
    home, registry = _registry(args)
    with registry:
        ids = list(args.device)
        if args.tag:
            ids += [
                d.id
                for d in registry.devices()
                if args.tag in d.tags and d.id not in ids and not d.revoked
            ]
        revoked = [i for i in ids if (rec := registry.device(i)) is not None and rec.revoked]
        if revoked:
            raise DeployError(f"revoked device(s) {', '.join(revoked)}: not deployed to")
        if not ids:
            raise DeployError("give --device ID (repeatable) or --tag T (matching a device)")
        key = signing_key(home)
        store = BlobStore(home)
        pid, manifest = resolve_package(store, args.package)
        with connect(args) as client:
            deployer = Deployer(client, registry, store, key)
            last: dict[str, str] = {}

            def progress(dev: str, entry: dict[str, Any]) -> None:
                if (entry.get("target") or {}).get("package") != pid:
                    return
                pct = (entry.get("progress") or {}).get("percent")
                line = f"{dev}: {entry.get('state')}" + (f" {pct:.0f}%" if pct else "")
                if entry.get("reason"):
                    line += f" ({entry['reason']})"
                if last.get(dev) != line:
                    last[dev] = line
                    print(line, flush=True)

            watcher = OutcomeWatcher(client, pid, progress) if args.wait else None
            for dev in ids:
                device = deployer.known_device(dev)
                pipeline = args.pipeline or deployer.default_pipeline(device)
                if watcher is not None:
                    watcher.watch(dev, pipeline)
                rev = deployer.deploy(dev, pipeline, pid, manifest, args.allow_downgrade, device)
                print(
                    f"{dev}: {manifest['name']} {manifest['version']} -> pipeline "
                    f"{pipeline}, desired revision {rev} (package {pid[:12]})",
                    flush=True,
                )
            if watcher is None:
                return 0
            results = watcher.wait(args.timeout)
        bad = {d: r for d, r in results.items() if r != "committed"}
        for d, r in results.items():
            print(f"{d}: {r}")
        return 1 if bad else 0


# --- devices, status, tag ------------------------------------------------------------------


def _devices(args: argparse.Namespace) -> int:
    _home, registry = _registry(args)
    with registry:
        devices = registry.devices()
    if args.json:
        print(json.dumps([d.as_json() for d in devices], indent=2))
        return 0
    rows = [("ID", "ONLINE", "MODELS", "LAST SEEN", "FPS")]
    for d in devices:
        models = ", ".join(f"{p}={m}" for p, m in d.models().items()) or "-"
        rows.append(
            (
                d.id + (" (revoked)" if d.revoked else ""),
                "yes" if d.online else "no",
                models,
                _ago(d.last_seen),
                "-" if d.fps is None else f"{d.fps:g}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if not devices:
        print("(no devices yet: `edge-fleet serve` fills the registry from the broker)")
    return 0


def _status(args: argparse.Namespace) -> int:
    _home, registry = _registry(args)
    with registry:
        device = None if args.live else registry.device(args.device)
    if device is not None and device.reported:
        out = {
            "device": args.device,
            "source": "registry",
            "online": device.online,
            "last_seen": device.last_seen,
            "status": device.status,
            "reported": device.reported,
            "telemetry": device.telemetry or None,
        }
    else:  # no serve filling the registry: what the broker keeps retained
        with connect(args) as client:
            t = f"edge/{args.device}/"
            got = fetch_retained(client, [t + "status", t + "reported"], 0.3, 2.0)
        if not got:
            raise DeployError(
                f"unknown device {args.device!r}: not in the registry and "
                f"nothing retained on the broker"
            )
        status = got.get(t + "status", {})
        out = {
            "device": args.device,
            "source": "broker",
            "online": status.get("status") == "online",
            "status": status,
            "reported": got.get(t + "reported"),
            "telemetry": None,
        }
    print(json.dumps(out, indent=2))
    return 0


def _tag(args: argparse.Namespace) -> int:
    _home, registry = _registry(args)
    with registry:
        device = registry.device(args.device)
        if device is None:
            raise DeployError(f"unknown device {args.device!r}")
        tags = set(device.tags)
        for t in args.tags:
            if t.startswith("+"):
                tags.add(t[1:])
            elif t.startswith("-"):
                tags.discard(t[1:])
            else:
                tags = {t} if t == args.tags[0] else tags | {t}
        registry.set_tags(args.device, sorted(tags))
    print(f"{args.device}: {', '.join(sorted(tags)) or '(no tags)'}")
    return 0


# --- cmd ---------------------------------------------------------------------------------


def parse_args_list(items: list[str]) -> dict[str, Any]:
    """One JSON object, or key=value pairs (a value that parses as JSON is taken as JSON)."""
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        try:
            obj = json.loads(items[0])
        except ValueError as exc:
            raise DeployError(f"ARGS: not a JSON object: {exc}") from None
        if not isinstance(obj, dict):
            raise DeployError("ARGS: the JSON must be an object")
        return obj
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DeployError(f"ARGS: {item!r} is not key=value (or give one JSON object)")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _final(msg: Message) -> bool:
    """A reply is final unless it says more follow (streams: chunks, progress, queued)."""
    try:
        body = json.loads(msg.payload)
    except ValueError:
        return True
    if not isinstance(body, dict):
        return True
    if body.get("done") is True or "ok" in body:
        return True
    return not (
        "seq" in body
        or body.get("more") is True
        or body.get("type") in ("queued", "progress", "chunk")
        or body.get("state") in ("queued", "progress", "chunk")
    )


def _cmd(args: argparse.Namespace) -> int:
    body = parse_args_list(args.args)
    replies: list[dict[str, Any]] = []

    def show(msg: Message) -> None:
        try:
            obj = json.loads(msg.payload)
        except ValueError:
            print(msg.payload.decode(errors="replace"), flush=True)
            return
        replies.append(obj if isinstance(obj, dict) else {"value": obj})
        print(json.dumps(obj, indent=None if not _final(msg) else 2), flush=True)

    with connect(args) as client:
        topic = f"edge/{args.device}/reply/fleet-{uuid.uuid4().hex[:8]}"
        try:
            client.request(
                f"edge/{args.device}/cmd/{args.name}",
                json.dumps(body),
                topic,
                timeout=args.timeout,
                until=_final,
                on_message=show,
            )
        except FleetLinkError as exc:
            raise FleetLinkError(f"{exc} (is {args.device} online?)") from None
    last = replies[-1] if replies else {}
    ok = last.get("ok", last.get("done", True))
    if last.get("error") or ok is False:
        return 1
    return 0


# --- serve -------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from fleet.serve import Server

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    home, registry = _registry(args)
    home.ensure()
    with registry, connect(args, client_id=f"edge-fleet-serve-{uuid.uuid4().hex[:6]}") as c:
        Server(c, home, registry).run()
    return 0


# --- rollout -----------------------------------------------------------------------------


def _drive(client: FleetClient, home: FleetHome, registry: Registry, rid: int) -> int:
    deployer = Deployer(client, registry, BlobStore(home), signing_key(home))
    stop = threading.Event()
    state = RolloutDriver(
        deployer, rid, stop, progress=lambda s: print(s, flush=True), poll_s=0.2
    ).run()
    print(f"rollout {rid}: {state}")
    return 0 if state == "completed" else 1


def _rollout_start(args: argparse.Namespace) -> int:
    stages = parse_stages(args.stages, args.counts)
    home, registry = _registry(args)
    with registry:
        key = signing_key(home)
        store = BlobStore(home)
        pid, manifest = resolve_package(store, args.package)
        with connect(args) as client:
            deployer = Deployer(client, registry, store, key)
            rid = create_rollout(
                deployer,
                pid,
                args.pipeline,
                args.select,
                stages,
                args.counts,
                args.max_failures,
                args.device_timeout,
            )
            r = registry.rollout(rid)
            if not args.detach:
                registry.set_rollout(rid, heartbeat=time.time())
            print(
                f"rollout {rid}: {manifest['name']} {manifest['version']} to "
                f"{len(r['devices'])} device(s), stages {r['stages']}, at most "
                f"{r['max_failures']} failure(s)",
                flush=True,
            )
            if args.detach:
                return 0
            return _drive(client, home, registry, rid)


def _rollout_resume(args: argparse.Namespace) -> int:
    home, registry = _registry(args)
    with registry:
        r = registry.rollout(args.id)
        if r["state"] != "running":
            raise DeployError(f"rollout {args.id} is {r['state']}: nothing to resume")
        if not registry.claim_rollout(args.id, LEASE_S):
            age = time.time() - (r["heartbeat"] or 0.0)
            raise DeployError(
                f"rollout {args.id} has a driver (its heartbeat is {age:.0f} s old: "
                f"`edge-fleet serve` or another `rollout start|resume`); it can be taken "
                f"over {LEASE_S:.0f} s after that driver stops"
            )
        with connect(args) as client:
            return _drive(client, home, registry, args.id)


def _rollout_status(args: argparse.Namespace) -> int:
    _home, registry = _registry(args)
    with registry:
        items = [registry.rollout(args.id)] if args.id is not None else registry.rollouts()
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    for r in items:
        print(
            f"rollout {r['id']}: {r['state']}, package {r['package'][:12]}, pipeline "
            f"{r['pipeline']}, select {r['selector']}, stage {r['stage'] + 1}/"
            f"{len(r['stages'])} {r['stages']}" + (f": {r['reason']}" if r["reason"] else "")
        )
        for d in r.get("devices", []):
            print(f"  {d['device']}: {d['state']}" + (f" ({d['reason']})" if d["reason"] else ""))
    if not items:
        print("(no rollouts)")
    return 0


def _rollout_abort(args: argparse.Namespace) -> int:
    _home, registry = _registry(args)
    with registry:
        r = registry.rollout(args.id)
        if r["state"] != "running":
            print(f"rollout {args.id} is already {r['state']}")
            return 0
        registry.set_rollout(args.id, state="aborted", reason="aborted by the operator")
    print(f"rollout {args.id}: aborted (devices keep what they run now)")
    return 0
