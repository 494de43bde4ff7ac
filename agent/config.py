"""The agent's TOML config: one closed pydantic model per section, and `load_config`.

Every problem in a file is reported as `FILE:LINE: field.path: what is wrong`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.config_errors import (
    ConfigProblem,
    Loc,
    LocatedValueError,
    TomlLocator,
    decode_error_position,
    describe,
    report,
    tomllib,
)
from runtimes.base import DelegateSpec, RuntimeOptions
from runtimes.errors import ConfigError

__all__ = [
    "AgentConfig",
    "DelegateConfig",
    "DeviceConfig",
    "DiffusionConfig",
    "MqttConfig",
    "OnnxRuntimeConfig",
    "OtaConfig",
    "OutboxConfig",
    "PipelineConfig",
    "SerialConfig",
    "SerialSinkSection",
    "SerialSourceSection",
    "TelemetryConfig",
    "TfliteRuntimeConfig",
    "TlsConfig",
    "load_config",
]

_TOPIC_SAFE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceConfig(_Section):
    """[device]: who this device is and where it keeps state."""

    id: str = Field(
        pattern=_TOPIC_SAFE,
        description="Device id; the MQTT topic root is edge/<id>/ (letters, digits, . _ -).",
    )
    state_dir: Path = Field(
        default=Path("/var/lib/edge-agent"),
        description="Directory for the outbox, model packages and OTA state.",
    )


class TlsConfig(_Section):
    """[mqtt.tls]: TLS to the broker; present means TLS is on."""

    ca_file: Path | None = Field(
        default=None,
        description="CA bundle that signed the broker certificate (None: system store).",
    )
    cert_file: Path | None = Field(
        default=None, description="Client certificate (PEM) for mutual TLS; needs key_file."
    )
    key_file: Path | None = Field(
        default=None, description="Private key (PEM) of cert_file; needs cert_file."
    )

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            raise LocatedValueError((missing,), "cert_file and key_file must be given together")
        return self


class MqttConfig(_Section):
    """[mqtt]: the broker, credentials and the link's timing."""

    host: str = Field(min_length=1, description="Broker host name or address.")
    port: int = Field(
        default=1883,
        ge=1,
        le=65535,
        description="Broker port (default 1883, or 8883 with [mqtt.tls]).",
    )
    tls: TlsConfig | None = Field(default=None, description="TLS settings; omit for plain TCP.")
    username: str | None = Field(
        default=None, min_length=1, description="User name (with mutual TLS, usually the cert CN)."
    )
    password: SecretStr | None = Field(
        default=None,
        description="Password in the file itself; prefer password_file or password_env.",
    )
    password_file: Path | None = Field(
        default=None, description="File holding the password (trailing newline stripped)."
    )
    password_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the password.",
    )
    client_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="MQTT client id (default: device id).",
    )
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive in seconds.")
    reconnect_min_s: float = Field(
        default=1.0,
        gt=0,
        le=600,
        description="First reconnect delay; doubles per failure, jittered.",
    )
    reconnect_max_s: float = Field(
        default=60.0, gt=0, le=3600, description="Longest reconnect delay."
    )
    session_expiry_s: int = Field(
        default=86400,
        ge=0,
        le=0xFFFFFFFF,
        description="How long the broker keeps the session (subscriptions, queued QoS 1).",
    )
    max_inflight: int = Field(
        default=20,
        ge=1,
        le=1000,
        description="Outbox messages sent but not yet acknowledged, at most.",
    )
    max_inbound_bytes: int = Field(
        default=1 << 20,
        ge=1024,
        le=256 << 20,
        description="Inbound payloads larger than this are dropped and counted.",
    )
    flush_timeout_s: float = Field(
        default=5.0, ge=0, le=300, description="On stop, how long to keep sending the outbox."
    )

    @model_validator(mode="before")
    @classmethod
    def _tls_port(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "port" not in data and data.get("tls") is not None:
            return {**data, "port": 8883}
        return data

    @model_validator(mode="after")
    def _one_password_source(self) -> MqttConfig:
        given = [
            name
            for name in ("password", "password_file", "password_env")
            if getattr(self, name) is not None
        ]
        if len(given) > 1:
            raise LocatedValueError(
                (given[1],), f"give only one of password, password_file, password_env: {given}"
            )
        if given and self.username is None:
            raise LocatedValueError((given[0],), "a password needs a username")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise LocatedValueError(
                ("reconnect_min_s",), "reconnect_min_s must not exceed reconnect_max_s"
            )
        return self

    def resolve_password(self) -> str | None:
        """The password from `password`, `password_env` or `password_file`, read now."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_env is not None:
            value = os.environ.get(self.password_env, "")
            if not value:
                raise ConfigProblem(
                    ("mqtt", "password_env"),
                    f"environment variable {self.password_env} is not set or empty",
                )
            return value
        if self.password_file is not None:
            try:
                value = self.password_file.read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigProblem(
                    ("mqtt", "password_file"), f"cannot read {self.password_file}: {exc}"
                ) from None
            if not value:
                raise ConfigProblem(("mqtt", "password_file"), f"{self.password_file} is empty")
            return value
        return None


class OutboxConfig(_Section):
    """[outbox]: the on-disk queue of messages waiting for the broker's acknowledgement."""

    path: Path | None = Field(
        default=None, description="SQLite file (default: <state_dir>/outbox.db)."
    )
    max_messages: int = Field(
        default=100_000,
        ge=1,
        description="Most messages kept; beyond it telemetry, then old events go.",
    )
    max_bytes: int = Field(
        default=64 << 20, ge=1024, description="Most payload bytes kept; same drop order."
    )
    synchronous: Literal["normal", "full"] = Field(
        default="normal",
        description="SQLite synchronous: normal survives an agent crash, full a power cut too.",
    )


class TelemetryConfig(_Section):
    """[telemetry]: the periodic health report."""

    interval_s: float = Field(default=30.0, ge=1, le=86400, description="Seconds between reports.")


class DelegateConfig(_Section):
    """[[pipelines.runtime.delegates]]: one TFLite delegate, tried in order."""

    kind: Literal["edgetpu", "gpu", "external"] = Field(
        description="edgetpu (Coral), gpu (OpenCL/GL), or external (a delegate library)."
    )
    library: str | None = Field(
        default=None, description="Shared library of an external delegate (or a non-default one)."
    )
    options: dict[str, str] = Field(
        default_factory=dict, description="Options passed to the delegate as strings."
    )

    @model_validator(mode="after")
    def _external_needs_library(self) -> DelegateConfig:
        if self.kind == "external" and not self.library:
            raise LocatedValueError(("library",), "an external delegate needs library")
        return self


class TfliteRuntimeConfig(_Section):
    """[pipelines.runtime] with type = "tflite": LiteRT / tflite-runtime options."""

    type: Literal["tflite"] = Field(description="Run the model with LiteRT (TFLite).")
    threads: int | None = Field(
        default=None, ge=1, le=64, description="CPU threads (None: default)."
    )
    delegates: list[DelegateConfig] = Field(
        default_factory=list, description="Hardware delegates, tried in order."
    )
    xnnpack: bool = Field(default=True, description="Use the XNNPACK CPU delegate.")
    fallback: bool = Field(
        default=False,
        description="If a delegate cannot load, warn and run on the CPU instead of failing.",
    )

    def runtime_options(self) -> RuntimeOptions:
        """These settings as the `runtimes` package takes them."""
        delegates = tuple(
            DelegateSpec(kind=d.kind, library=d.library, options=dict(d.options))
            for d in self.delegates
        )
        return RuntimeOptions(
            threads=self.threads, delegates=delegates, xnnpack=self.xnnpack, fallback=self.fallback
        )


class OnnxRuntimeConfig(_Section):
    """[pipelines.runtime] with type = "onnx": ONNX Runtime options."""

    type: Literal["onnx"] = Field(description="Run the model with ONNX Runtime.")
    threads: int | None = Field(
        default=None, ge=1, le=64, description="Intra-op threads (None: default)."
    )
    inter_op_threads: int | None = Field(
        default=None, ge=1, le=64, description="Inter-op threads (None: default)."
    )
    providers: list[str] | None = Field(
        default=None,
        description="Execution providers in order, e.g. CUDAExecutionProvider (None: best found).",
    )
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        default="all", description="ONNX Runtime graph optimisation level."
    )
    fallback: bool = Field(
        default=False,
        description="If a provider cannot load, warn and run on the CPU instead of failing.",
    )

    def runtime_options(self) -> RuntimeOptions:
        """These settings as the `runtimes` package takes them."""
        return RuntimeOptions(
            threads=self.threads,
            inter_op_threads=self.inter_op_threads,
            providers=tuple(self.providers) if self.providers is not None else None,
            graph_optimization=self.graph_optimization,
            fallback=self.fallback,
        )


