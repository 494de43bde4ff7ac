"""What `SerialSource` understands in a line: NMEA 0183 GGA/RMC GPS sentences (checksum
verified) and `key=value` sensor readings; plus `LineSplitter`, bytes to bounded lines.

Every line comes back as `GpsUpdate`, `Readings` or `Rejected(kind)`; nothing here raises.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

Value = float | str

KNOTS_TO_KMH = 1.852
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
_PAIR_SEP = re.compile(r"[,\s]+")
_TALKER = re.compile(r"^[A-Z]{2}$")


@dataclass(frozen=True)
class GpsUpdate:
    """Fields one GGA or RMC sentence gave (only those it had; empty fields are left out)."""

    sentence: str  # "GGA" or "RMC"
    talker: str  # "GP" (GPS), "GN" (multi-constellation), "GL", "GA", ...
    fields: dict[str, Any]


@dataclass(frozen=True)
class Readings:
    """The pairs of one key=value line; numbers as float, anything else as text."""

    values: dict[str, Value]


@dataclass(frozen=True)
class Rejected:
    """A line that was skipped, and why: bad_checksum, missing_checksum, unknown_sentence,
    malformed, not_utf8, too_long, unrecognised."""

    kind: str
    line: str = ""


Parsed = GpsUpdate | Readings | Rejected


def nmea_checksum(body: str) -> int:
    """XOR of the characters between `$` and `*`."""
    value = 0
    for char in body.encode("ascii", errors="replace"):
        value ^= char
    return value


def with_checksum(body: str) -> str:
    """`$body*HH`: a complete sentence for `body` (tests and simulators)."""
    return f"${body}*{nmea_checksum(body):02X}"


def parse_line(line: str) -> Parsed:
    """Classify and parse one line (no line ending)."""
    text = line.strip()
    if text.startswith(("$", "!")):
        return parse_nmea(text)
    if "=" in text:
        return parse_key_values(text)
    return Rejected("unrecognised", text)


def parse_nmea(text: str) -> Parsed:
    body, star, given = text[1:].partition("*")
    if not star:
        return Rejected("missing_checksum", text)
    try:
        expected = int(given.strip()[:2], 16)
    except ValueError:
        return Rejected("bad_checksum", text)
    if len(given.strip()) != 2 or expected != nmea_checksum(body):
        return Rejected("bad_checksum", text)
    parts = body.split(",")
    address = parts[0]
    talker, sentence = address[:2], address[2:]
    if not _TALKER.match(talker) or sentence not in ("GGA", "RMC"):
        return Rejected("unknown_sentence", text)
    try:
        fields = _gga(parts) if sentence == "GGA" else _rmc(parts)
    except (ValueError, IndexError):
        return Rejected("malformed", text)
    return GpsUpdate(sentence, talker, fields)


def _coordinate(value: str, hemisphere: str, degree_digits: int) -> float | None:
    """ddmm.mmmm / dddmm.mmmm and N/S/E/W to signed decimal degrees."""
    if not value:
        return None
    dot = value.find(".")
    split = (dot if dot >= 0 else len(value)) - 2
    if not hemisphere or hemisphere not in "NSEW" or not 1 <= split <= degree_digits:
        raise ValueError(f"bad coordinate {value!r} {hemisphere!r}")
    degrees = int(value[:split])
    minutes = float(value[split:])
    if minutes >= 60.0:
        raise ValueError(f"minutes out of range in {value!r}")
    result = degrees + minutes / 60.0
    if result > (90.0 if degree_digits == 2 else 180.0):
        raise ValueError(f"coordinate out of range: {value!r}")
    return round(-result if hemisphere in "SW" else result, 7)


def _utc_time(value: str) -> str | None:
    """hhmmss(.ss) to "hh:mm:ss(.ss)"."""
    if not value:
        return None
    if len(value) < 6 or not value[:4].isdigit():
        raise ValueError(f"bad UTC time {value!r}")
    hours, minutes, seconds = int(value[0:2]), int(value[2:4]), float(value[4:])
    if hours > 23 or minutes > 59 or seconds >= 61:
        raise ValueError(f"bad UTC time {value!r}")
    return f"{value[0:2]}:{value[2:4]}:{value[4:]}"


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    if value is not None and value != "":
        out[key] = value


def _gga(parts: list[str]) -> dict[str, Any]:
    # $--GGA,time,lat,N,lon,E,quality,satellites,hdop,altitude,M,geoid,M,age,station
    if len(parts) < 10:
        raise ValueError("GGA needs at least 9 fields")
    out: dict[str, Any] = {}
    _put(out, "utc_time", _utc_time(parts[1]))
    _put(out, "lat", _coordinate(parts[2], parts[3], 2))
    _put(out, "lon", _coordinate(parts[4], parts[5], 3))
    _put(out, "fix_quality", int(parts[6]) if parts[6] else None)
    _put(out, "satellites", int(parts[7]) if parts[7] else None)
    _put(out, "hdop", float(parts[8]) if parts[8] else None)
    _put(out, "altitude_m", float(parts[9]) if parts[9] else None)
    return out


def _rmc(parts: list[str]) -> dict[str, Any]:
    # $--RMC,time,status,lat,N,lon,E,speed_knots,course,ddmmyy,magvar,E[,mode]
    if len(parts) < 10:
        raise ValueError("RMC needs at least 9 fields")
    if parts[2] not in ("A", "V"):
        raise ValueError(f"RMC status {parts[2]!r}")
    out: dict[str, Any] = {"valid": parts[2] == "A"}
    _put(out, "utc_time", _utc_time(parts[1]))
    _put(out, "lat", _coordinate(parts[3], parts[4], 2))
    _put(out, "lon", _coordinate(parts[5], parts[6], 3))
    if parts[7]:
        knots = float(parts[7])
        out["speed_knots"] = knots
        out["speed_kmh"] = round(knots * KNOTS_TO_KMH, 3)
    _put(out, "course_deg", float(parts[8]) if parts[8] else None)
    if parts[9]:
        if len(parts[9]) != 6 or not parts[9].isdigit():
            raise ValueError(f"bad RMC date {parts[9]!r}")
        day, month, year = int(parts[9][0:2]), int(parts[9][2:4]), int(parts[9][4:6])
        if not (1 <= day <= 31 and 1 <= month <= 12):
            raise ValueError(f"bad RMC date {parts[9]!r}")
        century = 1900 if year >= 80 else 2000  # GPS began in 1980
        out["date"] = f"{century + year:04d}-{month:02d}-{day:02d}"
    return out


def parse_key_values(text: str) -> Parsed:
    """`temp=21.5 hum=40,door=open`: pairs split on spaces and/or commas."""
    values: dict[str, Value] = {}
    for token in _PAIR_SEP.split(text.strip()):
        if not token:
            continue
        key, eq, raw = token.partition("=")
        if not eq or not _KEY.match(key) or not raw:
            return Rejected("malformed", text)
        values[key] = _number(raw)
    return Readings(values) if values else Rejected("malformed", text)


def _number(raw: str) -> Value:
    try:
        value = float(raw)
    except ValueError:
        return raw
    return value if math.isfinite(value) else raw


@dataclass
class LineSplitter:
    """Bytes in, complete lines out (UTF-8, endings stripped); an over-long line is cut
    off, reported once as `too_long`, and skipped up to its end."""

    max_line: int = 256
    _buffer: bytearray = field(default_factory=bytearray, repr=False)
    _skipping: bool = False

    def feed(self, data: bytes) -> list[str | Rejected]:
        out: list[str | Rejected] = []
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self.max_line:
                    if not self._skipping:
                        out.append(Rejected("too_long"))
                    self._skipping = True
                    self._buffer.clear()
                return out
            raw = bytes(self._buffer[:end]).rstrip(b"\r")
            del self._buffer[: end + 1]
            if self._skipping:
                self._skipping = False
                continue
            if len(raw) > self.max_line:
                out.append(Rejected("too_long"))
                continue
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(Rejected("not_utf8"))
