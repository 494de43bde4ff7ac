"""Crash-safe file writes: a reader (or the next start after a power cut) sees the old file
or the new one, never half of either. Used by set_config, the OTA state and store, and
provisioning's keys and certificates.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(
    path: Path, data: bytes | str, mode: int | None = None, dir_mode: int = 0o777
) -> None:
    """Write to a temp file beside `path`, fsync it, rename it over `path`, fsync the
    directory. `mode`: the file's permission bits; None keeps an existing file's, and a new
    file gets 0600 (the temp file's). `dir_mode`: for a parent directory made here."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=dir_mode)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        elif path.exists():
            os.fchmod(fd, path.stat().st_mode & 0o777)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