RuntimeConfig = Annotated[
    Union[TfliteRuntimeConfig, OnnxRuntimeConfig],  # noqa: UP007 - a tagged union reads clearer
    Field(discriminator="type"),
]


class PipelineConfig(_Section):
    """[[pipelines]]: one camera source, one detection model, one event stream."""

    name: str = Field(
        pattern=_TOPIC_SAFE, description="Pipeline name; events go to edge/<id>/events/<name>."
    )
    source: str = Field(
        min_length=1,
        description="/dev/videoN, an rtsp:// or http:// URL, a video file, or a GStreamer "
        "pipeline ending in appsink.",
    )
    model: str = Field(
        min_length=1, description="Model package directory, model.json, or bundled name."
    )
    runtime: RuntimeConfig | None = Field(
        default=None,
        description="Runtime and its options (None: the runtime the model package names).",
    )
    conf: float = Field(default=0.25, ge=0, le=1, description="Score threshold for a detection.")
    nms: float = Field(
        default=0.45, ge=0, le=1, description="IoU threshold of non-maximum suppression."
    )
    classes: list[str] | None = Field(
        default=None, description="Only report these class names (None: every class)."
    )
    event_mode: Literal["change", "rate"] = Field(
        default="change",
        description="change: an event when the set of detected classes changes; "
        "rate: at most one event every rate_s while something is detected.",
    )
    rate_s: float = Field(
        default=1.0, gt=0, le=3600, description="Seconds between events in rate mode."
    )
    snapshot: bool = Field(
        default=False, description="Attach a JPEG snapshot of the frame to events."
    )
    zones: list[list[tuple[float, float]]] | None = Field(
        default=None,
        description="Only report boxes whose bottom centre lies in one of these polygons "
        "(x, y pairs normalised to the frame, 0..1); None: the whole frame.",
    )
    loop: bool = Field(default=True, description="Video files: start again at the end.")
    realtime: bool = Field(
        default=True,
        description=(
            "Video files: read at the file's frame rate; false reads as fast as the pipeline"
            " takes frames, every frame analysed."
        ),
    )
    reopen_min_s: float = Field(
        default=0.5, gt=0, le=600, description="First delay before reopening a failed source."
    )
    reopen_max_s: float = Field(
        default=30.0, gt=0, le=3600, description="Longest delay between reopen attempts."
    )
    hang_limit_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="A frame in the detector longer than this is a hang: reported, and the "
        "systemd watchdog is no longer fed.",
    )

    @field_validator("zones")
    @classmethod
    def _zones_are_polygons(
        cls, value: list[list[tuple[float, float]]] | None
    ) -> list[list[tuple[float, float]]] | None:
        for zone in value or []:
            if len(zone) < 3:
                raise ValueError("a zone needs at least 3 points")
            if any(not (0.0 <= c <= 1.0) for point in zone for c in point):
                raise ValueError("zone coordinates are fractions of the frame, 0..1")
        return value

    @field_validator("classes")
    @classmethod
    def _classes_unique(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("class names repeat")
        return value


class MetricsConfig(_Section):
    """[metrics]: an optional Prometheus endpoint (off by default, loopback only)."""

    enabled: bool = Field(default=False, description="Serve /metrics for Prometheus.")
    host: str = Field(
        default="127.0.0.1", description="Address to bind; loopback unless allow_remote."
    )
    port: int = Field(default=9108, ge=0, le=65535, description="TCP port (0: any free one).")
    allow_remote: bool = Field(
        default=False,
        description="Allow binding a non-loopback address (the data is unauthenticated).",
    )


class OtaConfig(_Section):
    """[ota]: over-the-air model updates (docs/ota-protocol.md); harmless without a desired
    state from the controller."""

    enabled: bool = Field(
        default=True, description="Follow edge/<id>/desired and update models over the air."
    )
    trusted_keys: list[Path] = Field(
        default_factory=list,
        description="Public keys (.pub PEM files or directories of them) trusted to sign "
        "packages and desired states, besides <state_dir>/trust/*.pub.",
    )
    chunk_bytes: int = Field(
        default=256 << 10,
        ge=4096,
        le=4 << 20,
        description="Bytes asked for per chunk request; must fit mqtt.max_inbound_bytes.",
    )
    window: int = Field(
        default=16,
        ge=1,
        le=256,
        description="Chunk requests outstanding at once, at most (x chunk_bytes in flight).",
    )
    request_timeout_s: float = Field(
        default=10.0, gt=0, le=600, description="A chunk not answered in this time is asked again."
    )
    ca_file: Path | None = Field(
        default=None,
        description="CA bundle for packages fetched over HTTPS (a desired state's url); "
        "None: the system store.",
    )
    stall_timeout_s: float = Field(
        default=120.0,
        gt=0,
        le=86400,
        description="A download with no chunk arriving for this long is given up (and retried "
        "at the next desired state or restart, keeping what it has).",
    )
    validate_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="The validation child (load, probe, test vectors) is killed after this.",
    )
    latency_budget_ms: float = Field(
        default=1000.0,
        gt=0,
        description="Validation fails if one probe inference takes longer than this.",
    )
    trial_s: float = Field(
        default=30.0,
        ge=0,
        le=86400,
        description="Trial period after activation; commit when both it and trial_frames "
        "have passed.",
    )
    trial_frames: int = Field(
        default=100, ge=0, description="Frames the new model must process before commit."
    )
    trial_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="A trial that has not seen trial_frames within this time rolls back.",
    )
    max_error_rate: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Roll back when more than this fraction of trial frames fail.",
    )
    max_latency_ratio: float = Field(
        default=3.0,
        gt=0,
        description="Roll back when the trial's p95 inference latency exceeds the previous "
        "model's by more than this factor.",
    )
    max_detection_change: float = Field(
        default=0.9,
        ge=0,
        description="Roll back when detections per frame change by more than this fraction "
        "of the previous model's rate (only when that rate was above zero).",
    )
    keep_packages: int = Field(
        default=3,
        ge=2,
        le=100,
        description="Packages kept in <state_dir>/models at most (current and previous always).",
    )


