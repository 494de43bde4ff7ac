"""Benchmark: an OTA package transfer over MQTT (the agent's Downloader through its MqttLink
and outbox, the controller's BlobServer) against raw paho publish/subscribe of the same bytes.

    .venv/bin/python bench/ota_transfer.py [--mb 20] [--chunk 262144] [--window 16]

Starts its own mosquitto on a free loopback port. The controller (BlobServer) and the raw
publisher run in a second process, as they would on another machine; the device side and the
raw subscriber run here. Prints MB/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.config import OtaConfig
from agent.mqtt_link import LinkState, MqttLink
from agent.ota.downloader import Downloader
from agent.ota.store import ModelStore
from agent.outbox import Outbox
from fleet.blobs import BlobServer, BlobStore
from fleet.cli_package import build_package, init_keys
from fleet.home import FleetHome
from fleet.mqtt import BrokerSettings, FleetClient
from models.package import read_manifest
from models.zoo import BUNDLED_DIR
from tests.mqtt_broker import Broker, mqtt_config


class NoDelayBroker(Broker):
    """mosquitto with set_tcp_nodelay: as the broker config in systemd/mosquitto should be."""

    def _write_config(self) -> None:
        super()._write_config()
        with self.conf_path.open("a") as conf:
            conf.write("set_tcp_nodelay true\n")


CPU: dict[str, list[float]] = {"raw": [], "ota": []}  # receiving process CPU s per run


def _client(broker_host: str, broker_port: int, inflight: int = 20) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.max_inflight_messages_set(inflight)
    client.connect(broker_host, broker_port)
    client.loop_start()
    return client


def _close(client: paho.Client) -> None:
    client.disconnect()
    client.loop_stop()
    client._reset_sockets()


def raw_paho(broker: Broker, path: Path, size: int, chunk: int) -> float:
    """Seconds for a paho publisher (another process) to send `path` in `chunk`-byte QoS 1
    messages through the broker to a paho subscriber here."""
    done = threading.Event()
    got = [0]
    subscribed = threading.Event()

    def on_message(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        got[0] += len(msg.payload)
        if got[0] >= size:
            done.set()

    sub = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    sub.on_message = on_message
    sub.on_subscribe = lambda *_a: subscribed.set()
    sub.connect(broker.host, broker.port)
    sub.loop_start()
    sub.subscribe("bench/raw", qos=1)
    subscribed.wait(5)
    child = _helper("publish", broker, str(path), str(chunk))
    try:
        assert child.stdin is not None and child.stdout is not None
        child.stdout.readline()  # connected
        start = time.perf_counter()
        cpu = time.process_time()
        child.stdin.write(b"go\n")
        child.stdin.flush()
        if not done.wait(120):
            raise RuntimeError("raw transfer did not finish")
        elapsed = time.perf_counter() - start
        CPU["raw"].append(time.process_time() - cpu)
    finally:
        _end(child)
        _close(sub)
    return elapsed


def _helper(mode: str, broker: Broker, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, __file__, f"--{mode}", broker.host, str(broker.port), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def _end(child: subprocess.Popen[bytes]) -> None:
    for stream in (child.stdin, child.stdout):
        if stream is not None:
            stream.close()
    try:
        child.wait(10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(5)


def _publish_main(host: str, port: int, path: str, chunk: int) -> int:
    data = Path(path).read_bytes()
    pub = _client(host, port)
    print("ready", flush=True)
    sys.stdin.readline()
    infos = [
        pub.publish("bench/raw", data[i : i + chunk], qos=1) for i in range(0, len(data), chunk)
    ]
    for info in infos:
        info.wait_for_publish(60)
    _close(pub)
    return 0


def _serve_main(host: str, port: int, home: str) -> int:
    """The controller: a BlobServer for the home's packages until stdin closes."""
    client = FleetClient(BrokerSettings(host, port)).connect()
    server = BlobServer(client, BlobStore(FleetHome(Path(home))))
    server.start()
    print("ready", flush=True)
    sys.stdin.read()
    server.stop()
    client.close()
    return 0


