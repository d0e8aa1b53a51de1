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
#
# What it shares with install-linux.sh (options, checks, venv, config files) is in
# install-common.sh beside it; this file has the paths, the user rule and launchd.
set -euo pipefail

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source-path=SCRIPTDIR source=install-common.sh disable=SC1091 # followed with -x
source "$DEPLOY_DIR/install-common.sh"

usage_service_options() {
    cat <<'EOF'
  --prefix DIR        install as if DIR were the home directory (a throwaway root):
                      nothing outside DIR is touched and launchctl is not called
  --no-service        lay out the files but do not call launchctl
EOF
}
usage_uninstall_options() {
    cat <<'EOF'
  --uninstall         unload and remove the agent, its plist and the venv; keep secrets and logs
  --purge             with --uninstall: remove the role's config, env and log files too
EOF
}

parse_args "$@"

# --- layout ------------------------------------------------------------------------------
# nothing is created before the prerequisites are checked
if [ "$PREFIX_GIVEN" = 1 ]; then
    [ -n "$PREFIX" ] || die "--prefix / makes no sense for a per-user install"
    HOME_DIR="$PREFIX"
else
    if [ -z "${HOME:-}" ] || [ ! -d "$HOME" ]; then die "HOME is not set to a directory"; fi
    HOME_DIR="$HOME"
fi
LABEL="com.remotellm.$ROLE"
APP_DIR="$HOME_DIR/Library/Application Support/remotellm"
LOG_DIR="$HOME_DIR/Library/Logs/remotellm"
LOG_FILE="$LOG_DIR/$ROLE.log"
AGENT_DIR="$HOME_DIR/Library/LaunchAgents"
PLIST="$AGENT_DIR/$LABEL.plist"
PLIST_SRC="$DEPLOY_DIR/launchd/$LABEL.plist"
ENV_FILE="$APP_DIR/$ROLE.env"
if [ "$ROLE" = broker ]; then OTHER_LABEL="com.remotellm.connector"; else OTHER_LABEL="com.remotellm.broker"; fi
set_layout "$APP_DIR/venv" "$APP_DIR" "$AGENT_DIR/$OTHER_LABEL.plist"

# --- prerequisites -----------------------------------------------------------------------
if [ "$PREFIX_GIVEN" = 0 ] && [ "$(id -u)" = 0 ]; then
    die "run this as the user the service should run as, not as root: it installs a LaunchAgent in that user's ~/Library (or use --prefix DIR)"
fi
if [ "$MANAGE_SERVICE" = 1 ]; then
    [ "$(uname -s)" = Darwin ] || die "this is the macOS installer (launchd); on Linux use install-linux.sh"
    command -v launchctl >/dev/null 2>&1 || die "launchctl not found (or pass --no-service)"
fi
if [ "$UNINSTALL" = 0 ]; then
    check_python "(python.org or Homebrew), or pass --python PATH" "(python.org or Homebrew; pass --python PATH)" ""
    check_ensurepip ""
    [ -f "$PLIST_SRC" ] || die "$PLIST_SRC is missing: run this script from a remotellm checkout"
fi

make_work_dir

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
    remove_installed_files "" "$LOG_FILE"
    rmdir -- "$APP_DIR" 2>/dev/null || true
    rmdir -- "$LOG_DIR" 2>/dev/null || true
    say "uninstalled the $ROLE"
    exit 0
fi

# --- install -----------------------------------------------------------------------------
PLIST_CHANGED=0

ensure_dir "$APP_DIR" 700
install_package

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
else
    cat >"$WORK/connector.env" <<'EOF'
# remotellm connector environment: install-macos.sh copies these variables into the
# agent's plist (launchd reads no env file), so run it again after an edit.
# Created by install-macos.sh, never overwritten by it. Holds the connector's token: keep it 0600.
EOF
fi
install_config /path/to/my-ca.pem

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
MISSING="$(missing_settings)"
if [ "$MANAGE_SERVICE" = 1 ]; then
    if [ -z "$MISSING" ]; then
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
say_next_step
