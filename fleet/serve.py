"""`edge-fleet serve`: the registry updater, the blob server, the rollout engine (taking over
rollouts whose driver is gone) and, when the home has a CA, the enrolment service.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from types import FrameType
from typing import Any

from fleet.blobs import BlobServer, BlobStore
from fleet.deploy import Deployer, signing_key
from fleet.home import FleetHome
from fleet.mqtt import FleetClient, Message
from fleet.registry import Registry
from fleet.rollout import LEASE_S, RolloutDriver, stale_rollouts

log = logging.getLogger(__name__)


class RegistryUpdater:
    """Writes `edge/+/status`, `reported` and `telemetry` into the registry."""

    def __init__(self, client: FleetClient, registry: Registry) -> None:
        self.client = client
        self.registry = registry
        self.counts = {"status": 0, "reported": 0, "telemetry": 0, "bad": 0}

    def start(self) -> None:
        for kind in ("status", "reported", "telemetry"):
            self.client.subscribe(
                f"edge/+/{kind}", self._on_message, qos=0 if kind == "telemetry" else 1
            )

    def _on_message(self, msg: Message) -> None:
        parts = msg.topic.split("/")
        if len(parts) != 3 or not msg.payload:
            return
        device, kind = parts[1], parts[2]
        try:
            body: Any = json.loads(msg.payload)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self.counts["bad"] += 1
            log.warning("%s: not a JSON object, ignored", msg.topic)
            return
        self.counts[kind] += 1
        if kind == "status":
            known = self.registry.device(device)
            was = known.online if known else None
            self.registry.update_status(device, body)
            now = body.get("status") == "online"
            if was != now:
                log.info("device %s is %s (%s)", device, body.get("status"), body.get("version"))
        elif kind == "reported":
            self.registry.update_reported(device, body)
            for name, ota in ((body.get("ota") or {}).get("pipelines") or {}).items():
                if isinstance(ota, dict) and ota.get("state") in (
                    "committed",
                    "rejected",
                    "rolled_back",
                ):
                    target = ota.get("target") or {}
                    log.debug(
                        "device %s pipeline %s: %s %s",
                        device,
                        name,
                        ota.get("state"),
                        target.get("version"),
                    )
        else:
            self.registry.update_telemetry(device, body)


class Server:
    """All the controller's services on one MQTT connection until `stop` is set."""

    def __init__(self, client: FleetClient, home: FleetHome, registry: Registry) -> None:
        self.client = client
        self.home = home
        self.registry = registry
        self.stop = threading.Event()
        self.store = BlobStore(home)
        self.updater = RegistryUpdater(client, registry)
        self.blobs = BlobServer(client, self.store)
        self.enrol: Any = None
        self._rollouts: dict[int, threading.Thread] = {}

    def start(self) -> None:
        self.updater.start()
        self.blobs.start()
        log.info("registry %s, blobs %s: serving", self.registry.path, self.home.blobs_dir)
        if self._has_ca():
            from fleet.enrol import EnrolService  # only with a CA: provisioning is optional

            self.enrol = EnrolService(self.client, self.home)
            self.enrol.start()
            log.info("enrolment service started (CA in %s)", self.home.ca_dir)

    def _has_ca(self) -> bool:
        from fleet.ca import FleetCA

        key_path, cert_path, _crl = FleetCA.paths(self.home)
        return key_path.exists() and cert_path.exists()

    def tick(self) -> None:
        """Take over rollouts whose driver went away (needs the signing key)."""
        for rid in stale_rollouts(self.registry):
            if rid in self._rollouts and self._rollouts[rid].is_alive():
                continue
            if not self.home.signing_key.is_file():
                log.warning("rollout %d waits: no signing key to resume it", rid)
                continue
            deployer = Deployer(self.client, self.registry, self.store, signing_key(self.home))
            if not self.registry.claim_rollout(rid, LEASE_S):
                continue  # someone else (`rollout resume`) took it meanwhile
            driver = RolloutDriver(deployer, rid, self.stop)
            log.info("rollout %d: resuming", rid)
            t = threading.Thread(target=driver.run, name=f"rollout-{rid}", daemon=True)
            self._rollouts[rid] = t
            t.start()

    def run(self, tick_s: float = 2.0) -> None:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("%s: stopping", signal.Signals(signum).name)
            self.stop.set()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not self.stop.is_set():
                self.tick()
                self.stop.wait(tick_s)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.shutdown()

    def shutdown(self, timeout: float = 5.0) -> None:
        self.stop.set()
        self.blobs.stop()
        if self.enrol is not None:
            self.enrol.stop()
        for rid, t in self._rollouts.items():
            t.join(timeout)
            if t.is_alive():
                log.warning("rollout %d driver did not stop within %.0f s", rid, timeout)
        log.info("stopped: %s; blobs %s", self.updater.counts, self.blobs.stats())
