"""The controller's chunk cache: bounded by bytes, least recently used out."""

from __future__ import annotations

from fleet.blobs import ChunkCache


def key(offset: int) -> tuple[str, int, int, int, int]:
    return ("a" * 64, offset, 100, 1, 2)


def test_keeps_at_most_max_bytes_dropping_the_least_recently_used() -> None:
    cache = ChunkCache(max_bytes=250)
    cache.put(key(0), b"0" * 100, "d0")
    cache.put(key(100), b"1" * 100, "d1")
    assert cache.get(key(0)) == (b"0" * 100, "d0")  # 0 is now the most recent
    cache.put(key(200), b"2" * 100, "d2")  # 300 bytes > 250: 100 goes
    assert cache.get(key(100)) is None
    assert cache.get(key(0)) is not None and cache.get(key(200)) is not None
    cache.put(key(300), b"3" * 300, "d3")  # larger than the whole cache: not kept
    assert cache.get(key(300)) is None and cache.get(key(0)) is not None
    assert cache.get(None) is None