SerialKind = Literal["nmea", "kv"]
_ALL_KINDS: list[SerialKind] = ["nmea", "kv"]


class _SerialPortSection(_Section):
    """The settings every serial port takes (as agent.serial_port.SerialPortConfig)."""

    port: str = Field(
        min_length=1,
        description="Device path (/dev/ttyUSB0, /dev/serial0, a udev symlink) or pyserial URL.",
    )
    baudrate: int = Field(default=115200, gt=0, le=4_000_000, description="Bits per second.")
    bytesize: Literal[5, 6, 7, 8] = Field(default=8, description="Data bits.")
    parity: Literal["none", "even", "odd", "mark", "space"] = Field(
        default="none", description="Parity bit."
    )
    stopbits: float = Field(default=1, description="Stop bits: 1, 1.5 or 2.")
    rtscts: bool = Field(default=False, description="RTS/CTS hardware flow control.")
    xonxoff: bool = Field(default=False, description="XON/XOFF software flow control.")
    exclusive: bool = Field(
        default=True, description="Lock the port (flock) so no other process shares it."
    )
    write_timeout_s: float = Field(
        default=1.0, gt=0, le=60, description="A write blocked longer than this fails."
    )
    reopen_min_s: float = Field(
        default=0.5, gt=0, le=600, description="First reopen delay; doubles per failure."
    )
    reopen_max_s: float = Field(default=30.0, gt=0, le=3600, description="Longest reopen delay.")

    @model_validator(mode="after")
    def _port_settings(self) -> _SerialPortSection:
        if self.stopbits not in (1, 1.5, 2):
            raise LocatedValueError(("stopbits",), "stopbits must be 1, 1.5 or 2")
        if self.reopen_min_s > self.reopen_max_s:
            raise LocatedValueError(("reopen_min_s",), "reopen_min_s must not exceed reopen_max_s")
        return self


