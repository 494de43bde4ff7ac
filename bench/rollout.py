"""Benchmark: a package rolled out to many simulated devices (`edge-fleet deploy --wait` and
`edge-fleet rollout start`, each as a user runs it) against raw paho publish/subscribe of the
same bytes through the same broker.

    .venv/bin/python bench/rollout.py [--devices 100] [--size-mb 5] [--chunk-kb 256]
                                      [--stages 1,10,50,100] [--no-deploy]

Starts its own mosquitto on a free loopback port (set_tcp_nodelay, as systemd/mosquitto),
a fleet home with a signing key, `edge-fleet serve` as a subprocess, and the devices
(tests/fleet_sim.py, all on one MQTT connection in this process). Times each command from
its start until it exits with every device committed. The baseline: one paho publisher (a
second process) sending devices x size bytes in chunk-size QoS 1 messages to one paho
subscriber here. Progress goes to stderr; the figures to stdout.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.registry import Registry
from tests.fleet_sim import SimFleet, tiny_package
from tests.mqtt_broker import Broker
from tests.ota_support import fleet_home

EDGE_FLEET = Path(sys.executable).parent / "edge-fleet"
_STAGE = re.compile(r"^rollout \d+: stage (\d+)/\d+: (\d+)/\d+ device")
_CLK = os.sysconf("SC_CLK_TCK")


class NoDelayBroker(Broker):
    """mosquitto with set_tcp_nodelay, as systemd/mosquitto/edge.conf runs it."""

    def _write_config(self) -> None:
        super()._write_config()
        with self.conf_path.open("a") as conf:
            conf.write("set_tcp_nodelay true\n")


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- the baseline: raw paho ------------------------------------------------------------------


def _publish_main(host: str, port: int, path: str, chunk: int, count: int) -> int:
    """The raw publisher (a child process): `count` copies of the file in QoS 1 chunks."""
    data = Path(path).read_bytes()
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    pub = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    pub.max_inflight_messages_set(64)  # as the controller's FleetClient
    pub.connect(host, port)
    pub.loop_start()
    print("ready", flush=True)
    sys.stdin.readline()
    infos = [pub.publish("bench/raw", c, qos=1) for _ in range(count) for c in chunks]
    for info in infos:
        info.wait_for_publish(120)
    pub.disconnect()
    pub.loop_stop()
    return 0


def raw_paho(broker: Broker, path: Path, chunk: int, count: int) -> float:
    """Seconds for the raw publisher to deliver `count` x the file to a subscriber here."""
    total = path.stat().st_size * count
    done, subscribed = threading.Event(), threading.Event()
    got = [0]

    def on_message(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        got[0] += len(msg.payload)
        if got[0] >= total:
            done.set()

    sub = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    sub.on_message = on_message
    sub.on_subscribe = lambda *_a: subscribed.set()
    sub.connect(broker.host, broker.port)
    sub.loop_start()
    sub.subscribe("bench/raw", qos=1)
    subscribed.wait(5)
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--publish",
            broker.host,
            str(broker.port),
            str(path),
            str(chunk),
            str(count),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdin is not None and child.stdout is not None
        child.stdout.readline()  # connected
        start = time.perf_counter()
        child.stdin.write("go\n")
        child.stdin.flush()
        if not done.wait(300):
            raise RuntimeError(f"raw transfer did not finish ({got[0]} of {total} bytes)")
        elapsed = time.perf_counter() - start
    finally:
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()
        child.wait(30)
        sub.disconnect()
        sub.loop_stop()
    return elapsed


# --- the commands --------------------------------------------------------------------------


class Timed:
    """One edge-fleet command: wall seconds, exit status, stdout lines with their times."""

    def __init__(self, args: list[str], echo: re.Pattern[str] | None = None) -> None:
        self.lines: list[tuple[float, str]] = []
        cpu0 = children_cpu()
        start = time.perf_counter()
        proc = subprocess.Popen([str(EDGE_FLEET), *args], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            t = time.perf_counter() - start
            self.lines.append((t, line.rstrip("\n")))
            if echo is not None and echo.search(line):
                say(f"  {t:6.2f} s  {line.rstrip()}")
        self.rc = proc.wait()
        self.seconds = time.perf_counter() - start
        self.cpu = children_cpu() - cpu0

    def check(self, what: str) -> None:
        if self.rc != 0:
            tail = "\n".join(line for _t, line in self.lines[-20:])
            raise RuntimeError(f"{what} exited {self.rc}:\n{tail}")


def stage_times(run: Timed) -> list[tuple[int, float, float]]:
    """(devices in the stage, seconds from the command's start, stage seconds)."""
    starts = [(t, int(m[2])) for t, line in run.lines if (m := _STAGE.match(line))]
    ends = [t for t, _n in starts[1:]] + [run.seconds]
    out, before = [], 0
    for (t, n), end in zip(starts, ends):
        out.append((n - before, t, end - t))
        before = n
    return out


def wait_registered(home_registry: Path, count: int, serve: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if serve.poll() is not None:
            raise RuntimeError(f"edge-fleet serve exited {serve.returncode}")
        if home_registry.is_file():
            with Registry(home_registry) as reg:
                if sum(1 for d in reg.devices() if d.reported) >= count:
                    return
        time.sleep(0.2)
    raise RuntimeError(f"serve did not register {count} devices within 60 s")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--publish":
        host, port, path, chunk, count = sys.argv[2:7]
        return _publish_main(host, int(port), path, int(chunk), int(count))
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--size-mb", type=float, default=5.0, help="package size, MB (1e6 B)")
    parser.add_argument("--chunk-kb", type=int, default=256, help="chunk the devices ask for")
    parser.add_argument("--window", type=int, default=8, help="chunk requests in flight")
    parser.add_argument("--stages", default="1,10,50,100", help="rollout --stages")
    parser.add_argument("--no-deploy", dest="deploy", action="store_false", help="skip deploy")
    args = parser.parse_args()
    size, chunk = int(args.size_mb * 1e6), args.chunk_kb << 10
    ids = [f"sim-{i:03d}" for i in range(args.devices)]
    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp:
        work = Path(tmp)
        broker = NoDelayBroker(work / "broker")
        broker.start()
        assert broker._proc is not None
        broker_pid = broker._proc.pid
        home = fleet_home(work / "home")
        v1 = tiny_package(home.signing_key, work / "v1", "1.0.0", size)
        v2 = tiny_package(home.signing_key, work / "v2", "2.0.0", size)
        common = ["--home", str(home.root), "--broker", f"mqtt://{broker.host}:{broker.port}"]
        with (work / "serve.log").open("wb") as serve_log:
            serve = subprocess.Popen(
                [str(EDGE_FLEET), "serve", *common],
                stdout=serve_log,
                stderr=subprocess.STDOUT,
            )
        sim = SimFleet(broker.host, broker.port, ids, home.signing_pub, chunk=chunk)
        sim.window = args.window
        results: dict[str, Timed] = {}
        raw: list[float] = []
        cpu: dict[str, float] = {}
        try:
            sim.start()
            wait_registered(home.registry, args.devices, serve)
            say(f"{args.devices} devices registered; raw paho baseline")
            raw.append(raw_paho(broker, v1 / "model.onnx", chunk, args.devices))
            say(f"  raw: {raw[-1]:.2f} s")
            marks = {"serve": cpu_of(serve.pid), "broker": cpu_of(broker_pid)}
            marks["sim"] = time.process_time()
            if args.deploy:
                say(f"deploy {v1.name} --wait to {args.devices} devices")
                devs = [a for d in ids for a in ("--device", d)]
                results["deploy"] = Timed(
                    ["deploy", str(v1), *devs, "--wait", "--timeout", "300", *common]
                )
                results["deploy"].check("deploy")
                say(f"  deploy: {results['deploy'].seconds:.2f} s")
            say(f"rollout start {v2.name} --select all --stages {args.stages}")
            results["rollout"] = Timed(
                [
                    "rollout",
                    "start",
                    str(v2),
                    "--select",
                    "all",
                    "--stages",
                    args.stages,
                    "--max-failures",
                    "5%",
                    "--device-timeout",
                    "120",
                    *common,
                ],
                echo=re.compile(r": stage \d+/|completed|halted"),
            )
            results["rollout"].check("rollout start")
            cpu["serve"] = cpu_of(serve.pid) - marks["serve"]
            cpu["broker"] = cpu_of(broker_pid) - marks["broker"]
            cpu["sim"] = time.process_time() - marks["sim"]
            say("raw paho baseline again")
            raw.append(raw_paho(broker, v1 / "model.onnx", chunk, args.devices))
            say(f"  raw: {raw[-1]:.2f} s")
        finally:
            sim.stop()
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(30)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait(10)
            broker.stop()
        served = re.findall(r"'bytes': (\d+)", (work / "serve.log").read_text(errors="replace"))
    fetched = sum(d.fetched_bytes for d in sim.devices.values())
    retries = sum(d.retries for d in sim.devices.values())
    mb = args.devices * size / 1e6
    best = min(raw)
    print(
        f"{args.devices} devices, package {size / 1e6:.1f} MB, chunk {args.chunk_kb} KiB, "
        f"window {args.window}; {mb:.0f} MB to move"
    )
    print(
        f"raw paho publish/subscribe:  {best:7.2f} s  {mb / best:6.1f} MB/s  "
        f"(best of {len(raw)}: {', '.join(f'{r:.2f}' for r in raw)} s)"
    )
    for name, label in (("deploy", "deploy --wait (all at once)"), ("rollout", "rollout start")):
        if name in results:
            r = results[name]
            print(
                f"{label + ':':28s} {r.seconds:7.2f} s  {mb / r.seconds:6.1f} MB/s  "
                f"ratio {r.seconds / best:.2f}x raw  (command CPU {r.cpu:.1f} s)"
            )
    print(f"rollout --stages {args.stages}, per stage:")
    for n, at, secs in stage_times(results["rollout"]):
        rate = n * size / 1e6 / secs
        print(f"  {n:4d} device(s) from {at:6.2f} s: {secs:6.2f} s  {rate:6.1f} MB/s")
    sent = int(served[-1]) / 1e6 if served else float("nan")
    phases = " + ".join(results)
    print(
        f"CPU over {phases}: serve {cpu['serve']:.1f} s, mosquitto {cpu['broker']:.1f} s, "
        f"simulator {cpu['sim']:.1f} s; devices fetched {fetched / 1e6:.0f} MB "
        f"({retries} chunk request(s) retried), serve sent {sent:.0f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
