"""MqttLink against a real mosquitto: birth/will, refusal, outages, restarts, bad input.

Each test gets its own broker on a free port; a second paho client plays the fleet side.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from agent.config import TlsConfig
from agent.errors import LinkError, PayloadError
from agent.mqtt_link import InboundMessage, LinkState, MqttLink, reconnect_delay
from agent.outbox import Outbox, Priority
from tests.mqtt_broker import Broker, make_pki, mqtt_config

REPO = Path(__file__).resolve().parents[2]
STATUS = "edge/dev-1/status"
EVENTS = "edge/dev-1/events/cam"


def is_status(state: str, *, retain: bool | None = None):
    def check(m) -> bool:
        return (
            m.topic == STATUS
            and m.json()["status"] == state
            and (retain is None or m.retain == retain)
        )

    return check


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_birth_is_retained_and_stop_publishes_clean_offline(broker, make_link, observers):
    watcher = observers(broker, [STATUS])
    link, outbox = make_link(broker)
    assert link.wait_for(LinkState.CONNECTED, timeout=5)
    watcher.next(is_status("online"))
    # A client that subscribes later still gets the birth: it is retained.
    late = observers(broker, [STATUS])
    birth = late.next(is_status("online"))
    assert birth.retain and birth.qos == 1
    body = birth.json()
    assert body["version"] and body["started_at"] and "boot_time" in body

    seqs = [link.publish(EVENTS, f"e{i}") for i in range(5)]
    assert link.stop(timeout=5) == []
    offline = late.next(is_status("offline"))
    assert offline.json()["clean"] is True
    assert [m.payload for m in late.seen if m.topic == EVENTS] == []  # not subscribed
    assert len(outbox) == 0, "stop() flushed the outbox before going offline"
    assert seqs == sorted(seqs)
    assert link.status().state is LinkState.STOPPED
    again = observers(broker, [STATUS])
    assert again.next(is_status("offline")).retain


AGENT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from agent.config import MqttConfig
    from agent.mqtt_link import LinkState, MqttLink
    from agent.outbox import Outbox
    cfg = MqttConfig(host="127.0.0.1", port=int(sys.argv[1]), keepalive_s=5)
    link = MqttLink("dev-1", cfg, Outbox(sys.argv[2]))
    link.start()
    assert link.wait_for(LinkState.CONNECTED, timeout=10)
    print("connected", flush=True)
    time.sleep(60)
    """
)


def test_killed_agent_process_leaves_retained_offline_will(broker, observers, tmp_path):
    watcher = observers(broker, [STATUS])
    proc = subprocess.Popen(
        [sys.executable, "-c", AGENT_SCRIPT, str(broker.port), str(tmp_path / "o.db")],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"connected"
        watcher.next(is_status("online"))
        proc.send_signal(signal.SIGKILL)  # no DISCONNECT, no offline publish: only the will
        proc.wait(10)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
    will = watcher.next(is_status("offline"), timeout=10)
    assert will.json()["clean"] is False
    later = observers(broker, [STATUS])
    assert later.next(is_status("offline")).retain


def test_cut_socket_gives_will_then_reconnect_and_birth(broker, make_link, observers):
    watcher = observers(broker, [STATUS])
    got: list[bytes] = []
    link, _ = make_link(broker, start=False)
    link.subscribe("edge/dev-1/cmd/+", lambda m: got.append(m.payload))
    link.start()
    watcher.next(is_status("online"))

    sock = link._client.socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)  # the network drops under the client

    watcher.next(is_status("offline"))  # the broker published the will
    watcher.next(is_status("online"))  # and the link came back by itself, subscribed
    assert link.status().connects == 2
    watcher.publish("edge/dev-1/cmd/ping", b"after-cut")
    wait_until(lambda: got == [b"after-cut"], what="command after reconnect")


def test_bad_password_is_refused_not_connected(auth_broker, make_link):
    link, outbox = make_link(auth_broker, username="dev-1", password="wrong")
    assert link.wait_for(LinkState.REFUSED, timeout=5)
    status = link.status()
    assert status.connects == 0
    assert "Bad user name or password" in status.reason or "Not authorized" in status.reason
    # It keeps retrying but never counts as connected, and sends nothing.
    link.publish(EVENTS, b"queued")
    time.sleep(0.5)
    assert link.status().state is LinkState.REFUSED
    assert len(outbox) == 1

    good, _ = make_link(auth_broker, username="dev-1", password="s3cret")
    assert good.wait_for(LinkState.CONNECTED, timeout=5)


