"""The optional HTTPS transfer path: `<url><sha256>` fetched with Range requests into the same
`.part` files and sidecars as the MQTT path, so either resumes what the other began.
"""

from __future__ import annotations

import http.client
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from agent.ota.downloader import FileFetcher, PartFile
from agent.ota.state import OtaError

log = logging.getLogger(__name__)

_READ = 1 << 16


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """TLS 1.2+, the server checked against `ca_file` (or the system store)."""
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise OtaError(f"transfer: ota.ca_file {ca_file} cannot be used: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def https_fetcher(
    base_url: str, context: ssl.SSLContext, timeout_s: float, attempts: int = 3
) -> FileFetcher:
    """A FileFetcher for files at `<base_url><sha256>`; a dropped connection is resumed from
    the chunks held, up to `attempts` times in a row without progress."""
    parts = urlsplit(base_url)
    if parts.scheme != "https" or not parts.hostname:
        raise OtaError(f"transfer: {base_url!r} is not an https:// URL")
    host, port = parts.hostname, parts.port or 443
    prefix = parts.path if parts.path.endswith("/") else parts.path + "/"

    def fetch(part: PartFile, report: Callable[[int], None], cancelled: Callable[[], bool]) -> None:
        failures = 0
        while True:
            missing = [i for i in range(part.count) if i not in part.have]
            if not missing:
                return
            before = part.held_bytes()
            try:
                _fetch_run(part, missing, report, cancelled)
            except (OSError, http.client.HTTPException) as exc:
                failures = 0 if part.held_bytes() > before else failures + 1
                if failures >= attempts:
                    raise OtaError(
                        f"transfer: https {host}: {exc} ({attempts} attempts in a row)"
                    ) from exc
                log.warning("OTA https %s: %s; resuming from %d bytes", host, exc, part.held)
                time.sleep(0.2 * failures)

    def _fetch_run(
        part: PartFile,
        missing: list[int],
        report: Callable[[int], None],
        cancelled: Callable[[], bool],
    ) -> None:
        """One GET from the first missing chunk to the end of the next run of missing ones."""
        first = last = missing[0]
        while last + 1 in missing:
            last += 1
        start = first * part.chunk
        end = min((last + 1) * part.chunk, part.entry.size) - 1
        conn = http.client.HTTPSConnection(host, port, context=context, timeout=timeout_s)
        try:
            conn.request(
                "GET", prefix + part.entry.sha256, headers={"Range": f"bytes={start}-{end}"}
            )
            response = conn.getresponse()
            if response.status == 200 and start != 0:
                raise OtaError(f"transfer: https {host} ignores Range requests")
            if response.status == 404:
                raise OtaError(f"transfer: https {host} does not have {part.entry.path}")
            if response.status not in (200, 206):
                raise OtaError(f"transfer: https {host} answered {response.status}")
            index = first
            while index <= last:
                if cancelled():
                    from agent.ota.downloader import Cancelled

                    raise Cancelled()
                want = part.length(index)
                data = response.read(want)
                if len(data) < want:
                    raise http.client.IncompleteRead(data, want - len(data))
                part.write(index, data)
                report(part.held_bytes())
                index += 1
        finally:
            conn.close()

    return fetch
