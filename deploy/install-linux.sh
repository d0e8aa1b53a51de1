#!/usr/bin/env bash
# Installs (or removes) the remotellm broker or connector as a systemd service.
#
#   sudo deploy/install-linux.sh --role broker
#   sudo REMOTELLM_CONNECTOR_TOKEN=... deploy/install-linux.sh --role connector \
#        --broker-url https://broker.example.com:8443 --llm-url http://127.0.0.1:11434
#   sudo deploy/install-linux.sh --role connector --uninstall [--purge]
#
# Layout (under --prefix DIR when given):
#   /opt/remotellm/venv                     virtualenv with remotellm (pip install of this repo)
#   /etc/remotellm/                         0700
#     connectors.yaml, broker.env           0600, broker role: secrets, never overwritten
#     connectors.yaml.example               broker role: every key explained
#     connector.env                         0600, connector role: secrets, never overwritten
#   /etc/systemd/system/remotellm-ROLE.service
#
# Running it again changes nothing, unless this repo's code or unit changed (then the
# package is reinstalled or the unit replaced, and the service restarted): that is the upgrade.
set -euo pipefail

PROG="$(basename "$0")"
DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_DIR="$(dirname "$DEPLOY_DIR")"

usage() {
    cat <<EOF
usage: $PROG --role broker|connector [options]

  --role ROLE         broker or connector (required)
  --prefix DIR        install everything under DIR (a staging or throwaway root): no root
                      needed, no systemctl call; paths inside the unit stay /opt/..., /etc/...
  --no-service        lay out the files but do not call systemctl
  --no-pip            skip the pip install into the venv (also REMOTELLM_INSTALL_SKIP_PIP=1)
  --python PATH       the Python (>= 3.11) that creates the venv (default: python3, or \$PYTHON)
  --uninstall         stop and remove the service, the unit and the venv; keep secrets
  --purge             with --uninstall: remove the role's config and env files too
  connector role, used only when connector.env is first created:
  --broker-url URL    (or REMOTELLM_BROKER_URL in the environment)
  --llm-url URL       (or REMOTELLM_LLM_URL; default http://127.0.0.1:11434)
  --model M           repeatable (or REMOTELLM_MODELS=a,b); none: the LLM's own list
                      the token is read from REMOTELLM_CONNECTOR_TOKEN, never from a flag
EOF
}

die() {
    echo "$PROG: $*" >&2
    exit 1
}
say() { echo "$PROG: $*"; }

ROLE=""
PREFIX=""
PREFIX_GIVEN=0
UNINSTALL=0
PURGE=0
NO_SERVICE=0
SKIP_PIP=0
case "${REMOTELLM_INSTALL_SKIP_PIP:-}" in 1 | true | yes) SKIP_PIP=1 ;; esac
PYTHON="${PYTHON:-python3}"
BROKER_URL="${REMOTELLM_BROKER_URL:-}"
LLM_URL="${REMOTELLM_LLM_URL:-http://127.0.0.1:11434}"
MODELS="${REMOTELLM_MODELS:-}"
FLAG_MODELS=""

need_arg() { if [ "$#" -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value (see --help)"; fi; }
while [ "$#" -gt 0 ]; do
    case "$1" in
        --role) need_arg "$@"; ROLE="$2"; shift 2 ;;
        --role=*) ROLE="${1#*=}"; shift ;;
        --prefix) need_arg "$@"; PREFIX="$2"; PREFIX_GIVEN=1; shift 2 ;;
        --prefix=*) PREFIX="${1#*=}"; PREFIX_GIVEN=1; shift ;;
        --python) need_arg "$@"; PYTHON="$2"; shift 2 ;;
        --python=*) PYTHON="${1#*=}"; shift ;;
        --broker-url) need_arg "$@"; BROKER_URL="$2"; shift 2 ;;
        --broker-url=*) BROKER_URL="${1#*=}"; shift ;;
        --llm-url) need_arg "$@"; LLM_URL="$2"; shift 2 ;;
        --llm-url=*) LLM_URL="${1#*=}"; shift ;;
        --model) need_arg "$@"; FLAG_MODELS="${FLAG_MODELS:+$FLAG_MODELS,}$2"; shift 2 ;;
        --model=*) FLAG_MODELS="${FLAG_MODELS:+$FLAG_MODELS,}${1#*=}"; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --purge) PURGE=1; shift ;;
        --no-service) NO_SERVICE=1; shift ;;
        --no-pip) SKIP_PIP=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
[ -n "$FLAG_MODELS" ] && MODELS="$FLAG_MODELS"

case "$ROLE" in
    broker | connector) ;;
    "") die "--role broker|connector is required" ;;
    *) die "--role must be broker or connector, not '$ROLE'" ;;
esac
[ "$PURGE" = 1 ] && [ "$UNINSTALL" = 0 ] && die "--purge goes with --uninstall"