class SerialSinkSection(_SerialPortSection):
    """[serial.sink]: a UART device that receives every detection event."""

    format: Literal["jsonl", "binary"] = Field(
        default="jsonl", description="JSON lines, or binary CRC-16 frames (agent.serial_frame)."
    )
    max_rate_hz: float | None = Field(
        default=10.0, gt=0, le=10_000, description="Events per second at most (None: no limit)."
    )
    burst: int = Field(default=1, ge=1, le=1000, description="Events sent back to back at most.")
    queue_size: int = Field(default=64, ge=1, le=100_000, description="Events waiting, at most.")
    ack: bool = Field(default=False, description="Wait for the device's ACK/NAK per event.")
    ack_timeout_s: float = Field(default=0.5, gt=0, le=60, description="Wait for ACK this long.")
    retries: int = Field(default=2, ge=0, le=100, description="Resends after NAK or timeout.")
    max_payload: int = Field(
        default=4096, ge=16, le=0xFFFF, description="Longer encoded events are dropped."
    )


class SerialSourceSection(_SerialPortSection):
    """[[serial.sources]]: a UART sensor (NMEA GPS receiver, key=value lines)."""

    name: str = Field(
        pattern=_TOPIC_SAFE, description="Name of this sensor in telemetry (e.g. gps, env)."
    )
    baudrate: int = Field(default=9600, gt=0, le=4_000_000, description="Bits per second.")
    kinds: list[SerialKind] = Field(
        default_factory=lambda: _ALL_KINDS.copy(),
        min_length=1,
        description="What to take from it: nmea (GPS GGA/RMC) and/or kv (key=value readings).",
    )
    max_line: int = Field(
        default=256, ge=16, le=65536, description="Longer lines are skipped (NMEA: 82)."
    )


