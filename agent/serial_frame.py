"""The binary frame `SerialSink` speaks to UART peripherals, and its CRC-16/CCITT-FALSE:
`encode_frame` builds one, `FrameDecoder` finds them again in a byte stream.

Frame layout (multi-byte fields big-endian):

    offset  size  field
    0       2     magic    0xAA 0x55
    2       2     length   payload bytes (0..max_payload; the frame is length + 9 bytes)
    4       1     type     0x01 EVENT (payload: compact UTF-8 JSON of the event)
                           0x06 ACK   (no payload; seq = the frame acknowledged)
                           0x15 NAK   (no payload; seq = the frame to resend)
    5       2     seq      sequence number, 0..65535, wraps; one per event, kept on resends
    7       n     payload
    7+n     2     crc      CRC-16/CCITT-FALSE over length, type, seq and payload
                           (poly 0x1021, init 0xFFFF, no reflection, no final XOR;
                           check value 0x29B1 for b"123456789")

A decoder that meets a bad CRC or an impossible length skips one byte and looks for the
next magic, so one corrupted frame costs that frame only.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

MAGIC = b"\xaa\x55"
HEADER = struct.Struct(">HBH")  # length, type, seq (after the magic)
CRC = struct.Struct(">H")
OVERHEAD = len(MAGIC) + HEADER.size + CRC.size  # 9 bytes around the payload
MAX_PAYLOAD = 0xFFFF


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return tuple(table)


_TABLE = _crc_table()


def crc16_ccitt_false(data: bytes | bytearray | memoryview, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE of `data`, table-driven; pass `crc` to continue a running one."""
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


class FrameType(enum.IntEnum):
    EVENT = 0x01
    ACK = 0x06
    NAK = 0x15


@dataclass(frozen=True)
class Frame:
    """One decoded frame; `type` is an int so unknown types still come through."""

    type: int
    seq: int
    payload: bytes = b""


def encode_frame(frame_type: int, seq: int, payload: bytes = b"") -> bytes:
    """The wire bytes of one frame (payload of at most 65535 bytes, seq taken mod 65536)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    body = HEADER.pack(len(payload), frame_type & 0xFF, seq & 0xFFFF) + payload
    return MAGIC + body + CRC.pack(crc16_ccitt_false(body))


@dataclass
class DecoderStats:
    frames: int = 0
    bad_crc: int = 0
    too_long: int = 0  # a length field above max_payload: noise, or a frame we refuse
    junk_bytes: int = 0  # bytes skipped while looking for the magic


@dataclass
class FrameDecoder:
    """Feed it bytes as they arrive; it returns the complete, CRC-checked frames in them."""

    max_payload: int = 4096
    stats: DecoderStats = field(default_factory=DecoderStats)
    _buffer: bytearray = field(default_factory=bytearray, repr=False)

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        buf = self._buffer
        while True:
            start = buf.find(MAGIC)
            if start < 0:
                keep = 1 if buf.endswith(MAGIC[:1]) else 0  # a magic split across reads
                self.stats.junk_bytes += len(buf) - keep
                del buf[: len(buf) - keep]
                return frames
            if start:
                self.stats.junk_bytes += start
                del buf[:start]
            if len(buf) < len(MAGIC) + HEADER.size:
                return frames
            length, frame_type, seq = HEADER.unpack_from(buf, len(MAGIC))
            if length > self.max_payload:
                self.stats.too_long += 1
                del buf[:1]
                continue
            end = len(MAGIC) + HEADER.size + length
            if len(buf) < end + CRC.size:
                return frames
            (crc,) = CRC.unpack_from(buf, end)
            if crc != crc16_ccitt_false(buf[len(MAGIC) : end]):
                self.stats.bad_crc += 1
                del buf[:1]
                continue
            frames.append(Frame(frame_type, seq, bytes(buf[len(MAGIC) + HEADER.size : end])))
            self.stats.frames += 1
            del buf[: end + CRC.size]