# --- layout ------------------------------------------------------------------------------
ROOT="" # nothing is created before the prerequisites are checked
if [ "$PREFIX_GIVEN" = 1 ]; then
    [ -n "$PREFIX" ] || die "--prefix needs a directory"
    case "$PREFIX" in /*) ROOT="$PREFIX" ;; *) ROOT="$PWD/$PREFIX" ;; esac
    while [ "${ROOT%/}" != "$ROOT" ]; do ROOT="${ROOT%/}"; done
fi
APP_DIR="$ROOT/opt/remotellm"
VENV="$APP_DIR/venv"
ETC_DIR="$ROOT/etc/remotellm"
UNIT_DIR="$ROOT/etc/systemd/system"
UNIT="remotellm-$ROLE.service"
UNIT_SRC="$DEPLOY_DIR/systemd/$UNIT"
MARKER="$VENV/.remotellm-source"
if [ "$ROLE" = broker ]; then
    SECRETS=("$ETC_DIR/connectors.yaml" "$ETC_DIR/broker.env")
    OTHER_UNIT="remotellm-connector.service"
else
    SECRETS=("$ETC_DIR/connector.env")
    OTHER_UNIT="remotellm-broker.service"
fi
MANAGE_SERVICE=1
if [ "$PREFIX_GIVEN" = 1 ] || [ "$NO_SERVICE" = 1 ]; then MANAGE_SERVICE=0; fi

# --- prerequisites -----------------------------------------------------------------------
if [ "$PREFIX_GIVEN" = 0 ] && [ "$(id -u)" != 0 ]; then
    die "must be run as root (it writes /opt/remotellm, /etc/remotellm and a systemd unit); or use --prefix DIR"
fi
if [ "$MANAGE_SERVICE" = 1 ]; then
    [ "$(uname -s)" = Linux ] || die "this is the Linux installer (systemd); on macOS use install-macos.sh"
    command -v systemctl >/dev/null 2>&1 || die "systemctl not found: this installer needs systemd (or pass --no-service)"
    [ -d /run/systemd/system ] || die "systemd is not running on this machine (or pass --no-service)"
fi
if [ "$UNINSTALL" = 0 ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: install Python >= 3.11 (or pass --python PATH)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); remotellm needs >= 3.11 (pass --python PATH)"
    "$PYTHON" -c 'import venv' 2>/dev/null || die "$PYTHON has no venv module (Debian/Ubuntu: apt-get install python3-venv)"
    if [ "$PREFIX_GIVEN" = 0 ]; then
        # The venv links to this interpreter, and the service cannot see /home or /root.
        base="$("$PYTHON" -c 'import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))')"
        case "$base" in
            /home/* | /root/* | /run/user/*)
                die "$PYTHON is $base, in a home directory the service cannot read (ProtectHome=yes): use a system-wide Python >= 3.11 (--python PATH)" ;;
        esac
    fi
    if [ "$SKIP_PIP" = 0 ] && ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
        die "$PYTHON cannot create a venv with pip: no ensurepip module (Debian/Ubuntu: apt-get install python3-venv)"
    fi
    [ -f "$UNIT_SRC" ] || die "$UNIT_SRC is missing: run this script from a remotellm checkout"
fi

WORK="$(mktemp -d)"
trap 'rm -rf -- "$WORK"' EXIT

# --- idempotent file helpers -------------------------------------------------------------
# GNU stat first: BSD stat rejects -c, while GNU stat -f means something else.
file_mode() { stat -c %a -- "$1" 2>/dev/null || stat -f %Lp -- "$1"; }

# ensure_mode PATH MODE: chmod only when the mode differs (a second run touches nothing).
ensure_mode() {
    local want="${2#0}" have
    have="$(file_mode "$1")"
    if [ "${have#0}" != "$want" ]; then
        chmod "$2" -- "$1"
        say "mode $2: $1"
    fi
}

# ensure_dir DIR MODE
ensure_dir() {
    if [ ! -d "$1" ]; then
        mkdir -p -- "$(dirname -- "$1")"
        mkdir -m "$2" -- "$1"
        say "created $1"
    fi
    ensure_mode "$1" "$2"
}

# put_file SRC DST MODE: install or replace DST when its content differs; returns 0 if changed.
put_file() {
    local src="$1" dst="$2" mode="$3" tmp
    if [ -f "$dst" ] && cmp -s -- "$src" "$dst"; then
        ensure_mode "$dst" "$mode"
        return 1
    fi
    tmp="$(dirname -- "$dst")/.$(basename -- "$dst").new"
    (umask 077 && cp -- "$src" "$tmp")
    chmod "$mode" -- "$tmp"
    mv -f -- "$tmp" "$dst"
    say "installed $dst"
    return 0
}

# put_config SRC DST: create a secret file (0600) once; never overwrite an existing one.
put_config() {
    local src="$1" dst="$2"
    if [ -e "$dst" ]; then
        ensure_mode "$dst" 600
        return 0
    fi
    local tmp
    tmp="$(dirname -- "$dst")/.$(basename -- "$dst").new"
    (umask 077 && cp -- "$src" "$tmp")
    chmod 600 -- "$tmp"
    mv -f -- "$tmp" "$dst"
    say "created $dst (mode 0600)"
}

remove_path() {
    if [ -e "$1" ] || [ -L "$1" ]; then
        rm -rf -- "$1"
        say "removed $1"
    fi
}

# env_value FILE KEY: the value of KEY=... in an env file (empty when absent).
env_value() {
    sed -n "s/^[[:space:]]*$2[[:space:]]*=[[:space:]]*//p" -- "$1" 2>/dev/null | tail -n 1 | sed "s/^[\"']//; s/[\"']\$//"
}

