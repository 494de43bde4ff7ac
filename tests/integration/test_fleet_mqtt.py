"""The controller's MQTT client against a real mosquitto: connect, refusals, handlers,
request/reply by correlation data, user properties, resubscription after a broker restart."""

from __future__ import annotations

import argparse
import threading
import time

import pytest

from fleet.mqtt import BrokerSettings, FleetClient, FleetLinkError, Message, add_broker_args
from tests.mqtt_broker import Broker


def _settings(broker: Broker, **kw: object) -> BrokerSettings:
    return BrokerSettings.parse(f"mqtt://{broker.host}:{broker.port}", **kw)


def test_parse_broker_urls() -> None:
    s = BrokerSettings.parse("mqtts://fleet.example:9999")
    assert (s.host, s.port, s.tls) == ("fleet.example", 9999, True)
    assert BrokerSettings.parse("localhost").port == 1883
    assert BrokerSettings.parse("mqtts://h").port == 8883
    with pytest.raises(FleetLinkError, match="expected mqtt://"):
        BrokerSettings.parse("http://h:1")
    with pytest.raises(FleetLinkError, match="bad port"):
        BrokerSettings.parse("mqtt://h:99999")


def test_args_need_cert_and_key_together(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_broker_args(parser)
    with pytest.raises(FleetLinkError, match="go together"):
        BrokerSettings.from_args(parser.parse_args(["--cert", "c.pem"]))
    with pytest.raises(FleetLinkError, match="not set"):
        BrokerSettings.from_args(parser.parse_args(["--password-env", "NO_SUCH_VAR_X"]))
    monkeypatch.setenv("PW_X", "pw")
    s = BrokerSettings.from_args(parser.parse_args(["--password-env", "PW_X", "--ca", "ca.pem"]))
    assert s.password == "pw" and s.tls


def test_unreachable_and_refused(broker: Broker, auth_broker: Broker) -> None:
    with pytest.raises(FleetLinkError, match=r"no answer|refused"):
        FleetClient(BrokerSettings("127.0.0.1", 1)).connect(timeout=2)
    with pytest.raises(FleetLinkError, match="refused"):
        FleetClient(_settings(auth_broker, username="fleet", password="wrong")).connect(timeout=5)
    ok = FleetClient(_settings(auth_broker, username="fleet", password="fleet")).connect()
    assert ok.connected
    ok.close()


def test_request_reply_and_properties(broker: Broker) -> None:
    with (
        FleetClient(_settings(broker)).connect() as server,
        FleetClient(_settings(broker)).connect() as client,
    ):

        def answer(msg: Message) -> None:
            assert msg.response_topic and msg.correlation_data
            for i in range(3):
                server.publish(
                    msg.response_topic,
                    msg.payload + str(i).encode(),
                    correlation_data=msg.correlation_data,
                    user_properties={"index": str(i)},
                    wait=False,
                )

        server.subscribe("svc/req", answer)
        replies = client.request(
            "svc/req", b"x", "svc/resp", until=lambda m: m.user_properties["index"] == "2"
        )
        assert [m.payload for m in replies] == [b"x0", b"x1", b"x2"]
        first = client.request("svc/req", b"y", "svc/resp")
        assert first[0].payload == b"y0"
        with pytest.raises(FleetLinkError, match="no reply"):
            client.request("nobody/listens", b"z", "svc/resp", timeout=0.5)


def test_handler_errors_do_not_stop_the_worker(broker: Broker) -> None:
    got: list[bytes] = []
    done = threading.Event()

    def flaky(msg: Message) -> None:
        if msg.payload == b"boom":
            raise ValueError("boom")
        got.append(msg.payload)
        done.set()

    with FleetClient(_settings(broker)).connect() as c:
        c.subscribe("t/#", flaky)
        c.publish("t/a", b"boom")
        c.publish("t/b", b"fine")
        assert done.wait(5)
    assert got == [b"fine"]


def test_subscriptions_survive_a_broker_restart(broker: Broker) -> None:
    got = threading.Event()
    with FleetClient(_settings(broker)).connect() as c:
        c.subscribe("after/restart", lambda m: got.set())
        broker.restart()
        deadline = time.monotonic() + 20
        while not c.connected and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.connected
        time.sleep(0.3)  # the renewed SUBSCRIBE goes out right after the CONNACK
        with FleetClient(_settings(broker)).connect() as other:
            other.publish("after/restart", b"1")
        assert got.wait(5)
