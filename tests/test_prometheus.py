"""The Prometheus endpoint: exposition text from a telemetry snapshot, and a real HTTP server
on a free loopback port (content type, 404, label escaping, loopback-only, bounded stop).
"""

from __future__ import annotations

import copy
import re
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from agent.errors import AgentError, ConfigError
from agent.prometheus import CONTENT_TYPE, MetricsServer, is_loopback, render

SNAPSHOT: dict[str, Any] = {
    "device": "cam-01",
    "ts": 1733140000.0,
    "uptime_s": 12.5,
    "system": {
        "cpu_percent": None,
        "load": [0.1, 0.2, 0.3],
        "memory": {"total_mb": 7859, "available_mb": 3929},
        "rss_mb": 200.0,
        "temperature_c": {"CPU-therm": 48.5},
        "temperature_max_c": 48.5,
        "disk_free_mb": 1234,
        "pid": 4242,
    },
    "link": {
        "state": "connected",
        "reason": "",
        "connects": 1,
        "inflight": 0,
        "rejected": 0,
        "inbound_dropped": 0,
        "oversize": 0,
        "handler_errors": 0,
    },
    "outbox": {
        "depth": 3,
        "bytes": 1024,
        "dropped": {"telemetry": 5, "event": 0, "control": 0},
        "write_errors": 0,
    },
    "commands": {"handled": 2, "failed": 1, "rejected": 0},
    "pipelines": {
        "door": {
            "fps": 14.9,
            "frames": 100,
            "events": 4,
            "errors": 0,
            "dropped_frames": 2,
            "captured_frames": 102,
            "camera_reopens": 0,
            "camera_state": "streaming",
            "model": "yolox-nano@0.1.0",
            "hung": False,
            "latency": {
                "pre": {"p50_ms": 0.5, "p95_ms": 0.7},
                "infer": {"p50_ms": 20.0, "p95_ms": 25.0},
                "post": {"p50_ms": 1.0, "p95_ms": 1.5},
                "total": {"p50_ms": 21.5, "p95_ms": 27.2},
            },
        }
    },
}

# name{labels} value, with label values in the escaped form the format allows.
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
_SAMPLE = re.compile(
    rf"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{{{_LABEL}(?:,{_LABEL})*\}})? "
    r"(?P<value>[-+]?(?:[0-9]+(?:\.[0-9]*)?(?:e[-+]?[0-9]+)?|Inf|NaN))$"
)


def lines(text: str) -> list[str]:
    assert text.endswith("\n")
    return text.splitlines()


def get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.headers["Content-Type"], response.read().decode()


def get_error(url: str) -> urllib.error.HTTPError:
    with pytest.raises(urllib.error.HTTPError) as info:
        get(url)
    info.value.close()
    return info.value


# --- render ---------------------------------------------------------------------------


def test_render_gives_the_documented_lines() -> None:
    got = lines(render(SNAPSHOT))
    for expected in (
        "# TYPE edge_agent_info gauge",
        'edge_agent_info{device="cam-01"} 1',
        "edge_agent_uptime_seconds 12.5",
        "edge_agent_load1 0.1",
        "edge_agent_memory_total_bytes 8240758784",  # 7859 MiB
        "edge_agent_resident_memory_bytes 209715200",
        'edge_agent_temperature_celsius{zone="CPU-therm"} 48.5',
        "edge_agent_disk_free_bytes 1293942784",
        "edge_agent_mqtt_connected 1",
        'edge_agent_mqtt_state{state="connected"} 1',
        "# TYPE edge_agent_mqtt_connects_total counter",
        "edge_agent_mqtt_connects_total 1",
        "edge_agent_outbox_messages 3",
        'edge_agent_outbox_dropped_total{priority="telemetry"} 5',
        "edge_agent_commands_failed_total 1",
        "# TYPE edge_agent_pipeline_fps gauge",
        'edge_agent_pipeline_fps{pipeline="door"} 14.9',
        "# TYPE edge_agent_pipeline_frames_total counter",
        'edge_agent_pipeline_frames_total{pipeline="door"} 100',
        'edge_agent_pipeline_dropped_frames_total{pipeline="door"} 2',
        'edge_agent_pipeline_hung{pipeline="door"} 0',
        'edge_agent_camera_state{pipeline="door",state="streaming"} 1',
        'edge_agent_pipeline_model_info{pipeline="door",model="yolox-nano@0.1.0"} 1',
        'edge_agent_pipeline_latency_seconds{pipeline="door",stage="infer",quantile="0.5"} 0.02',
        'edge_agent_pipeline_latency_seconds{pipeline="door",stage="pre",quantile="0.95"} 0.0007',
    ):
        assert expected in got, expected


def test_none_values_and_strings_are_left_out() -> None:
    text = render(SNAPSHOT)
    assert "edge_agent_cpu_percent" not in text  # None on the first report: no family at all
    assert "reason" not in text and "pid" not in text


def test_exposition_is_well_formed() -> None:
    """Every sample parses, follows its family's HELP and TYPE, and families never interleave."""
    seen: set[str] = set()
    current = ""
    types: dict[str, str] = {}
    for line in lines(render(SNAPSHOT)):
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in seen, f"{name} appears twice"
            seen.add(name)
            current = name
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name == current and kind in ("gauge", "counter")
            types[name] = kind
        else:
            match = _SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name = match["name"]
            assert name == current, f"{name} outside its family"
            assert name.startswith("edge_agent_")
            assert name.endswith("_total") == (types[name] == "counter"), name
    assert len(seen) > 30


