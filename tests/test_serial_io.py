"""SerialSink and SerialSource through real pseudo-terminal pairs: the component opens the
slave (through a symlink the test can re-point, like a udev name), the test plays the device
on the master: it reads what the agent sends, answers ACK/NAK, and writes sensor lines.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydantic
import pytest

from agent.serial_frame import (
    Frame,
    FrameDecoder,
    FrameType,
    crc16_ccitt_false,
    encode_frame,
)
from agent.serial_io import (
    PortState,
    SerialSink,
    SerialSinkConfig,
    SerialSource,
    SerialSourceConfig,
)
from agent.serial_lines import (
    GpsUpdate,
    LineSplitter,
    Readings,
    Rejected,
    parse_line,
    with_checksum,
)

FAST = {"reopen_min_s": 0.05, "reopen_max_s": 0.2}


class Pty:
    """The device end of a pseudo-terminal pair; the agent opens `name` (the slave)."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        self.name = os.ttyname(slave)
        os.close(slave)  # the pair lives while the master is open
        self.closed = False

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def read(self, timeout: float = 0.2) -> bytes:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return b""
        try:
            return os.read(self.master, 65536)
        except OSError:  # EIO: the agent closed its end
            return b""

    def read_lines(self, count: int, timeout: float = 3.0) -> list[bytes]:
        buf = b""
        deadline = time.monotonic() + timeout
        while buf.count(b"\n") < count and time.monotonic() < deadline:
            buf += self.read(0.05)
        lines = buf.split(b"\n")
        assert len(lines) > count, f"wanted {count} lines, got {buf!r}"
        return lines[:count]

    def read_frames(self, count: int, timeout: float = 3.0) -> list[Frame]:
        decoder = FrameDecoder()
        frames: list[Frame] = []
        deadline = time.monotonic() + timeout
        while len(frames) < count and time.monotonic() < deadline:
            frames += decoder.feed(self.read(0.05))
        assert len(frames) >= count, f"wanted {count} frames, got {frames}"
        assert decoder.stats.bad_crc == 0
        return frames

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.master)


