"""One serial port that reopens itself: its settings (pydantic, closed), the `PortState`
machine with jittered exponential backoff, and `PortWorker`, the thread that owns a port.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import random
import termios
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import serial
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.mqtt_link import reconnect_delay

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 0.05  # one blocking read at most: bounds how soon a thread sees `stop`
# What an unplugged port raises: pyserial's error, the OS error, or termios' own (tcdrain).
PORT_ERRORS: tuple[type[Exception], ...] = (serial.SerialException, OSError, termios.error)
OPEN_ERRORS: tuple[type[Exception], ...] = (*PORT_ERRORS, ValueError)  # + bad settings

_PARITY = {
    "none": serial.PARITY_NONE,
    "even": serial.PARITY_EVEN,
    "odd": serial.PARITY_ODD,
    "mark": serial.PARITY_MARK,
    "space": serial.PARITY_SPACE,
}


class SerialPortConfig(BaseModel):
    """A serial port and how to reopen it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
    def _delays_ordered(self) -> SerialPortConfig:
        if self.stopbits not in (1, 1.5, 2):
            raise ValueError(f"stopbits must be 1, 1.5 or 2, not {self.stopbits}")
        if self.reopen_min_s > self.reopen_max_s:
            raise ValueError("reopen_min_s must not exceed reopen_max_s")
        return self


class SerialSinkConfig(SerialPortConfig):
    """A UART device that receives detection events."""

    format: Literal["jsonl", "binary"] = Field(
        default="jsonl", description="JSON lines, or binary frames (agent.serial_frame)."
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


class SerialSourceConfig(SerialPortConfig):
    """A UART sensor: NMEA GPS receiver or key=value lines."""

    baudrate: int = Field(default=9600, gt=0, le=4_000_000, description="Bits per second.")
    max_line: int = Field(
        default=256, ge=16, le=65536, description="Longer lines are skipped (NMEA: 82)."
    )


class PortState(enum.Enum):
    """A port's states; `ALLOWED` lists the moves from each."""

    CLOSED = "closed"
    OPENING = "opening"
    OPEN = "open"
    BACKOFF = "backoff"
    STOPPED = "stopped"


ALLOWED: dict[PortState, set[PortState]] = {
    PortState.CLOSED: {PortState.OPENING, PortState.STOPPED},
    PortState.OPENING: {PortState.OPEN, PortState.BACKOFF, PortState.STOPPED},
    PortState.OPEN: {PortState.BACKOFF, PortState.STOPPED},
    PortState.BACKOFF: {PortState.OPENING, PortState.STOPPED},
    PortState.STOPPED: set(),
}


class ReopeningPort:
    """One serial port and its state machine; only its owner's thread calls it."""

    def __init__(
        self,
        config: SerialPortConfig,
        stop: threading.Event,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self._stop = stop
        self._rand = rand
        self._serial: serial.SerialBase | None = None
        self._state = PortState.CLOSED
        self._attempt = 0  # failures since the last successful open
        self._retry_at = 0.0
        self.opens = 0
        self.reopens = 0  # successful opens after the first
        self.failures = 0  # failed opens and lost ports
        self.last_error: str | None = None

    @property
    def state(self) -> PortState:
        return self._state

    def _move(self, new: PortState) -> None:
        if new not in ALLOWED[self._state]:
            raise RuntimeError(f"serial {self.config.port}: {self._state.value} -> {new.value}")
        log.debug("serial %s: %s -> %s", self.config.port, self._state.value, new.value)
        self._state = new

    def get(self) -> serial.SerialBase | None:
        """The open port; opens it first (after the backoff wait) when needed. None when it
        could not be opened (now in BACKOFF) or when stopping."""
        if self._state is PortState.OPEN:
            return self._serial
        if self._state is PortState.STOPPED or self._stop.is_set():
            return None
        if self._state is PortState.BACKOFF and self._stop.wait(
            max(0.0, self._retry_at - time.monotonic())
        ):
            return None
        self._move(PortState.OPENING)
        try:
            port = self._open()
        except OPEN_ERRORS as exc:
            self.lost(exc)
            return None
        self._serial = port
        self._attempt = 0
        self.opens += 1
        if self.opens > 1:
            self.reopens += 1
        self._move(PortState.OPEN)
        log.info("serial %s: open at %d baud", self.config.port, self.config.baudrate)
        return port

    def _open(self) -> serial.SerialBase:
        c = self.config
        port = serial.serial_for_url(
            c.port,
            do_not_open=True,
            baudrate=c.baudrate,
            bytesize=c.bytesize,
            parity=_PARITY[c.parity],
            stopbits=c.stopbits,
            rtscts=c.rtscts,
            xonxoff=c.xonxoff,
            timeout=READ_TIMEOUT_S,
            write_timeout=c.write_timeout_s,
            exclusive=c.exclusive,
        )
        port.open()
        return port

    def lost(self, exc: BaseException) -> None:
        """The port failed to open or failed in use: close it and back off."""
        self._close_serial()
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        c = self.config
        delay = reconnect_delay(self._attempt, c.reopen_min_s, c.reopen_max_s, self._rand)
        self._retry_at = time.monotonic() + delay
        level = logging.WARNING if self._attempt == 0 else logging.DEBUG
        log.log(level, "serial %s: %s; retry in %.2f s", self.config.port, self.last_error, delay)
        self._attempt += 1
        self._move(PortState.BACKOFF)

    def close(self) -> None:
        self._close_serial()
        if self._state is not PortState.STOPPED:
            self._move(PortState.STOPPED)

    def _close_serial(self) -> None:
        port, self._serial = self._serial, None
        if port is not None:
            with contextlib.suppress(*PORT_ERRORS):
                port.close()

    def snapshot(self) -> dict[str, Any]:
        return {
            "port": self.config.port,
            "state": self._state.value,
            "reopens": self.reopens,
            "failures": self.failures,
            "last_error": self.last_error,
        }


class PortWorker:
    """A thread that owns one `ReopeningPort`; `start()`, `stop()` with a bounded join."""

    kind = "serial"

    def __init__(self, config: SerialPortConfig, stop_event: threading.Event | None) -> None:
        self._stop = stop_event or threading.Event()
        self._port = ReopeningPort(config, self._stop)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> PortState:
        return self._port.state

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._main, name=f"{self.kind} {self._port.config.port}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> list[str]:
        """Set the stop event and join; returns the thread's name when it did not stop."""
        self._stop.set()
        self._wake()
        thread = self._thread
        if thread is None:
            self._port.close()
            return []
        thread.join(timeout)
        if thread.is_alive():
            log.warning("%s: thread still running after %.1f s", thread.name, timeout)
            return [thread.name]
        return []

    def _wake(self) -> None:
        """Wake the thread from a wait so it sees `stop` at once."""

    def _main(self) -> None:
        try:
            while not self._stop.is_set():
                port = self._port.get()
                if port is None:
                    continue
                try:
                    self._step(port)
                except PORT_ERRORS as exc:
                    self._on_lost()
                    self._port.lost(exc)
        except Exception:  # a bug: say so, and leave the port closed
            log.exception("%s: worker failed", self.kind)
        finally:
            self._port.close()

    def _step(self, port: serial.SerialBase) -> None:
        raise NotImplementedError

    def _on_lost(self) -> None:
        """Forget per-connection state before the port is reopened."""