def test_missing_and_malformed_parts_do_not_crash() -> None:
    assert render({}) == ""
    assert lines(render({"device": "d"})) == [
        "# HELP edge_agent_info The device id this agent runs as: always 1.",
        "# TYPE edge_agent_info gauge",
        'edge_agent_info{device="d"} 1',
    ]
    broken: dict[str, Any] = {
        "system": None,
        "link": "down",
        "outbox": {"dropped": [1, 2], "messages": 7},
        "pipelines": {
            "a": None,
            "b": {"latency": {"infer": None, "pre": {"p50_ms": None, "p95_ms": "slow"}}},
            "c": {"frames": "many", "fps": float("nan"), "hung": True, "latency": []},
        },
    }
    got = lines(render(broken))
    assert "edge_agent_outbox_messages 7" in got
    assert 'edge_agent_pipeline_fps{pipeline="c"} NaN' in got
    assert 'edge_agent_pipeline_hung{pipeline="c"} 1' in got
    assert not any('pipeline="b"' in line or "frames_total" in line for line in got)


def test_label_values_are_escaped() -> None:
    snapshot = {"pipelines": {'gate "A"\\east\nside': {"frames": 1}}}
    assert 'edge_agent_pipeline_frames_total{pipeline="gate \\"A\\"\\\\east\\nside"} 1' in lines(
        render(snapshot)
    )


# --- the server -----------------------------------------------------------------------


def test_server_serves_metrics_on_a_free_port() -> None:
    with MetricsServer("127.0.0.1", 0, lambda: SNAPSHOT) as server:
        assert server.port != 0 and server.running
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        status, content_type, body = get(server.url)
        assert status == 200
        assert content_type == CONTENT_TYPE
        assert content_type.startswith("text/plain; version=0.0.4")
        assert body == render(SNAPSHOT)
        assert 'edge_agent_pipeline_frames_total{pipeline="door"} 100' in body.splitlines()
        # A query string is still /metrics; HEAD answers without a body.
        assert get(server.url + "?probe=1")[0] == 200
        request = urllib.request.Request(server.url, method="HEAD")
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200 and response.read() == b""


def test_other_paths_are_404() -> None:
    with MetricsServer("127.0.0.1", 0, lambda: SNAPSHOT) as server:
        base = f"http://127.0.0.1:{server.port}"
        for path in ("/", "/metrics/", "/metricsx", "/favicon.ico"):
            assert get_error(base + path).code == 404, path


def test_each_scrape_takes_a_fresh_snapshot_with_escaped_names() -> None:
    snapshot = copy.deepcopy(SNAPSHOT)
    calls = 0

    def take() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        snapshot["pipelines"]["door"]["frames"] = 100 * calls
        return snapshot

    snapshot["pipelines"]['back"door\\2'] = {"frames": 9}
    with MetricsServer("localhost", 0, take) as server:
        first = get(server.url)[2].splitlines()
        second = get(server.url)[2].splitlines()
    assert 'edge_agent_pipeline_frames_total{pipeline="door"} 100' in first
    assert 'edge_agent_pipeline_frames_total{pipeline="door"} 200' in second
    assert 'edge_agent_pipeline_frames_total{pipeline="back\\"door\\\\2"} 9' in first


def test_a_failing_snapshot_is_a_500_and_the_server_survives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    answers: list[Any] = [RuntimeError("outbox locked"), SNAPSHOT]

    def take() -> dict[str, Any]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    with MetricsServer("127.0.0.1", 0, take) as server:
        assert get_error(server.url).code == 500
        assert get(server.url)[0] == 200
    assert "could not build the snapshot" in caplog.text


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.20", "edge.example.net"])
def test_non_loopback_addresses_are_refused_without_allow_remote(host: str) -> None:
    with pytest.raises(ConfigError, match="allow_remote"):
        MetricsServer(host, 0, lambda: SNAPSHOT)


def test_allow_remote_binds_all_interfaces() -> None:
    with MetricsServer("0.0.0.0", 0, lambda: SNAPSHOT, allow_remote=True) as server:
        assert get(f"http://127.0.0.1:{server.port}/metrics")[0] == 200


def test_loopback_addresses() -> None:
    for host in ("127.0.0.1", "127.0.0.53", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "", "10.0.0.1", "example.com", "127.0.0.1.nip.io"):
        assert not is_loopback(host), host


def test_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    with MetricsServer("::1", 0, lambda: SNAPSHOT) as server:
        assert server.url == f"http://[::1]:{server.port}/metrics"
        assert get(server.url)[0] == 200


def test_bad_port_and_busy_port() -> None:
    with pytest.raises(ConfigError, match="65535"):
        MetricsServer("127.0.0.1", 70000, lambda: SNAPSHOT)
    with MetricsServer("127.0.0.1", 0, lambda: SNAPSHOT) as first:
        second = MetricsServer("127.0.0.1", first.port, lambda: SNAPSHOT)
        with pytest.raises(AgentError, match="cannot listen"):
            second.start()
        assert not second.running and second.stop()


def test_stop_joins_the_thread_and_closes_the_port() -> None:
    server = MetricsServer("127.0.0.1", 0, lambda: SNAPSHOT)
    assert server.stop()  # before start: nothing to do
    server.start()
    port = server.port
    thread = server._thread
    assert thread is not None and thread.is_alive()
    # A client that connects and never sends a request holds a handler thread, not stop().
    stalled = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        started = time.monotonic()
        assert server.stop(timeout=2.0)
        assert time.monotonic() - started < 2.0
    finally:
        stalled.close()
    assert not thread.is_alive() and not server.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert server.stop()  # twice is fine