def ota_transfer(
    broker: Broker, work: Path, package: Path, chunk: int, window: int
) -> tuple[float, int]:
    """Seconds for the agent's Downloader to fetch every file of `package`; bytes."""
    manifest = read_manifest(package)
    device = "bench-dev"
    outbox = Outbox(work / "outbox.db")
    link = MqttLink(device, mqtt_config(broker, max_inbound_bytes=chunk + (64 << 10)), outbox)
    store = ModelStore(work / "device").ensure()
    config = OtaConfig(chunk_bytes=chunk, window=window)
    downloader = Downloader(
        link, device, store, config, lambda: link.status().state is LinkState.CONNECTED
    )
    link.subscribe(f"edge/{device}/blob/data", downloader.on_data, inline=True)
    link.start()
    try:
        if not link.wait_for(LinkState.CONNECTED, timeout=10):
            raise RuntimeError("the device link did not connect")
        time.sleep(0.3)  # the SUBACK
        start = time.perf_counter()
        cpu = time.process_time()
        downloader.fetch(manifest.files, lambda *_a: None, lambda: False)
        elapsed = time.perf_counter() - start
        CPU["ota"].append(time.process_time() - cpu)
    finally:
        link.stop(timeout=5)
        outbox.close()
    return elapsed, sum(f.size for f in manifest.files)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("--serve", "--publish"):
        mode, host, port, *rest = sys.argv[1:]
        if mode == "--serve":
            return _serve_main(host, int(port), rest[0])
        return _publish_main(host, int(port), rest[0], int(rest[1]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20.0, help="package size in MB")
    parser.add_argument("--chunk", type=int, default=256 << 10)
    parser.add_argument("--window", type=int, default=OtaConfig().window)
    parser.add_argument(
        "--no-nodelay",
        dest="nodelay",
        action="store_false",
        help="run mosquitto without set_tcp_nodelay",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the best counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ota-bench-") as tmp:
        work = Path(tmp)
        broker = (NoDelayBroker if args.nodelay else Broker)(work / "broker")
        broker.start()
        try:
            home = FleetHome(work / "home")
            init_keys(home)
            package = work / "pkg"
            shutil.copytree(BUNDLED_DIR / "yolox-nano-onnx-int8", package)
            size = int(args.mb * 1e6) - (package / "model.onnx").stat().st_size
            (package / "weights.bin").write_bytes(os.urandom(max(0, size)))
            build_package(
                package,
                name="bench",
                version="1.0.0",
                key_path=home.signing_key,
                extra_files=["weights.bin"],
            )
            store = BlobStore(home)
            store.add_package(package)
            files = read_manifest(package).files
            raw_file = work / "raw.bin"
            with raw_file.open("wb") as out:
                for entry in files:
                    out.write((package / entry.path).read_bytes())
            total = sum(f.size for f in files)
            server = _helper("serve", broker, str(home.root))
            assert server.stdout is not None
            server.stdout.readline()
            raw_times, ota_times = [], []
            try:
                for run in range(args.repeat):
                    raw_times.append(raw_paho(broker, raw_file, total, args.chunk))
                    dev = work / f"run{run}"
                    dev.mkdir()
                    seconds, _ = ota_transfer(broker, dev, package, args.chunk, args.window)
                    ota_times.append(seconds)
                    shutil.rmtree(dev)
            finally:
                _end(server)
        finally:
            broker.stop()
    mb = total / 1e6
    raw, ota = min(raw_times), min(ota_times)
    print(
        f"package {mb:.1f} MB, chunk {args.chunk} B, window {args.window}, best of "
        f"{args.repeat}, broker set_tcp_nodelay {'on' if args.nodelay else 'off'}"
    )
    cpu = {k: 1e3 * min(v) / mb for k, v in CPU.items()}
    print(
        f"raw paho publish/subscribe: {mb / raw:7.1f} MB/s ({raw:.3f} s), "
        f"receiver CPU {cpu['raw']:.2f} ms/MB"
    )
    print(
        f"OTA transfer (Downloader):  {mb / ota:7.1f} MB/s ({ota:.3f} s), "
        f"device CPU {cpu['ota']:.2f} ms/MB"
    )
    rounds = sorted(r / o for r, o in zip(raw_times, ota_times))
    median = rounds[len(rounds) // 2]
    print(f"ratio OTA / raw: {raw / ota:.2f} (best of each); median per round {median:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
