"""The agent.toml that provisioning writes: device id, state directory, broker and the
mutual-TLS files; validated with `agent.config.load_config` before it replaces anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from agent.atomic import fsync_dir
from agent.config import load_config
from provisioning.identity import IdentityPaths, ProvisioningError


def _q(value: object) -> str:
    """A TOML basic string (JSON's escapes are valid TOML)."""
    return json.dumps(str(value), ensure_ascii=False)


def render_config(device_id: str, paths: IdentityPaths, host: str, port: int) -> str:
    return f"""\
# Written by `edge-agent provision`. Add [[pipelines]] and the other sections as needed;
# systemd/agent.example.toml documents every key.

[device]
id = {_q(device_id)}
state_dir = {_q(paths.state_dir)}

[mqtt]
host = {_q(host)}
port = {port}

# Mutual TLS with the certificate the fleet CA signed at enrolment; its CN (the device id)
# is this device's MQTT user name. `edge-agent renew` replaces the certificate in place.
[mqtt.tls]
ca_file = {_q(paths.ca)}
cert_file = {_q(paths.cert)}
key_file = {_q(paths.key)}
"""


def write_config(path: Path, text: str, *, force: bool = False, check_files: bool = True) -> None:
    """Validate `text` as an agent config, then write it atomically (0640).

    An existing file is never replaced unless `force`.
    """
    if path.exists() and not force:
        raise ProvisioningError(f"{path} exists; not overwriting it (use --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".toml")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o640)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        load_config(tmp, check_files=check_files)  # a ConfigError leaves `path` untouched
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
