#!/usr/bin/env bash
# Install or upgrade edge-agent on a device: a virtual environment at /opt/edge-agent, the
# systemd unit, tmpfiles.d and sysusers.d files, and an example config if there is none.
# Idempotent: run it again to upgrade; it never overwrites /etc/edge-agent/agent.toml and
# never restarts a running agent. See systemd/README.md.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: install.sh [options] [SOURCE]

  SOURCE              a source checkout (a directory with pyproject.toml) or a wheel
                      (.whl); default: the checkout this script is in
  --extras LIST       extras to install, comma-separated: tflite, tflite-legacy, onnx,
                      onnx-gpu, tensorrt (default: tflite; '' for none)
  --python PYTHON     interpreter for the venv, 3.10 or newer (default: python3)
  --system-site-packages
                      let the venv see the system's packages (Jetson: JetPack's TensorRT
                      and OpenCV bindings come from apt, not from pip)
  --files-only        install the unit, tmpfiles, sysusers and config only; leave the venv
  --enable            also `systemctl enable --now edge-agent` (first install)
  --prefix DIR        install under DIR instead of / (tests, inspection); a venv records
                      its own path, so one made under DIR only runs from there
  --dry-run           print what would be done; change nothing
  -h, --help          this text
EOF
}

die() {
    printf 'install.sh: error: %s\n' "$*" >&2
    exit 2
}

say() {
    printf '%s\n' "$*"
}

# Every command that changes the system goes through run: printed, then executed unless
# --dry-run. Checks that only read run directly.
run() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    if [[ $DRY_RUN -eq 0 ]]; then
        "$@"
    fi
}

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
SOURCE=""
EXTRAS="tflite"
PYTHON="python3"
PREFIX="/"
SYSTEM_SITE=0
FILES_ONLY=0
ENABLE=0
DRY_RUN=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        --extras) [[ $# -ge 2 ]] || die "--extras needs a value"; EXTRAS=$2; shift 2 ;;
        --extras=*) EXTRAS=${1#*=}; shift ;;
        --python) [[ $# -ge 2 ]] || die "--python needs a value"; PYTHON=$2; shift 2 ;;
        --python=*) PYTHON=${1#*=}; shift ;;
        --prefix) [[ $# -ge 2 ]] || die "--prefix needs a value"; PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --system-site-packages) SYSTEM_SITE=1; shift ;;
        --files-only) FILES_ONLY=1; shift ;;
        --enable) ENABLE=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) usage >&2; die "unknown option: $1" ;;
        *) [[ -z $SOURCE ]] || die "only one SOURCE, got '$SOURCE' and '$1'"; SOURCE=$1; shift ;;
    esac
