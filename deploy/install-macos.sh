#!/usr/bin/env bash
# Installs (or removes) the remotellm broker or connector as a per-user launchd agent (macOS).
# Run it as the user the service runs as (not root); no sudo needed.
#
#   deploy/install-macos.sh --role broker
#   REMOTELLM_CONNECTOR_TOKEN=... deploy/install-macos.sh --role connector \
#        --broker-url https://broker.example.com:8443 --llm-url http://127.0.0.1:11434
#   deploy/install-macos.sh --role connector --uninstall [--purge]
#
# Layout (HOME is --prefix DIR when given):
#   ~/Library/Application Support/remotellm/      0700
#     venv/                                       virtualenv with remotellm (pip install of this repo)
#     connectors.yaml, broker.env                 0600, broker role: secrets, never overwritten
#     connectors.yaml.example                     broker role: every key explained
#     connector.env                               0600, connector role: secrets, never overwritten
#   ~/Library/LaunchAgents/com.remotellm.ROLE.plist   0600: made from deploy/launchd/ and the
#                                                 role's .env file (launchd reads no env file)
#   ~/Library/Logs/remotellm/ROLE.log             0700 dir, 0600 log
#
# Running it again changes nothing, unless this repo's code, the plist template or the .env
# file changed (then the package is reinstalled or the plist rewritten, and the agent restarted).
set -euo pipefail

PROG="$(basename "$0")"
DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_DIR="$(dirname "$DEPLOY_DIR")"