def point(link: Path, target: str) -> None:
    """Re-point the configured port path atomically, as udev would on a replug."""
    tmp = link.with_suffix(".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def wait_until(predicate: Callable[[], bool], timeout: float = 3.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.01)


@pytest.fixture
def ptys() -> Iterator[Callable[[], Pty]]:
    made: list[Pty] = []

    def make() -> Pty:
        made.append(Pty())
        return made[-1]

    yield make
    for pty in made:
        pty.close()


@pytest.fixture
def port_link(tmp_path: Path) -> Path:
    return tmp_path / "ttyDEVICE"


@pytest.fixture
def workers() -> Iterator[Callable[..., SerialSink | SerialSource]]:
    """Starts sinks/sources and checks that each stops within its bounded join."""
    made: list[SerialSink | SerialSource] = []

    def make(kind: type, **config: object) -> SerialSink | SerialSource:
        model = SerialSinkConfig if kind is SerialSink else SerialSourceConfig
        cfg = model.model_validate(config)
        worker = kind(cfg)
        worker.start()
        made.append(worker)
        return worker

    yield make
    for worker in made:
        assert worker.stop(timeout=2.0) == []
        assert worker.state is PortState.STOPPED


def opened(worker: SerialSink | SerialSource, reopens: int = 0) -> None:
    wait_until(
        lambda: worker.state is PortState.OPEN and worker.stats()["reopens"] >= reopens,
        what=f"port open (reopens >= {reopens})",
    )


# --- frame and CRC ------------------------------------------------------------------


def test_crc16_ccitt_false_check_value() -> None:
    assert crc16_ccitt_false(b"123456789") == 0x29B1
    assert crc16_ccitt_false(b"") == 0xFFFF
    # running CRC over two halves is the CRC of the whole
    assert crc16_ccitt_false(b"56789", crc16_ccitt_false(b"1234")) == 0x29B1


def test_frame_round_trip_and_resync_after_corruption() -> None:
    first = encode_frame(FrameType.EVENT, 0xFFFF, b'{"a":1}')
    assert first[:2] == b"\xaa\x55" and first[2:4] == b"\x00\x07" and first[4] == 0x01
    assert int.from_bytes(first[-2:], "big") == crc16_ccitt_false(first[2:-2])
    broken = bytearray(encode_frame(FrameType.EVENT, 1, b"xyz"))
    broken[8] ^= 0x40  # flip a payload bit
    decoder = FrameDecoder()
    stream = b"noise" + first + bytes(broken) + encode_frame(FrameType.ACK, 2)
    frames = [f for i in range(0, len(stream), 3) for f in decoder.feed(stream[i : i + 3])]
    assert frames == [Frame(1, 0xFFFF, b'{"a":1}'), Frame(FrameType.ACK, 2, b"")]
    assert decoder.stats.bad_crc == 1 and decoder.stats.junk_bytes >= 5


def test_config_is_closed_and_checked() -> None:
    with pytest.raises(pydantic.ValidationError):
        SerialSinkConfig(port="/dev/ttyUSB0", stopbits=3)
    with pytest.raises(pydantic.ValidationError):
        SerialSinkConfig(port="/dev/ttyUSB0", speed=9600)  # type: ignore[call-arg]
    with pytest.raises(pydantic.ValidationError):
        SerialSourceConfig(port="/dev/ttyUSB0", reopen_min_s=5, reopen_max_s=1)


# --- sink ---------------------------------------------------------------------------


def test_sink_writes_json_lines(ptys, port_link, workers) -> None:
    device = ptys()
    point(port_link, device.name)
    sink = workers(SerialSink, port=str(port_link), max_rate_hz=None, baudrate=57600)
    opened(sink)
    events = [
        {"seq": i, "boxes": [[1, 2, 3, 4]], "label": "person", "score": 0.9} for i in range(3)
    ]
    for event in events:
        sink.send(event)
    assert [json.loads(line) for line in device.read_lines(3)] == events
    wait_until(lambda: sink.stats().get("sent") == 3)


def test_sink_binary_frames_parse_back_with_crc(ptys, port_link, workers) -> None:
    device = ptys()
    point(port_link, device.name)
    sink = workers(SerialSink, port=str(port_link), format="binary", max_rate_hz=None)
    opened(sink)
    for i in range(3):
        sink.send({"seq": i, "label": "car", "name": "vélo"})
    frames = device.read_frames(3)
    assert [f.seq for f in frames] == [0, 1, 2]
    assert all(f.type == FrameType.EVENT for f in frames)
    assert [json.loads(f.payload) for f in frames] == [
        {"seq": i, "label": "car", "name": "vélo"} for i in range(3)
    ]


def test_sink_ack_nak_then_ack_resends_same_frame(ptys, port_link, workers) -> None:
    device = ptys()
    point(port_link, device.name)
    sink = workers(
        SerialSink,
        port=str(port_link),
        format="binary",
        ack=True,
        ack_timeout_s=1.0,
        retries=2,
        max_rate_hz=None,
    )
    opened(sink)
    sink.send({"n": 1})
    (first,) = device.read_frames(1)
    device.write(encode_frame(FrameType.NAK, first.seq))
    (second,) = device.read_frames(1)
    assert second == first  # the same frame, same sequence number
    device.write(encode_frame(FrameType.ACK, 99))  # a stray ACK for another frame: ignored
    device.write(encode_frame(FrameType.ACK, second.seq))
    wait_until(lambda: sink.stats().get("acked") == 1, what="ack counted")
    stats = sink.stats()
    assert (stats["naks"], stats["resends"], stats.get("failed", 0)) == (1, 1, 0)
    assert stats["stray_replies"] == 1


def test_sink_ack_never_answered_counts_failed_after_n_tries(ptys, port_link, workers) -> None:
    device = ptys()
    point(port_link, device.name)
    sink = workers(
        SerialSink,
        port=str(port_link),
        format="binary",
        ack=True,
        ack_timeout_s=0.15,
        retries=2,
        max_rate_hz=None,
    )
    opened(sink)
    sink.send({"n": 1})
    frames = device.read_frames(3, timeout=2.0)
    assert len({f.seq for f in frames}) == 1  # 1 try + 2 resends of the same frame
    wait_until(lambda: sink.stats().get("failed") == 1, what="failure counted")
    assert sink.stats()["ack_timeouts"] == 3
    assert device.read(0.3) == b""  # nothing more: given up
    sink.send({"n": 2})  # the next event gets a fresh sequence number
    (nxt,) = device.read_frames(1)
    assert nxt.seq == frames[0].seq + 1
    device.write(encode_frame(FrameType.ACK, nxt.seq))
    wait_until(lambda: sink.stats().get("acked") == 1)


def test_sink_ack_in_json_lines(ptys, port_link, workers) -> None:
    device = ptys()
    point(port_link, device.name)
    sink = workers(SerialSink, port=str(port_link), ack=True, ack_timeout_s=1.0, max_rate_hz=None)
    opened(sink)
    sink.send({"n": 7})
    (line,) = device.read_lines(1)
    body = json.loads(line)
    assert body == {"n": 7, "link_seq": 0}
    device.write(b"NAK 0\r\n")
    assert json.loads(device.read_lines(1)[0]) == body
    device.write(b"ACK 0\n")
    wait_until(lambda: sink.stats().get("acked") == 1)


def test_sink_rate_limit_coalesces_to_newest(ptys, port_link, workers) -> None:
    device = ptys()
    point(port_link, device.name)
    sink = workers(SerialSink, port=str(port_link), max_rate_hz=5.0, burst=1)
    opened(sink)
    arrivals: list[tuple[float, int]] = []

    def device_reads() -> None:  # timestamps lines as they arrive, while events are sent
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and (not arrivals or arrivals[-1][1] != 14):
            chunk = device.read(0.02)
            arrivals.extend((time.monotonic(), json.loads(x)["i"]) for x in chunk.splitlines())

    reader = threading.Thread(target=device_reads)
    reader.start()
    started = time.monotonic()
    for i in range(15):  # 50 events/s for 0.3 s (longer on a loaded machine)
        sink.send({"i": i})
        time.sleep(0.02)
    sending = time.monotonic() - started
    reader.join(3.0)
    stats = sink.stats()
    assert stats["sent"] + stats["coalesced"] == 15
    # one at once, then at most one per 0.2 s while events come, then the newest
    assert 2 <= stats["sent"] <= 2 + sending / 0.2, (stats, sending)
    assert arrivals[-1][1] == 14  # the newest always goes out
    assert len(arrivals) == stats["sent"]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    assert all(gap > 0.15 for gap in gaps), gaps  # 5/s: 0.2 s apart, less read jitter


def test_full_queue_drops_oldest_then_delivers_when_port_appears(ptys, port_link, workers) -> None:
    point(port_link, "/nonexistent/tty")  # plugged in later
    sink = workers(SerialSink, port=str(port_link), queue_size=3, max_rate_hz=None, **FAST)
    wait_until(lambda: sink.stats()["failures"] >= 1, what="a failed open")
    for i in range(10):
        sink.send({"i": i})
    assert sink.stats()["dropped_full"] == 7
    device = ptys()
    point(port_link, device.name)
    assert [json.loads(x)["i"] for x in device.read_lines(3)] == [7, 8, 9]


def test_sink_reopens_after_unplug(ptys, port_link, workers) -> None:
    first = ptys()
    point(port_link, first.name)
    sink = workers(SerialSink, port=str(port_link), max_rate_hz=None, **FAST)
    opened(sink)
    sink.send({"i": 0})
    assert json.loads(first.read_lines(1)[0]) == {"i": 0}
    wait_until(lambda: sink.stats().get("sent") == 1)  # else it is in flight: sent again
    first.close()  # unplugged: the slave hangs up, the next I/O fails
    wait_until(lambda: sink.state is PortState.BACKOFF, what="port lost while idle")
    sink.send({"i": 1})  # queued while away
    second = ptys()
    point(port_link, second.name)
    opened(sink, reopens=1)
    sink.send({"i": 2})
    assert [json.loads(x) for x in second.read_lines(2)] == [{"i": 1}, {"i": 2}]
    assert sink.stats()["reopens"] == 1


def test_event_in_flight_at_unplug_is_sent_again_after_reopen(ptys, port_link, workers) -> None:
    first = ptys()
    point(port_link, first.name)
    sink = workers(
        SerialSink, port=str(port_link), format="binary", ack=True, ack_timeout_s=2.0, **FAST
    )
    opened(sink)
    sink.send({"i": 0})
    (frame,) = first.read_frames(1)
    first.close()  # pulled while the sink waits for the ACK
    second = ptys()
    point(port_link, second.name)
    opened(sink, reopens=1)
    (again,) = second.read_frames(1)
    assert json.loads(again.payload) == {"i": 0} and again.seq == frame.seq + 1
    second.write(encode_frame(FrameType.ACK, again.seq))
    wait_until(lambda: sink.stats().get("acked") == 1)
    assert sink.stats()["write_errors"] == 1 and sink.stats().get("failed", 0) == 0


def test_stop_is_bounded_during_backoff(port_link) -> None:
    sink = SerialSink(SerialSinkConfig(port=str(port_link), reopen_min_s=30, reopen_max_s=60))
    sink.start()
    wait_until(lambda: sink.state is PortState.BACKOFF)
    started = time.monotonic()
    assert sink.stop(timeout=2.0) == []
    assert time.monotonic() - started < 0.5 and sink.state is PortState.STOPPED


def test_shared_stop_event_stops_both(ptys, port_link, tmp_path) -> None:
    device = ptys()
    point(port_link, device.name)
    stop = threading.Event()
    sink = SerialSink(SerialSinkConfig(port=str(port_link), exclusive=False), stop)
    source = SerialSource(SerialSourceConfig(port=str(tmp_path / "absent")), stop)
    sink.start()
    source.start()
    opened(sink)
    stop.set()  # SIGTERM
    assert sink.stop(1.0) == [] and source.stop(1.0) == []


# --- source -------------------------------------------------------------------------

GGA = with_checksum("GPGGA,123519.00,2332.1234,S,04637.5678,W,1,08,0.9,545.4,M,46.9,M,,")
RMC = with_checksum("GNRMC,123520.00,A,2332.1300,S,04637.5700,W,022.4,084.4,150325,003.1,W,A")


def test_nmea_parsing_units_and_signs() -> None:
    gga = parse_line(GGA)
    assert isinstance(gga, GpsUpdate) and gga.talker == "GP"
    assert gga.fields["lat"] == pytest.approx(-(23 + 32.1234 / 60))
    assert gga.fields["lon"] == pytest.approx(-(46 + 37.5678 / 60))
    assert gga.fields["fix_quality"] == 1 and gga.fields["satellites"] == 8
    assert gga.fields["altitude_m"] == 545.4 and gga.fields["utc_time"] == "12:35:19.00"
    north = parse_line(with_checksum("GPGGA,000001,4807.038,N,01131.000,E,2,12,0.5,10.0,M,,M,,"))
    assert isinstance(north, GpsUpdate)
    assert north.fields["lat"] == pytest.approx(48.1173) and north.fields["lon"] > 11.5
    rmc = parse_line(RMC)
    assert isinstance(rmc, GpsUpdate) and rmc.fields["valid"] is True
    assert rmc.fields["speed_kmh"] == pytest.approx(22.4 * 1.852, abs=1e-3)
    assert rmc.fields["date"] == "2025-03-15"
    nofix = parse_line(with_checksum("GPGGA,123521.00,,,,,0,00,99.99,,,,,,"))
    assert isinstance(nofix, GpsUpdate) and "lat" not in nofix.fields
    assert parse_line(GGA[:-2] + "00") == Rejected("bad_checksum", GGA[:-2] + "00")
    assert parse_line(with_checksum("GPGGA,123519,9912.0,N,00000.0,E,1,08,,,,,,,")).kind == (  # type: ignore[union-attr]
        "malformed"
    )


def test_key_value_parsing() -> None:
    got = parse_line("temp=21.5 hum=40,door=open, co2=-3e2")
    assert got == Readings({"temp": 21.5, "hum": 40.0, "door": "open", "co2": -300.0})
    assert parse_line("temp=") == Rejected("malformed", "temp=")
    assert parse_line("=5") == Rejected("malformed", "=5")


def test_line_splitter_bounds() -> None:
    splitter = LineSplitter(max_line=16)
    out = splitter.feed(b"a=1\r\n" + b"x" * 40)
    out += splitter.feed(b"yyy\nb=2\n\xff\xfe\n")
    assert out == ["a=1", Rejected("too_long"), "b=2", Rejected("not_utf8")]


def test_source_reads_gps_and_counts_bad_checksum(ptys, port_link, workers) -> None:
    device = ptys()
    point(port_link, device.name)
    source = workers(SerialSource, port=str(port_link))
    opened(source)
    device.write(f"{GGA}\r\n{RMC}\r\n".encode())
    wait_until(lambda: source.stats().get("gps") == 2, what="two GPS sentences")
    gps = source.latest()["gps"]
    assert gps["lat"] == pytest.approx(-(23 + 32.13 / 60))  # RMC is the newest fix
    assert gps["fix_quality"] == 1 and gps["satellites"] == 8 and gps["altitude_m"] == 545.4
    assert gps["speed_knots"] == 22.4 and gps["utc"] == "2025-03-15T12:35:20.00Z"
    assert gps["talker"] == "GN" and abs(gps["ts"] - time.time()) < 5
    bad = GGA.replace("545.4", "545.9")  # one digit off: the checksum no longer matches
    device.write(f"{bad}\r\n".encode())
    wait_until(lambda: source.stats()["rejected"].get("bad_checksum") == 1)
    assert source.latest()["gps"]["altitude_m"] == 545.4


def test_source_key_values_and_garbage(ptys, port_link, workers) -> None:
    device = ptys()
    point(port_link, device.name)
    source = workers(SerialSource, port=str(port_link), max_line=82)
    opened(source)
    device.write(
        b"temp=21.5 hum=40\n"
        b"\xff\xfe\xfd garbage\n"  # not UTF-8
        + b"x" * 200
        + b"\n"  # over-long
        + with_checksum("GPGSV,3,1,11,03,03,111,00,04,15,270,00,06,01,010,00,13,06,292,00").encode()
        + b"\r\n"  # valid, but a sentence we do not read
        + b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,\n"  # no checksum
        + b"hello world\n"
        + b"temp=22.0,door=open\n"
    )
    wait_until(lambda: source.stats().get("readings") == 2, what="both readings")
    sensors = source.latest()["sensors"]
    assert sensors["temp"]["value"] == 22.0 and sensors["hum"]["value"] == 40.0
    assert sensors["door"]["value"] == "open"
    assert source.stats()["rejected"] == {
        "not_utf8": 1,
        "too_long": 1,
        "unknown_sentence": 1,
        "missing_checksum": 1,
        "unrecognised": 1,
    }


def test_source_reopens_after_unplug(ptys, port_link, workers) -> None:
    first = ptys()
    point(port_link, first.name)
    source = workers(SerialSource, port=str(port_link), **FAST)
    opened(source)
    first.write(b"temp=1\n")
    wait_until(lambda: source.stats().get("readings") == 1)
    first.write(b"temp=half-a-li")  # a partial line, then the cable is pulled
    time.sleep(0.1)
    first.close()
    wait_until(lambda: source.stats()["failures"] >= 1, what="port lost")
    second = ptys()
    point(port_link, second.name)
    opened(source, reopens=1)
    second.write(b"ne\ntemp=2\n")  # the stale half line is not glued to the new data
    wait_until(lambda: source.latest()["sensors"]["temp"]["value"] == 2.0)
    assert source.stats()["reopens"] == 1