check_env_value() {
    case "$2" in
        *[[:space:]\"\'\\\$\`]*) die "$1 may not contain spaces, quotes, backslashes, \$ or backquotes" ;;
    esac
}

# source_fingerprint: a digest of what `pip install REPO` would install (setup files and packages).
source_fingerprint() {
    "$PYTHON" - "$REPO_DIR" <<'PY'
import configparser, hashlib, pathlib, sys

root = pathlib.Path(sys.argv[1])
cfg = configparser.ConfigParser()
cfg.read(root / "setup.cfg")
packages = cfg.get("options", "packages", fallback="").replace(",", " ").split()
digest = hashlib.sha256()
files = [root / name for name in ("setup.cfg", "pyproject.toml", "setup.py", "README.md")]
for package in packages:
    files += sorted(p for p in (root / package).rglob("*") if "__pycache__" not in p.parts)
for path in files:
    if path.is_file() and path.suffix != ".pyc":
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
print(digest.hexdigest())
PY
}

# --- uninstall ---------------------------------------------------------------------------
if [ "$UNINSTALL" = 1 ]; then
    if [ "$MANAGE_SERVICE" = 1 ] && [ -e "$UNIT_DIR/$UNIT" ]; then
        systemctl disable --now "$UNIT" || true
    fi
    remove_path "$UNIT_DIR/$UNIT"
    if [ "$MANAGE_SERVICE" = 1 ]; then
        systemctl daemon-reload
        systemctl reset-failed "$UNIT" 2>/dev/null || true
    fi
    [ "$ROLE" = broker ] && remove_path "$ETC_DIR/connectors.yaml.example"
    if [ -e "$UNIT_DIR/$OTHER_UNIT" ]; then
        say "kept $VENV: $OTHER_UNIT still uses it"
    else
        remove_path "$VENV"
        rmdir -- "$APP_DIR" 2>/dev/null || true
    fi
    for secret in "${SECRETS[@]}"; do
        if [ -e "$secret" ]; then
            if [ "$PURGE" = 1 ]; then remove_path "$secret"; else say "kept $secret (holds secrets; --purge removes it)"; fi
        fi
    done
    rmdir -- "$ETC_DIR" 2>/dev/null || true
    say "uninstalled the $ROLE"
    exit 0
fi

# --- install -----------------------------------------------------------------------------
umask 022 # the venv must be readable by the service's (dynamic) user
UNIT_CHANGED=0
PKG_CHANGED=0

ensure_dir "$APP_DIR" 755
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    venv_args=()
    [ "$SKIP_PIP" = 1 ] && venv_args+=(--without-pip)
    [ -e "$VENV" ] && venv_args+=(--clear)
    "$PYTHON" -m venv "${venv_args[@]}" "$VENV"
    say "created the venv $VENV"
    PKG_CHANGED=1
fi
if [ "$SKIP_PIP" = 1 ]; then
    say "skipped pip install (--no-pip / REMOTELLM_INSTALL_SKIP_PIP)"
else
    fingerprint="$(source_fingerprint)"
    if [ "$(cat -- "$MARKER" 2>/dev/null)" = "$fingerprint" ] && "$VENV/bin/python" -c 'import broker, connector' 2>/dev/null; then
        : # this very source is installed already
    else
        "$VENV/bin/python" -m pip --version >/dev/null 2>&1 || "$VENV/bin/python" -m ensurepip --upgrade >/dev/null
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$REPO_DIR"
        printf '%s\n' "$fingerprint" >"$MARKER"
        say "installed remotellm from $REPO_DIR into $VENV"
        PKG_CHANGED=1
    fi
fi

ensure_dir "$ETC_DIR" 700
if [ "$ROLE" = broker ]; then
    cat >"$WORK/connectors.yaml" <<'EOF'
# remotellm broker: user keys, connector tokens, settings. Created by install-linux.sh, never
# overwritten by it. connectors.yaml.example beside this file explains every key.
# After an edit:
#   /opt/remotellm/venv/bin/python -m broker check-config /etc/remotellm/connectors.yaml
#   systemctl restart remotellm-broker
# `python -m broker hash-key` prints the sha256: form of a key or token.
user_api_keys: []
connectors: []
EOF
    cat >"$WORK/broker.env" <<'EOF'
# remotellm broker environment, read by systemd (as root) for remotellm-broker.service.
# Created by install-linux.sh, never overwritten by it. These win over connectors.yaml.
#REMOTELLM_HOST=0.0.0.0
#REMOTELLM_PORT=8443
#REMOTELLM_USER_API_KEYS=sha256:...,sha256:...
#REMOTELLM_FIRST_BYTE_TIMEOUT=300
#REMOTELLM_IDLE_TIMEOUT=300
#REMOTELLM_LOG_FORMAT=json
# TLS certificate and key: see the comments in remotellm-broker.service (LoadCredential=).
EOF
    put_config "$WORK/connectors.yaml" "$ETC_DIR/connectors.yaml"
    put_config "$WORK/broker.env" "$ETC_DIR/broker.env"
    put_file "$DEPLOY_DIR/connectors.yaml.example" "$ETC_DIR/connectors.yaml.example" 644 || true
else
    if [ ! -e "$ETC_DIR/connector.env" ]; then
        token="${REMOTELLM_CONNECTOR_TOKEN:-}"
        check_env_value REMOTELLM_BROKER_URL "$BROKER_URL"
        check_env_value REMOTELLM_LLM_URL "$LLM_URL"
        check_env_value REMOTELLM_MODELS "$MODELS"
        check_env_value REMOTELLM_CONNECTOR_TOKEN "$token"
        {
            echo "# remotellm connector environment, read by systemd (as root) for remotellm-connector.service."
            echo "# Created by install-linux.sh, never overwritten by it. Holds the connector's token: keep it 0600."
            echo "REMOTELLM_BROKER_URL=$BROKER_URL"
            echo "REMOTELLM_LLM_URL=$LLM_URL"
            echo "REMOTELLM_CONNECTOR_TOKEN=$token"
            if [ -n "$MODELS" ]; then echo "REMOTELLM_MODELS=$MODELS"; else echo "#REMOTELLM_MODELS=llama3,qwen2.5"; fi
            echo "# without REMOTELLM_MODELS, the connector serves what the LLM's GET /v1/models lists"
            echo "#REMOTELLM_HEALTH_PORT=8081"
            echo "#REMOTELLM_CA_CERTS=/etc/ssl/certs/my-ca.pem"
            echo "#HTTPS_PROXY=http://proxy.example.com:3128"
            echo "#NO_PROXY=127.0.0.1,localhost"
        } >"$WORK/connector.env"
        put_config "$WORK/connector.env" "$ETC_DIR/connector.env"
    else
        ensure_mode "$ETC_DIR/connector.env" 600 # kept as it is, but never readable by others
    fi
fi

mkdir -p -- "$UNIT_DIR"
if put_file "$UNIT_SRC" "$UNIT_DIR/$UNIT" 644; then UNIT_CHANGED=1; fi

# --- service -----------------------------------------------------------------------------
READY=1
MISSING=""
if [ "$ROLE" = connector ]; then
    for key in REMOTELLM_BROKER_URL REMOTELLM_LLM_URL REMOTELLM_CONNECTOR_TOKEN; do
        if [ -z "$(env_value "$ETC_DIR/connector.env" "$key")" ]; then
            READY=0
            MISSING="$MISSING $key"
        fi
    done
fi

if [ "$MANAGE_SERVICE" = 1 ]; then
    [ "$UNIT_CHANGED" = 1 ] && systemctl daemon-reload
    systemctl is-enabled --quiet "$UNIT" 2>/dev/null || systemctl enable --quiet "$UNIT"
    if [ "$READY" = 1 ]; then
        if systemctl is-active --quiet "$UNIT"; then
            if [ "$UNIT_CHANGED" = 1 ] || [ "$PKG_CHANGED" = 1 ]; then
                systemctl restart "$UNIT"
                say "restarted $UNIT"
            fi
        else
            systemctl reset-failed "$UNIT" 2>/dev/null || true
            systemctl start "$UNIT"
            say "started $UNIT"
        fi
        say "status: systemctl status $UNIT; logs: journalctl -u $UNIT"
    else
        say "$UNIT is enabled but not started: set$MISSING in $ETC_DIR/connector.env, then: systemctl start $UNIT"
    fi
else
    say "files are in place; no service was installed (--prefix or --no-service)"
fi
if [ "$ROLE" = broker ]; then
    say "add user keys and connectors to $ETC_DIR/connectors.yaml (see connectors.yaml.example), then restart"
fi