def test_password_from_env(auth_broker, make_link, monkeypatch, observers):
    monkeypatch.setenv("EDGE_TEST_MQTT_PASSWORD", "s3cret")
    watcher = observers(auth_broker, [EVENTS], username="fleet", password="fleet")
    link, _ = make_link(auth_broker, username="dev-1", password_env="EDGE_TEST_MQTT_PASSWORD")
    assert link.wait_for(LinkState.CONNECTED, timeout=5)
    link.publish(EVENTS, b"hello")
    assert watcher.next(lambda m: m.topic == EVENTS).payload == b"hello"


def test_unreachable_broker_reports_why(tmp_path, make_link):
    broker = Broker(tmp_path / "never-started")  # a free port nobody listens on
    link, _ = make_link(broker)
    assert link.wait_for(LinkState.DISCONNECTED, timeout=5)
    assert "cannot connect to 127.0.0.1" in link.status().reason


def test_messages_queued_while_broker_down_arrive_in_order(broker, make_link, observers):
    watcher = observers(broker, [EVENTS], client_id="fleet", session=True)
    link, outbox = make_link(broker)
    assert link.wait_for(LinkState.CONNECTED, timeout=5)

    broker.stop()  # saves the fleet client's session: it gets what it missed
    assert link.wait_for(LinkState.DISCONNECTED, timeout=5)
    seqs = [link.publish(EVENTS, f"m{i:02d}".encode()) for i in range(50)]
    assert len(outbox) == 50
    broker.start()

    got = watcher.collect(EVENTS, 50, timeout=20)
    assert [m.payload for m in got] == [f"m{i:02d}".encode() for i in range(50)]
    assert [int(m.user_properties["seq"]) for m in got] == seqs
    wait_until(lambda: len(outbox) == 0, what="outbox drained by PUBACKs")
    assert link.status().connects == 2


def test_restarted_agent_delivers_what_the_old_one_left(broker, make_link, observers, tmp_path):
    watcher = observers(broker, [EVENTS], client_id="fleet", session=True)
    db = tmp_path / "agent-outbox.db"
    broker.stop()
    old, old_outbox = make_link(broker, db=db)
    for i in range(20):
        old.publish(EVENTS, f"old{i}".encode())
    assert old.stop(timeout=3) == []  # cannot flush: the broker is down
    old_outbox.close()

    broker.start()
    new, new_outbox = make_link(broker, db=db)  # a new process: same db file, new link
    got = watcher.collect(EVENTS, 20, timeout=20)
    assert [m.payload for m in got] == [f"old{i}".encode() for i in range(20)]
    next_seq = new.publish(EVENTS, b"new")
    assert next_seq == 21, "sequence numbers continue across the restart"
    assert watcher.next(lambda m: m.topic == EVENTS).payload == b"new"
    wait_until(lambda: len(new_outbox) == 0, what="outbox drained")


def test_resubscribes_when_the_broker_lost_the_session(broker, make_link, observers):
    got: list[bytes] = []
    link, _ = make_link(broker, start=False)
    link.subscribe("edge/dev-1/cmd/#", lambda m: got.append(m.payload))
    link.start()
    assert link.wait_for(LinkState.CONNECTED, timeout=5)

    broker.stop()
    broker.wipe_state()  # the broker forgets the session, subscriptions and retained birth
    broker.start()
    # The birth is retained again only after the reconnect, which subscribed before it.
    fleet = observers(broker, [STATUS])
    fleet.next(is_status("online"))
    assert link.status().connects == 2 and link.status().session_present is False
    fleet.publish("edge/dev-1/cmd/reboot", b"now")
    wait_until(lambda: got == [b"now"], what="command after resubscribe")


def test_handler_exception_does_not_kill_the_worker(broker, make_link, observers):
    calls: list[bytes] = []

    def flaky(message: InboundMessage) -> None:
        calls.append(message.payload)
        if message.payload == b"boom":
            raise RuntimeError("handler bug")

    fleet = observers(broker, [STATUS])
    link, _ = make_link(broker, start=False)
    link.subscribe("edge/dev-1/cmd/+", flaky)
    link.start()
    fleet.next(is_status("online"))  # SUBSCRIBE went before the birth: it is active
    fleet.publish("edge/dev-1/cmd/a", b"boom")
    fleet.publish("edge/dev-1/cmd/a", b"fine")
    wait_until(lambda: calls == [b"boom", b"fine"], what="both messages handled")
    assert link.status().handler_errors == 1


