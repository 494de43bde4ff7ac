"""Prometheus text-format metrics from the agent's telemetry snapshot: `render` turns the
snapshot into exposition text (format 0.0.4); `MetricsServer` serves it on GET /metrics.

The endpoint is optional and off by default. It listens on loopback unless told
`allow_remote=True`: the figures name the device's pipelines and models, and the server has
no authentication or TLS, so exposing it is a choice to make in the config, not a default.

Names are `edge_agent_*` in base units (seconds, bytes, degrees Celsius); counters end in
`_total`; a value that is None or missing is left out, never reported as 0.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from agent.errors import AgentError, ConfigError

__all__ = ["CONTENT_TYPE", "MetricsServer", "is_loopback", "render"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_MIB = 1024 * 1024
_QUANTILES = {"p50_ms": "0.5", "p90_ms": "0.9", "p95_ms": "0.95", "p99_ms": "0.99"}

Number = int | float
Labels = tuple[tuple[str, str], ...]


# --- Rendering ------------------------------------------------------------------------


def _number(value: object) -> Number | None:
    """The value as a sample, or None for what is not a number (None, strings, dicts)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    return None


def _format_value(value: Number) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _section(parent: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = parent.get(key)
    return value if isinstance(value, Mapping) else {}


def _scaled(value: object, factor: float) -> Number | None:
    number = _number(value)
    if number is None:
        return None
    scaled = number * factor
    return int(scaled) if isinstance(number, int) and float(factor).is_integer() else scaled


@dataclass
class _Family:
    name: str
    kind: str  # "gauge" or "counter"
    help_text: str
    samples: list[tuple[Labels, Number]] = field(default_factory=list)


class _Exposition:
    """Families in first-seen order, each with its samples together (as the format needs)."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}

    def add(self, name: str, kind: str, help_text: str, value: object, **labels: object) -> None:
        number = _number(value)
        if number is None:
            return
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = _Family(name, kind, help_text)
        family.samples.append((tuple((k, str(v)) for k, v in labels.items()), number))

    def gauge(self, name: str, help_text: str, value: object, **labels: object) -> None:
        self.add(name, "gauge", help_text, value, **labels)

    def counter(self, name: str, help_text: str, value: object, **labels: object) -> None:
        assert name.endswith("_total"), name
        self.add(name, "counter", help_text, value, **labels)

    def text(self) -> str:
        lines: list[str] = []
        for family in self._families.values():
            lines.append(f"# HELP {family.name} {_escape_help(family.help_text)}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            for labels, value in family.samples:
                if labels:
                    inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
                    lines.append(f"{family.name}{{{inner}}} {_format_value(value)}")
                else:
                    lines.append(f"{family.name} {_format_value(value)}")
        return "\n".join(lines) + "\n" if lines else ""


def _render_system(out: _Exposition, system: Mapping[str, Any]) -> None:
    out.gauge(
        "edge_agent_cpu_percent",
        "Busy share of all CPUs since the previous report, percent.",
        system.get("cpu_percent"),
    )
    load = system.get("load")
    if isinstance(load, list | tuple):
        for value, minutes in zip(load[:3], (1, 5, 15)):
            out.gauge(f"edge_agent_load{minutes}", f"{minutes}-minute load average.", value)
    memory = _section(system, "memory")
    out.gauge(
        "edge_agent_memory_total_bytes",
        "Physical memory of the device.",
        _scaled(memory.get("total_mb"), _MIB),
    )
    out.gauge(
        "edge_agent_memory_available_bytes",
        "Memory available for new allocations without swapping (MemAvailable).",
        _scaled(memory.get("available_mb"), _MIB),
    )
    out.gauge(
        "edge_agent_resident_memory_bytes",
        "Resident memory of the agent process.",
        _scaled(system.get("rss_mb"), _MIB),
    )
    for zone, celsius in _section(system, "temperature_c").items():
        out.gauge(
            "edge_agent_temperature_celsius",
            "Temperature of a thermal zone.",
            celsius,
            zone=zone,
        )
    out.gauge(
        "edge_agent_temperature_max_celsius",
        "Hottest thermal zone.",
        system.get("temperature_max_c"),
    )
    out.gauge(
        "edge_agent_disk_free_bytes",
        "Free space on the file system of the state directory.",
        _scaled(system.get("disk_free_mb"), _MIB),
    )


def _render_link(out: _Exposition, link: Mapping[str, Any]) -> None:
    state = link.get("state")
    if isinstance(state, str):
        out.gauge(
            "edge_agent_mqtt_connected",
            "1 while the broker has accepted the connection, else 0.",
            state == "connected",
        )
        out.gauge(
            "edge_agent_mqtt_state",
            "State of the MQTT link: 1 for the current state.",
            1,
            state=state,
        )
    out.counter(
        "edge_agent_mqtt_connects_total",
        "Connections the broker accepted (CONNACK success).",
        link.get("connects"),
    )
    out.gauge(
        "edge_agent_mqtt_inflight",
        "Outbox messages sent and not yet acknowledged by the broker.",
        link.get("inflight"),
    )
    out.counter(
        "edge_agent_mqtt_rejected_total",
        "Outbox messages the broker refused or that could not be sent.",
        link.get("rejected"),
    )
    out.counter(
        "edge_agent_mqtt_inbound_dropped_total",
        "Inbound messages dropped because handlers fell behind.",
        link.get("inbound_dropped"),
    )
    out.counter(
        "edge_agent_mqtt_inbound_oversize_total",
        "Inbound messages dropped for a payload above the size limit.",
        link.get("oversize"),
    )
    out.counter(
        "edge_agent_mqtt_handler_errors_total",
        "Inbound message handler calls that raised.",
        link.get("handler_errors"),
    )


def _render_outbox(out: _Exposition, outbox: Mapping[str, Any]) -> None:
    # `messages` is what Outbox.stats() calls it; `depth` is accepted as well.
    depth = outbox.get("messages", outbox.get("depth"))
    out.gauge(
        "edge_agent_outbox_messages",
        "Messages queued in the outbox until the broker acknowledges them.",
        depth,
    )
    out.gauge("edge_agent_outbox_bytes", "Payload bytes queued in the outbox.", outbox.get("bytes"))
    for priority, count in _section(outbox, "dropped").items():
        out.counter(
            "edge_agent_outbox_dropped_total",
            "Messages the outbox bound dropped, by priority.",
            count,
            priority=priority,
        )
    out.counter(
        "edge_agent_outbox_write_errors_total",
        "Outbox writes that failed (disk full, I/O error).",
        outbox.get("write_errors"),
    )
    out.gauge(
        "edge_agent_outbox_last_sequence",
        "Sequence number of the newest message ever queued.",
        outbox.get("last_seq"),
    )


def _render_commands(out: _Exposition, commands: Mapping[str, Any]) -> None:
    for key, help_text in (
        ("handled", "Remote commands that ran and succeeded."),
        ("failed", "Remote commands that ran and failed."),
        ("rejected", "Remote commands refused before running (unknown, malformed, busy)."),
    ):
        out.counter(f"edge_agent_commands_{key}_total", help_text, commands.get(key))


# (snapshot key, metric name, kind, help) per pipeline figure; label: pipeline.
_PIPELINE_FIGURES = (
    ("fps", "edge_agent_pipeline_fps", "gauge", "Frames inferred per second, recently."),
    ("frames", "edge_agent_pipeline_frames_total", "counter", "Frames inferred."),
    ("events", "edge_agent_pipeline_events_total", "counter", "Detection events queued."),
    ("errors", "edge_agent_pipeline_errors_total", "counter", "Frames that failed inference."),
    (
        "captured_frames",
        "edge_agent_pipeline_captured_frames_total",
        "counter",
        "Frames read from the camera.",
    ),
    (
        "dropped_frames",
        "edge_agent_pipeline_dropped_frames_total",
        "counter",
        "Camera frames replaced by a newer one before inference took them.",
    ),
    (
        "camera_reopens",
        "edge_agent_camera_reopens_total",
        "counter",
        "Times the camera was reopened after a stall or an error.",
    ),
    ("hung", "edge_agent_pipeline_hung", "gauge", "1 while inference has made no progress."),
)


def _render_pipeline(out: _Exposition, name: str, pipeline: Mapping[str, Any]) -> None:
    for key, metric, kind, help_text in _PIPELINE_FIGURES:
        out.add(metric, kind, help_text, pipeline.get(key), pipeline=name)
    state = pipeline.get("camera_state")
    if isinstance(state, str):
        out.gauge(
            "edge_agent_camera_state",
            "State of the pipeline's camera stream: 1 for the current state.",
            1,
            pipeline=name,
            state=state,
        )
    model = pipeline.get("model")
    if isinstance(model, str):
        out.gauge(
            "edge_agent_pipeline_model_info",
            "The model (name@version) the pipeline runs: always 1.",
            1,
            pipeline=name,
            model=model,
        )
    for stage, figures in _section(pipeline, "latency").items():
        if not isinstance(figures, Mapping):
            continue
        for key, quantile in _QUANTILES.items():
            ms = _number(figures.get(key))
            if ms is None:
                continue
            out.gauge(
                "edge_agent_pipeline_latency_seconds",
                "Per-stage latency quantiles over recent frames (pre, infer, post, total).",
                round(ms / 1000.0, 9),
                pipeline=name,
                stage=stage,
                quantile=quantile,
            )


def render(snapshot: Mapping[str, Any]) -> str:
    """The telemetry snapshot as Prometheus text; missing or malformed parts are skipped."""
    out = _Exposition()
    if not isinstance(snapshot, Mapping):
        return out.text()
    device = snapshot.get("device")
    if isinstance(device, str):
        out.gauge(
            "edge_agent_info", "The device id this agent runs as: always 1.", 1, device=device
        )
    out.gauge(
        "edge_agent_uptime_seconds", "Seconds since the agent started.", snapshot.get("uptime_s")
    )
    out.gauge(
        "edge_agent_snapshot_timestamp_seconds",
        "When these figures were taken, Unix time.",
        snapshot.get("ts"),
    )
    _render_system(out, _section(snapshot, "system"))
    _render_link(out, _section(snapshot, "link"))
    _render_outbox(out, _section(snapshot, "outbox"))
    _render_commands(out, _section(snapshot, "commands"))
    for name, pipeline in _section(snapshot, "pipelines").items():
        if isinstance(pipeline, Mapping):
            _render_pipeline(out, str(name), pipeline)
    return out.text()


# --- Serving --------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _family(host: str) -> socket.AddressFamily:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return socket.AF_INET
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow scraper never holds up stop()

    def __init__(
        self,
        address: tuple[str, int],
        family: socket.AddressFamily,
        snapshot: Callable[[], Mapping[str, Any]],
    ) -> None:
        self.address_family = family
        self.snapshot = snapshot
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print a traceback to stderr; a dropped scrape is not news.
        log.debug("metrics: request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "edge-agent-metrics"
    timeout = 10.0  # seconds a client may take to send its request

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        if urlsplit(self.path).path != "/metrics":
            self._send(
                404,
                "text/plain; charset=utf-8",
                b"not found: the metrics are at /metrics\n",
                send_body,
            )
            return
        try:
            body = render(self.server.snapshot()).encode("utf-8")
        except Exception:  # a broken snapshot fails this scrape, never the server
            log.exception("metrics: could not build the snapshot")
            self._send(500, "text/plain; charset=utf-8", b"snapshot failed\n", send_body)
            return
        self._send(200, CONTENT_TYPE, body, send_body)

    def _send(self, status: int, content_type: str, body: bytes, send_body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: %s " + format, self.address_string(), *args)


class MetricsServer:
    """GET /metrics on `host:port` from a daemon thread; `port=0` takes a free port.

    `snapshot` is called on the server's threads, once per scrape: it should return the
    latest telemetry dict, cheaply and safely from another thread.
    """

    POLL_S = 0.2  # how often the serving thread looks at the stop flag

    def __init__(
        self,
        host: str,
        port: int,
        snapshot: Callable[[], Mapping[str, Any]],
        *,
        allow_remote: bool = False,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"metrics: port {port} is not between 0 and 65535")
        if not allow_remote and not is_loopback(host):
            raise ConfigError(
                f"metrics: refusing to listen on {host!r}, which is not a loopback address; "
                "the endpoint has no authentication: set allow_remote = true to expose it"
            )
        self.host = host
        self._port = port
        self._snapshot = snapshot
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def port(self) -> int:
        """The port it listens on once started (the one picked when asked for 0)."""
        return self._server.server_address[1] if self._server is not None else self._port

    @property
    def url(self) -> str:
        host = f"[{self.host.strip('[]')}]" if _family(self.host) == socket.AF_INET6 else self.host
        return f"http://{host}:{self.port}/metrics"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Bind and serve; raises AgentError when the address cannot be bound."""
        if self._thread is not None:
            return
        try:
            server = _Server(
                (self.host.strip("[]"), self._port), _family(self.host), self._snapshot
            )
        except OSError as exc:
            raise AgentError(
                f"metrics: cannot listen on {self.host}:{self._port}: {exc.strerror or exc}"
            ) from exc
        server.timeout = self.POLL_S
        self._server = server
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics: serving %s", self.url)

    def _serve(self) -> None:
        server = self._server
        assert server is not None
        while not self._stop.is_set():
            server.handle_request()  # returns after one request or POLL_S

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop serving and close the socket; False (and a warning) if the thread outlives
        `timeout` seconds. Safe to call twice, or before start()."""
        thread, server = self._thread, self._server
        if thread is None or server is None:
            return True
        self._stop.set()
        thread.join(timeout)
        if thread.is_alive():
            log.warning("metrics: the server thread did not stop within %.1f s", timeout)
            return False
        server.server_close()
        self._thread = None
        self._server = None
        return True

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