class SerialConfig(_Section):
    """[serial]: serial peripherals; events go to the sink, sensor values ride along."""

    sink: SerialSinkSection | None = Field(
        default=None, description="[serial.sink]: where detection events are sent (optional)."
    )
    sources: list[SerialSourceSection] = Field(
        default_factory=list, description="[[serial.sources]]: sensors read continuously."
    )
    attach: bool = Field(
        default=True,
        description="Attach the newest sensor values (gps, sensors) to every event.",
    )
    max_age_s: float = Field(
        default=10.0,
        gt=0,
        le=86400,
        description="Values older than this are not attached (a GPS that lost its fix).",
    )

    @model_validator(mode="after")
    def _ports_distinct(self) -> SerialConfig:
        seen: dict[str, str] = {}
        if self.sink is not None:
            seen[self.sink.port] = "sink"
        names: set[str] = set()
        for index, source in enumerate(self.sources):
            if source.name in names:
                raise LocatedValueError(
                    ("sources", index, "name"), f"source name {source.name!r} repeats"
                )
            names.add(source.name)
            if source.port in seen:
                raise LocatedValueError(
                    ("sources", index, "port"),
                    f"port {source.port} is already used by {seen[source.port]}",
                )
            seen[source.port] = f"sources[{index}]"
        return self


class DiffusionConfig(_Section):
    """[diffusion]: the text-to-image pipeline behind the diffusion.generate command."""

    model: str = Field(
        default="tiny-sd",
        min_length=1,
        description="Pipeline directory (optimum Stable-Diffusion layout), its model.json, or "
        "a bundled name.",
    )
    threads: int = Field(
        default=1,
        ge=1,
        le=64,
        description="ONNX Runtime intra-op threads for generation (few, so the camera "
        "pipelines keep their cores).",
    )
    providers: list[str] | None = Field(
        default=None,
        description="Execution providers in order (None: the best installed ones).",
    )
    nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="How much lower than the agent the generation thread runs (OS nice "
        "increment); the detection pipelines keep the agent's priority.",
    )
    queue_depth: int = Field(
        default=2, ge=1, le=64, description="Requests waiting behind the one running, at most."
    )
    max_steps: int = Field(default=50, ge=1, le=1000, description="Most steps a request may ask.")
    max_size: int = Field(
        default=256, ge=8, le=4096, description="Largest width or height in pixels."
    )
    chunk_bytes: int = Field(
        default=64 << 10,
        ge=1024,
        le=4 << 20,
        description="An encoded image larger than this is sent in chunks of this many bytes "
        "(each with index, total and the sha256 of the whole).",
    )
    progress_every: int = Field(
        default=1, ge=1, le=1000, description="Send a progress message every this many steps."
    )