def test_malformed_and_huge_payloads_are_contained(broker, make_link, observers):
    parsed: list[object] = []
    errors: list[str] = []

    def on_cmd(message: InboundMessage) -> None:
        try:
            parsed.append(message.json())
        except PayloadError as exc:
            errors.append(str(exc))
            raise

    fleet = observers(broker, [STATUS])
    link, _ = make_link(broker, start=False, max_inbound_bytes=4096)
    link.subscribe("edge/dev-1/cmd/+", on_cmd)
    link.start()
    fleet.next(is_status("online"))
    fleet.publish("edge/dev-1/cmd/x", b"{not json")
    fleet.publish("edge/dev-1/cmd/x", b"\xff\xfe\x00")
    fleet.publish("edge/dev-1/cmd/x", b"[" + b"1," * 3000 + b"1]")  # above 4 KiB: dropped here
    fleet.publish("edge/dev-1/cmd/x", b"x" * (1 << 20))  # above max packet: broker drops it
    fleet.publish("edge/dev-1/cmd/x", b'{"ok": true}')
    wait_until(lambda: parsed == [{"ok": True}], what="the valid command")
    assert len(errors) == 2 and all("edge/dev-1/cmd/x: payload is not JSON" in e for e in errors)
    status = link.status()
    assert status.handler_errors == 2
    assert status.oversize == 1
    assert status.state is LinkState.CONNECTED  # nothing above cost us the connection


def test_outbox_bound_drops_telemetry_first_while_offline(broker, make_link, observers):
    watcher = observers(broker, ["edge/dev-1/#"], client_id="fleet", session=True)
    broker.stop()
    link, outbox = make_link(broker, outbox_kwargs={"max_messages": 10})
    for i in range(6):
        link.publish("edge/dev-1/events/cam", f"event{i}", priority=Priority.EVENT)
    for i in range(8):
        link.publish("edge/dev-1/telemetry", f"tele{i}", qos=0, priority=Priority.TELEMETRY)
    stats = outbox.stats()
    assert stats.messages == 10
    assert stats.dropped == {"telemetry": 4, "event": 0, "control": 0}
    broker.start()
    got = [m.payload for m in watcher.collect(EVENTS, 6)]
    assert got == [f"event{i}".encode() for i in range(6)]


def test_stop_event_set_elsewhere_still_flushes_and_goes_offline(broker, make_link, observers):
    watcher = observers(broker, [STATUS, EVENTS])
    stop = threading.Event()
    link, outbox = make_link(broker, stop_event=stop)
    assert link.wait_for(LinkState.CONNECTED, timeout=5)
    for i in range(30):
        link.publish(EVENTS, f"late{i}")
    stop.set()  # as the SIGTERM handler does
    assert link.stop(timeout=5) == []
    got = watcher.collect(EVENTS, 30)
    assert [m.payload for m in got] == [f"late{i}".encode() for i in range(30)]
    watcher.next(is_status("offline"))
    assert len(outbox) == 0


def test_unusable_tls_files_fail_at_construction(tmp_path, broker):
    tls = TlsConfig(ca_file=tmp_path / "missing-ca.pem")
    with Outbox(tmp_path / "o.db") as outbox, pytest.raises(LinkError, match=r"mqtt\.tls"):
        MqttLink("dev-1", mqtt_config(broker, tls=tls), outbox)


def test_mutual_tls(tmp_path, make_link, observers):
    pki = make_pki(tmp_path / "pki", device_cn="dev-1")
    broker_dir = tmp_path / "tls-broker"
    broker = Broker(broker_dir, tls=pki.server)
    broker.start()
    try:
        good = TlsConfig(ca_file=pki.server.ca, cert_file=pki.client_cert, key_file=pki.client_key)
        link, _ = make_link(broker, tls=good)
        assert link.wait_for(LinkState.CONNECTED, timeout=5)

        wrong_ca = TlsConfig(
            ca_file=pki.other_ca, cert_file=pki.client_cert, key_file=pki.client_key
        )
        bad, _ = make_link(broker, device_id="dev-2", tls=wrong_ca)
        assert bad.wait_for(LinkState.DISCONNECTED, timeout=5)
        assert "certificate verify failed" in bad.status().reason
        assert bad.status().connects == 0
        assert link.stop(timeout=5) == [] and bad.stop(timeout=5) == []
    finally:
        broker.stop()