usage() {
    cat <<EOF
usage: $PROG --role broker|connector [options]

  --role ROLE         broker or connector (required)
  --prefix DIR        install as if DIR were the home directory (a throwaway root):
                      nothing outside DIR is touched and launchctl is not called
  --no-service        lay out the files but do not call launchctl
  --no-pip            skip the pip install into the venv (also REMOTELLM_INSTALL_SKIP_PIP=1)
  --python PATH       the Python (>= 3.11) that creates the venv (default: python3, or \$PYTHON)
  --uninstall         unload and remove the agent, its plist and the venv; keep secrets and logs
  --purge             with --uninstall: remove the role's config, env and log files too
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
# nothing is created before the prerequisites are checked
if [ "$PREFIX_GIVEN" = 1 ]; then
    [ -n "$PREFIX" ] || die "--prefix needs a directory"
    case "$PREFIX" in /*) HOME_DIR="$PREFIX" ;; *) HOME_DIR="$PWD/$PREFIX" ;; esac
    while [ "${HOME_DIR%/}" != "$HOME_DIR" ]; do HOME_DIR="${HOME_DIR%/}"; done
    [ -n "$HOME_DIR" ] || die "--prefix / makes no sense for a per-user install"
else
    if [ -z "${HOME:-}" ] || [ ! -d "$HOME" ]; then die "HOME is not set to a directory"; fi
    HOME_DIR="$HOME"
fi
LABEL="com.remotellm.$ROLE"
APP_DIR="$HOME_DIR/Library/Application Support/remotellm"
VENV="$APP_DIR/venv"
LOG_DIR="$HOME_DIR/Library/Logs/remotellm"
LOG_FILE="$LOG_DIR/$ROLE.log"
AGENT_DIR="$HOME_DIR/Library/LaunchAgents"
PLIST="$AGENT_DIR/$LABEL.plist"
PLIST_SRC="$DEPLOY_DIR/launchd/$LABEL.plist"
ENV_FILE="$APP_DIR/$ROLE.env"
MARKER="$VENV/.remotellm-source"
if [ "$ROLE" = broker ]; then
    SECRETS=("$APP_DIR/connectors.yaml" "$APP_DIR/broker.env")
    OTHER_PLIST="$AGENT_DIR/com.remotellm.connector.plist"
else
    SECRETS=("$APP_DIR/connector.env")
    OTHER_PLIST="$AGENT_DIR/com.remotellm.broker.plist"
fi
MANAGE_SERVICE=1
if [ "$PREFIX_GIVEN" = 1 ] || [ "$NO_SERVICE" = 1 ]; then MANAGE_SERVICE=0; fi

# --- prerequisites -----------------------------------------------------------------------
if [ "$PREFIX_GIVEN" = 0 ] && [ "$(id -u)" = 0 ]; then
    die "run this as the user the service should run as, not as root: it installs a LaunchAgent in that user's ~/Library (or use --prefix DIR)"
fi
if [ "$MANAGE_SERVICE" = 1 ]; then
    [ "$(uname -s)" = Darwin ] || die "this is the macOS installer (launchd); on Linux use install-linux.sh"
    command -v launchctl >/dev/null 2>&1 || die "launchctl not found (or pass --no-service)"
fi
if [ "$UNINSTALL" = 0 ]; then
    command -v "$PYTHON" >/dev/null 2>&1 ||
        die "$PYTHON not found: install Python >= 3.11 (python.org or Homebrew), or pass --python PATH"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); remotellm needs >= 3.11 (python.org or Homebrew; pass --python PATH)"
    "$PYTHON" -c 'import venv' 2>/dev/null || die "$PYTHON has no venv module"
    if [ "$SKIP_PIP" = 0 ] && ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
        die "$PYTHON cannot create a venv with pip: no ensurepip module"
    fi
    [ -f "$PLIST_SRC" ] || die "$PLIST_SRC is missing: run this script from a remotellm checkout"
fi

WORK="$(mktemp -d)"
trap 'rm -rf -- "$WORK"' EXIT

# --- idempotent file helpers -------------------------------------------------------------
# GNU stat first: BSD stat rejects -c, while GNU stat -f means something else.
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

# render_plist OUT: the template with @HOME@ filled in and the .env file's variables added.
render_plist() {
    "$PYTHON" - "$PLIST_SRC" "$HOME_DIR" "$ENV_FILE" >"$1" <<'PY'
import plistlib, sys

template, home, env_file = sys.argv[1:4]
with open(template, "rb") as f:
    plist = plistlib.load(f)


def fill(value):
    if isinstance(value, str):
        return value.replace("@HOME@", home)
    if isinstance(value, list):
        return [fill(v) for v in value]
    if isinstance(value, dict):
        return {k: fill(v) for k, v in value.items()}
    return value


plist = fill(plist)
env = plist.setdefault("EnvironmentVariables", {})
with open(env_file) as f:
    for line in f:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if key.startswith("export "):
            key = key[len("export ") :].strip()
        if value:
            env[key] = value
sys.stdout.buffer.write(plistlib.dumps(plist))
PY
}

DOMAIN="gui/$(id -u)"
agent_loaded() { launchctl print "$DOMAIN/$LABEL" >/dev/null 2>&1; }
agent_unload() {
    local _
    launchctl bootout "$DOMAIN/$LABEL" 2>/dev/null || true
    for _ in $(seq 50); do # bootout returns before the job is gone
        agent_loaded || return 0
        sleep 0.1
    done
    die "launchctl could not unload $LABEL (try: launchctl bootout $DOMAIN/$LABEL)"
}

# --- uninstall ---------------------------------------------------------------------------
if [ "$UNINSTALL" = 1 ]; then
    if [ "$MANAGE_SERVICE" = 1 ] && agent_loaded; then
        agent_unload
        say "unloaded $LABEL"
    fi
    remove_path "$PLIST"
    [ "$ROLE" = broker ] && remove_path "$APP_DIR/connectors.yaml.example"
    if [ -e "$OTHER_PLIST" ]; then
        say "kept $VENV: $(basename -- "$OTHER_PLIST") still uses it"
    else
        remove_path "$VENV"
    fi
    for kept in "${SECRETS[@]}" "$LOG_FILE"; do
        if [ -e "$kept" ]; then
            if [ "$PURGE" = 1 ]; then remove_path "$kept"; else say "kept $kept (--purge removes it)"; fi
        fi
    done
    rmdir -- "$APP_DIR" 2>/dev/null || true
    rmdir -- "$LOG_DIR" 2>/dev/null || true
    say "uninstalled the $ROLE"
    exit 0
fi

# --- install -----------------------------------------------------------------------------
PLIST_CHANGED=0
PKG_CHANGED=0

ensure_dir "$APP_DIR" 700
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

if [ "$ROLE" = broker ]; then
    cat >"$WORK/connectors.yaml" <<'EOF'
# remotellm broker: user keys, connector tokens, settings. Created by install-macos.sh, never
# overwritten by it. connectors.yaml.example beside this file explains every key.
# After an edit, check it and restart the agent:
#   venv/bin/python -m broker check-config connectors.yaml
#   launchctl kickstart -k gui/$(id -u)/com.remotellm.broker
# `venv/bin/python -m broker hash-key` prints the sha256: form of a key or token.
user_api_keys: []
connectors: []
EOF
    cat >"$WORK/broker.env" <<'EOF'
# remotellm broker environment: install-macos.sh copies these variables into the agent's
# plist (launchd reads no env file), so run it again after an edit. They win over
# connectors.yaml. Created by install-macos.sh, never overwritten by it.
#REMOTELLM_HOST=0.0.0.0
#REMOTELLM_PORT=8443
#REMOTELLM_FIRST_BYTE_TIMEOUT=300
#REMOTELLM_IDLE_TIMEOUT=300
#REMOTELLM_LOG_FORMAT=json
#REMOTELLM_CERTFILE=/path/to/cert.pem
#REMOTELLM_KEYFILE=/path/to/key.pem
EOF
    put_config "$WORK/connectors.yaml" "$APP_DIR/connectors.yaml"
    put_config "$WORK/broker.env" "$APP_DIR/broker.env"
    put_file "$DEPLOY_DIR/connectors.yaml.example" "$APP_DIR/connectors.yaml.example" 644 || true
else
    if [ ! -e "$ENV_FILE" ]; then
        token="${REMOTELLM_CONNECTOR_TOKEN:-}"
        check_env_value REMOTELLM_BROKER_URL "$BROKER_URL"
        check_env_value REMOTELLM_LLM_URL "$LLM_URL"
        check_env_value REMOTELLM_MODELS "$MODELS"
        check_env_value REMOTELLM_CONNECTOR_TOKEN "$token"
        {
            echo "# remotellm connector environment: install-macos.sh copies these variables into the"
            echo "# agent's plist (launchd reads no env file), so run it again after an edit."
            echo "# Created by install-macos.sh, never overwritten by it. Holds the connector's token: keep it 0600."
            echo "REMOTELLM_BROKER_URL=$BROKER_URL"
            echo "REMOTELLM_LLM_URL=$LLM_URL"
            echo "REMOTELLM_CONNECTOR_TOKEN=$token"
            if [ -n "$MODELS" ]; then echo "REMOTELLM_MODELS=$MODELS"; else echo "#REMOTELLM_MODELS=llama3,qwen2.5"; fi
            echo "# without REMOTELLM_MODELS, the connector serves what the LLM's GET /v1/models lists"
            echo "#REMOTELLM_HEALTH_PORT=8081"
            echo "#REMOTELLM_CA_CERTS=/path/to/my-ca.pem"
            echo "#HTTPS_PROXY=http://proxy.example.com:3128"
            echo "#NO_PROXY=127.0.0.1,localhost"
        } >"$WORK/connector.env"
        put_config "$WORK/connector.env" "$ENV_FILE"
    else
        ensure_mode "$ENV_FILE" 600 # kept as it is, but never readable by others
    fi
fi

ensure_dir "$LOG_DIR" 700
if [ ! -e "$LOG_FILE" ]; then
    (umask 077 && : >"$LOG_FILE")
    say "created $LOG_FILE"
fi
ensure_mode "$LOG_FILE" 600

[ -d "$AGENT_DIR" ] || ensure_dir "$AGENT_DIR" 755
render_plist "$WORK/$LABEL.plist"
if put_file "$WORK/$LABEL.plist" "$PLIST" 600; then PLIST_CHANGED=1; fi

# --- service -----------------------------------------------------------------------------
READY=1
MISSING=""
if [ "$ROLE" = connector ]; then
    for key in REMOTELLM_BROKER_URL REMOTELLM_LLM_URL REMOTELLM_CONNECTOR_TOKEN; do
        if [ -z "$(env_value "$ENV_FILE" "$key")" ]; then
            READY=0
            MISSING="$MISSING $key"
        fi
    done
fi

if [ "$MANAGE_SERVICE" = 1 ]; then
    if [ "$READY" = 1 ]; then
        if agent_loaded && [ "$PLIST_CHANGED" = 1 ]; then
            agent_unload
        fi
        if ! agent_loaded; then
            launchctl enable "$DOMAIN/$LABEL"
            launchctl bootstrap "$DOMAIN" "$PLIST"
            say "loaded $LABEL"
        elif [ "$PKG_CHANGED" = 1 ]; then
            launchctl kickstart -k "$DOMAIN/$LABEL"
            say "restarted $LABEL"
        fi
        say "status: launchctl print $DOMAIN/$LABEL; logs: $LOG_FILE"
    else
        if agent_loaded; then agent_unload; fi
        say "$LABEL is installed but not loaded: set$MISSING in $ENV_FILE, then run $PROG again"
    fi
else
    say "files are in place; launchctl was not called (--prefix or --no-service)"
fi
if [ "$ROLE" = broker ]; then
    say "add user keys and connectors to $APP_DIR/connectors.yaml (see connectors.yaml.example), then restart"
fi