done
if [[ $# -gt 0 ]]; then
    [[ -z $SOURCE && $# -eq 1 ]] || die "only one SOURCE"
    SOURCE=$1
fi

# --- Arguments -------------------------------------------------------------------------
[[ $EXTRAS =~ ^([a-z0-9][a-z0-9-]*(,[a-z0-9][a-z0-9-]*)*)?$ ]] \
    || die "--extras: comma-separated extra names expected, got '$EXTRAS'"
[[ $PREFIX == /* ]] || die "--prefix must be an absolute path, got '$PREFIX'"
ROOT=${PREFIX%/}  # "" for /, so "$ROOT/etc" is /etc
while [[ $ROOT == */ ]]; do ROOT=${ROOT%/}; done

for f in edge-agent.service edge-agent.tmpfiles edge-agent.sysusers agent.example.toml README.md; do
    [[ -f $SCRIPT_DIR/$f ]] || die "$SCRIPT_DIR/$f is missing: run the script from its systemd/ folder"
done

if [[ $FILES_ONLY -eq 0 ]]; then
    [[ -n $SOURCE ]] || SOURCE=$SCRIPT_DIR/..
    if [[ -d $SOURCE ]]; then
        SOURCE=$(cd -- "$SOURCE" && pwd)
        [[ -f $SOURCE/pyproject.toml ]] || die "$SOURCE has no pyproject.toml: not an edge-agent checkout"
    elif [[ -f $SOURCE && $SOURCE == *.whl ]]; then
        SOURCE=$(cd -- "$(dirname -- "$SOURCE")" && pwd)/$(basename -- "$SOURCE")
    else
        die "SOURCE must be a checkout directory or a .whl file, got '$SOURCE'"
    fi
fi

IS_ROOT=0
[[ $(id -u) -eq 0 ]] && IS_ROOT=1
if [[ -z $ROOT && $IS_ROOT -eq 0 && $DRY_RUN -eq 0 ]]; then
    die "installing into / needs root: run it with sudo (or try --dry-run, or --prefix DIR)"
fi
# systemctl only makes sense for the running system, booted with systemd.
LIVE_SYSTEMD=0
[[ -z $ROOT && -d /run/systemd/system ]] && LIVE_SYSTEMD=1

VENV=$ROOT/opt/edge-agent
UNIT=$ROOT/etc/systemd/system/edge-agent.service
RENEW_SERVICE=$ROOT/etc/systemd/system/edge-agent-renew.service
RENEW_TIMER=$ROOT/etc/systemd/system/edge-agent-renew.timer
TMPFILES=$ROOT/etc/tmpfiles.d/edge-agent.conf
SYSUSERS=$ROOT/etc/sysusers.d/edge-agent.conf
CONFIG=$ROOT/etc/edge-agent/agent.toml
DOC=$VENV/share/doc/edge-agent/systemd.md
PROVISIONING_DOC=$VENV/share/doc/edge-agent/provisioning.md
ROOT_ARG=()
[[ -n $ROOT ]] && ROOT_ARG=(--root "$ROOT")

[[ $DRY_RUN -eq 1 ]] && say "dry run: nothing is changed"
say "installing edge-agent under ${ROOT:-/}"

# Installs SRC as DST with MODE, or says it is already there.
install_file() {
    local src=$1 dst=$2 mode=$3
    if [[ -f $dst ]] && cmp -s -- "$src" "$dst"; then
        say "unchanged: $dst"
    else
        run install -D -m "$mode" -- "$src" "$dst"
    fi
}

# --- 1. The virtual environment ---------------------------------------------------------
if [[ $FILES_ONLY -eq 0 ]]; then
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found (--python PYTHON)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "$PYTHON is $("$PYTHON" -V 2>&1): edge-agent needs Python 3.10 or newer"
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
        || die "$PYTHON cannot make a venv: install python3-venv (apt-get install python3-venv)"
    if [[ -x $VENV/bin/python ]]; then
        say "venv exists: $VENV (upgrading in place)"
    else
        venv_args=()
        [[ $SYSTEM_SITE -eq 1 ]] && venv_args=(--system-site-packages)
        run "$PYTHON" -m venv "${venv_args[@]}" "$VENV"
    fi
    pip=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
    run "${pip[@]}" install --upgrade pip
    spec=$SOURCE
    [[ -n $EXTRAS ]] && spec="${SOURCE}[${EXTRAS}]"
    # --upgrade takes the new edge-agent; its dependencies move only where it needs them to.
    run "${pip[@]}" install --upgrade --upgrade-strategy only-if-needed "$spec"
    if [[ $DRY_RUN -eq 0 && ! -x $VENV/bin/edge-agent ]]; then
        die "pip finished but $VENV/bin/edge-agent is missing"
    fi
fi

# --- 2. systemd files -------------------------------------------------------------------
install_file "$SCRIPT_DIR/edge-agent.service" "$UNIT" 0644
install_file "$SCRIPT_DIR/edge-agent.tmpfiles" "$TMPFILES" 0644
install_file "$SCRIPT_DIR/edge-agent.sysusers" "$SYSUSERS" 0644
install_file "$SCRIPT_DIR/README.md" "$DOC" 0644
# The certificate renewal (for provisioned devices; enabled by hand, see Next steps).
install_file "$SCRIPT_DIR/edge-agent-renew.service" "$RENEW_SERVICE" 0644
install_file "$SCRIPT_DIR/edge-agent-renew.timer" "$RENEW_TIMER" 0644
if [[ -f $SCRIPT_DIR/../docs/provisioning.md ]]; then
    install_file "$SCRIPT_DIR/../docs/provisioning.md" "$PROVISIONING_DOC" 0644
fi

# --- 3. The user, the config, the directories ------------------------------------------
# Owners need root: without it (a --prefix test run) the files are installed and these
# steps are only reported.
if [[ $IS_ROOT -eq 1 || $DRY_RUN -eq 1 ]]; then
    if command -v systemd-sysusers >/dev/null; then
        run systemd-sysusers "${ROOT_ARG[@]}" "$SYSUSERS"
    elif [[ -z $ROOT ]]; then
        # systemd without sysusers (very old): the same user by hand.
        if ! id -u edge-agent >/dev/null 2>&1; then
            run useradd --system --user-group --home-dir /var/lib/edge-agent \
                --shell /usr/sbin/nologin --comment "edge-agent daemon" edge-agent
        fi
        for group in video dialout plugdev; do
            getent group "$group" >/dev/null || run groupadd --system "$group"
            run usermod --append --groups "$group" edge-agent
        done
    else
        say "systemd-sysusers not found: skipping the user under --prefix $ROOT"
    fi
else
    say "not root: skipping systemd-sysusers $SYSUSERS"
fi

if [[ -e $CONFIG ]]; then
    say "keeping existing config: $CONFIG"
else
    # Mode 0640; tmpfiles (below) makes it root:edge-agent.
    run install -D -m 0640 -- "$SCRIPT_DIR/agent.example.toml" "$CONFIG"
    CONFIG_NEW=1
fi

if [[ $IS_ROOT -eq 1 || $DRY_RUN -eq 1 ]]; then
    if command -v systemd-tmpfiles >/dev/null; then
        run systemd-tmpfiles "${ROOT_ARG[@]}" --create "$TMPFILES"
    elif [[ -n $ROOT ]]; then
        say "systemd-tmpfiles not found: skipping the directories under --prefix $ROOT"
    else
        die "systemd-tmpfiles not found: is this a systemd system?"
    fi
else
    say "not root: skipping systemd-tmpfiles --create $TMPFILES"
fi

# --- 4. systemd -------------------------------------------------------------------------
if [[ $LIVE_SYSTEMD -eq 1 ]]; then
    run systemctl daemon-reload
    if [[ $ENABLE -eq 1 ]]; then
        run systemctl enable --now edge-agent.service
    fi
elif [[ -n $ROOT ]]; then
    say "skipping systemctl: installing under --prefix $ROOT"
else
    say "skipping systemctl: this system is not running systemd"
fi

# --- Next steps -------------------------------------------------------------------------
say ""
say "Next steps:"
if [[ ${CONFIG_NEW:-0} -eq 1 ]]; then
    say "  1. Edit $CONFIG (a copy of the example: set device.id, mqtt.host,"
    say "     the TLS files under /etc/edge-agent/tls and the pipelines), then check it:"
else
    say "  1. Check $CONFIG against the new version (keys the agent no longer"
    say "     knows stop it at start):"
fi
say "       sudo -u edge-agent /opt/edge-agent/bin/python -c \\"
say "         \"from agent.config import load_config; load_config('/etc/edge-agent/agent.toml')\""
say "     and the hardware it sees: sudo -u edge-agent /opt/edge-agent/bin/edge-agent doctor"
say "     Secrets (EDGE_MQTT_PASSWORD=...) go in /etc/edge-agent/agent.env, mode 0640."
if [[ $ENABLE -eq 1 && $LIVE_SYSTEMD -eq 1 ]]; then
    say "  2. Started. Watch it:      journalctl -u edge-agent -f"
elif [[ $LIVE_SYSTEMD -eq 1 ]] && systemctl is-active --quiet edge-agent.service; then
    say "  2. The agent is running the previous version: sudo systemctl restart edge-agent"
else
    say "  2. Start it at boot and now: sudo systemctl enable --now edge-agent"
fi
say "  3. Logs:   journalctl -u edge-agent -f"
say "     Status: systemctl status edge-agent   (watchdog: systemctl show edge-agent -p WatchdogUSec -p WatchdogTimestamp)"
say "  4. Once the device is provisioned (edge-agent provision), renew its certificate"
say "     before it expires: sudo systemctl enable --now edge-agent-renew.timer"