def test_broker_refusal_of_one_message_does_not_block_the_queue(tmp_path, make_link, observers):
    broker = Broker(
        tmp_path / "acl-broker",
        users={"dev-1": "pw", "fleet": "pw"},
        acl=["user fleet", "topic read #", "pattern readwrite edge/%u/#"],
    )
    broker.start()
    try:
        fleet = observers(broker, ["#"], username="fleet", password="pw")
        link, outbox = make_link(broker, username="dev-1", password="pw")
        assert link.wait_for(LinkState.CONNECTED, timeout=5)
        link.publish("edge/dev-2/events/cam", b"not mine")  # outside the device's fence
        link.publish(EVENTS, b"mine")
        assert fleet.next(lambda m: m.topic.endswith("/events/cam")).payload == b"mine"
        wait_until(lambda: len(outbox) == 0, what="both rows settled")
        assert link.status().rejected == 1
        assert link.stop(timeout=5) == []
    finally:
        broker.stop()


def test_reconnect_delay_doubles_caps_and_jitters():
    lows = [reconnect_delay(n, 1.0, 60.0, rand=lambda: 0.0) for n in range(8)]
    highs = [reconnect_delay(n, 1.0, 60.0, rand=lambda: 1.0) for n in range(8)]
    assert highs == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert lows == [h / 2 for h in highs]
    assert reconnect_delay(10_000, 1.0, 60.0) <= 60.0


def test_command_reply_carries_correlation_data(broker, make_link, observers):
    fleet = observers(broker, [STATUS, "edge/dev-1/reply/#"])
    link, _ = make_link(broker, start=False)

    def on_cmd(message: InboundMessage) -> None:
        assert message.response_topic is not None
        link.publish(
            message.response_topic,
            b'{"pong": true}',
            priority=Priority.CONTROL,
            correlation_data=message.correlation_data,
        )

    link.subscribe("edge/dev-1/cmd/+", on_cmd)
    link.start()
    fleet.next(is_status("online"))
    fleet.publish(
        "edge/dev-1/cmd/ping",
        b"{}",
        response_topic="edge/dev-1/reply/ping",
        correlation_data=b"req-42",
    )
    reply = fleet.next(lambda m: m.topic == "edge/dev-1/reply/ping")
    assert reply.json() == {"pong": True} and reply.correlation_data == b"req-42"


def test_stop_names_the_thread_that_did_not_stop(broker, make_link, observers):
    fleet = observers(broker, [STATUS])
    release = threading.Event()
    link, _ = make_link(broker, start=False)
    link.subscribe("edge/dev-1/cmd/+", lambda m: release.wait(30))  # a handler that hangs
    link.start()
    fleet.next(is_status("online"))
    fleet.publish("edge/dev-1/cmd/hang", b"{}")
    wait_until(lambda: link._events.qsize() == 0, what="the handler to start")
    started = time.monotonic()
    assert link.stop(timeout=1.0) == ["mqtt-worker"]
    assert time.monotonic() - started < 2.0, "the joins are bounded"
    fleet.next(is_status("offline"))  # the rest still shut down cleanly
    release.set()
    assert link.stop(timeout=2.0) == []  # and a second stop() finds it done


def test_inline_handler_and_volatile_publish(broker, make_link, observers):
    """An inline handler gets its exact topic on the network thread; a volatile publish
    goes out without the outbox while connected and is refused (False) otherwise."""
    got: list[tuple[bytes, str]] = []
    fleet = observers(broker, [STATUS, "edge/dev-1/blob/get"])
    link, outbox = make_link(broker, start=False)
    with pytest.raises(ValueError, match="exact topic"):
        link.subscribe("edge/dev-1/blob/+", got.append, inline=True)
    link.subscribe(
        "edge/dev-1/blob/data",
        lambda m: got.append((m.payload, threading.current_thread().name)),
        inline=True,
    )
    assert link.publish_volatile("edge/dev-1/blob/get", b"early") is False  # not connected
    link.start()
    fleet.next(is_status("online"))
    fleet.publish("edge/dev-1/blob/data", b"chunk")
    wait_until(lambda: got == [(b"chunk", "mqtt-network")], what="inline delivery")
    assert link.publish_volatile("edge/dev-1/blob/get", b"ask", qos=0, correlation_data=b"c1")
    request = fleet.next(lambda m: m.topic == "edge/dev-1/blob/get")
    assert request.payload == b"ask" and request.correlation_data == b"c1"
    assert outbox.stats().last_seq == 0  # nothing went through the outbox