class LlmConfig(_Section):
    """[llm]: the on-device LLM behind the llm.generate command (continuous batching)."""

    model: str = Field(
        min_length=1,
        description="LLM package directory (optimum or onnxruntime-genai ONNX layout) or "
        "bundled name, e.g. tiny-llama-onnx-int8.",
    )
    max_batch: int = Field(
        default=8, ge=1, le=256, description="Requests decoded together in one step, at most."
    )
    cache_mb: float = Field(
        default=16.0, gt=0, le=65536, description="KV cache preallocated at start, in MiB."
    )
    block_size: int = Field(
        default=16, ge=1, le=1024, description="Tokens per KV cache block (the admission unit)."
    )
    threads: int = Field(
        default=1, ge=1, le=64, description="ONNX Runtime intra-op threads for the LLM."
    )
    nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="Niceness added to the LLM threads so camera pipelines keep their fps.",
    )
    queue_depth: int = Field(
        default=32, ge=1, le=4096, description="Requests waiting for the batch, at most."
    )
    max_wait_s: float = Field(
        default=30.0, gt=0, le=3600, description="A request waiting this long for cache fails."
    )
    max_tokens_limit: int = Field(
        default=512, ge=1, description="Largest max_tokens a request may ask for."
    )
    default_timeout_s: float = Field(
        default=120.0, gt=0, le=86400, description="Deadline of a request that sets none."
    )


class AgentConfig(_Section):
    """The whole agent.toml."""

    device: DeviceConfig = Field(description="[device]: identity and state directory.")
    mqtt: MqttConfig = Field(description="[mqtt]: the broker and credentials.")
    outbox: OutboxConfig = Field(
        default=OutboxConfig(), description="[outbox]: the durable send queue."
    )
    telemetry: TelemetryConfig = Field(
        default=TelemetryConfig(), description="[telemetry]: health reports."
    )
    metrics: MetricsConfig = Field(
        default=MetricsConfig(), description="[metrics]: optional Prometheus endpoint."
    )
    pipelines: list[PipelineConfig] = Field(
        default_factory=list, description="[[pipelines]]: detection pipelines, one per source."
    )
    serial: SerialConfig | None = Field(
        default=None, description="[serial]: serial sink and sensor sources (optional)."
    )
    ota: OtaConfig = Field(default=OtaConfig(), description="[ota]: over-the-air model updates.")
    llm: LlmConfig | None = Field(
        default=None, description="[llm]: the on-device LLM; omit to serve none."
    )
    diffusion: DiffusionConfig | None = Field(
        default=None,
        description="[diffusion]: text-to-image generation; absent: no diffusion.generate.",
    )

    @model_validator(mode="after")
    def _pipeline_names_unique(self) -> AgentConfig:
        seen: dict[str, int] = {}
        for index, pipeline in enumerate(self.pipelines):
            if pipeline.name in seen:
                raise LocatedValueError(
                    ("pipelines", index, "name"),
                    f"pipeline name {pipeline.name!r} is taken by pipelines[{seen[pipeline.name]}]",
                )
            seen[pipeline.name] = index
        return self

    @property
    def client_id(self) -> str:
        """The MQTT client id: mqtt.client_id, else the device id."""
        return self.mqtt.client_id or self.device.id

    @property
    def outbox_path(self) -> Path:
        """The outbox database file: outbox.path, else <state_dir>/outbox.db."""
        return self.outbox.path or self.device.state_dir / "outbox.db"


def load_config(path: str | Path, *, check_files: bool = True) -> AgentConfig:
    """Read and validate an agent.toml; every problem comes back as one `ConfigError`.

    With `check_files`, the password source and the TLS files must be readable now.
    """
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read config file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{file}:{line}: the config file is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line, col, message = decode_error_position(exc, text)
        raise ConfigError(f"{file}:{line}:{col}: TOML syntax error: {message}") from None

    locator = TomlLocator(text)
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as exc:
        problems = [describe(error, data, AgentConfig) for error in exc.errors()]
        raise ConfigError(report(file, locator, problems)) from None
    if check_files:
        problems = list(_file_problems(config))
        if problems:
            raise ConfigError(report(file, locator, problems))
    return config


def _file_problems(config: AgentConfig) -> Iterator[tuple[Loc, str]]:
    try:
        config.mqtt.resolve_password()
    except ConfigProblem as problem:
        yield problem.loc, problem.message
    tls = config.mqtt.tls
    if tls is not None:
        for name in ("ca_file", "cert_file", "key_file"):
            file = getattr(tls, name)
            if file is not None and not os.access(file, os.R_OK):
                state = "does not exist" if not file.exists() else "is not readable"
                yield ("mqtt", "tls", name), f"{file} {state}"
