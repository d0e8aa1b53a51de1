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
#
# What it shares with install-macos.sh (options, checks, venv, config files) is in
# install-common.sh beside it; this file has the paths, the root rule and systemd.
set -euo pipefail

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source-path=SCRIPTDIR source=install-common.sh disable=SC1091 # followed with -x
source "$DEPLOY_DIR/install-common.sh"

usage_service_options() {
    cat <<'EOF'
  --prefix DIR        install everything under DIR (a staging or throwaway root): no root
                      needed, no systemctl call; paths inside the unit stay /opt/..., /etc/...
  --no-service        lay out the files but do not call systemctl
EOF
}
usage_uninstall_options() {
    cat <<'EOF'
  --uninstall         stop and remove the service, the unit and the venv; keep secrets
  --purge             with --uninstall: remove the role's config and env files too
EOF
}

parse_args "$@"

# --- layout ------------------------------------------------------------------------------
ROOT="$PREFIX" # "" without --prefix; nothing is created before the prerequisites are checked
APP_DIR="$ROOT/opt/remotellm"
ETC_DIR="$ROOT/etc/remotellm"
UNIT_DIR="$ROOT/etc/systemd/system"
UNIT="remotellm-$ROLE.service"
UNIT_SRC="$DEPLOY_DIR/systemd/$UNIT"
if [ "$ROLE" = broker ]; then OTHER_UNIT="remotellm-connector.service"; else OTHER_UNIT="remotellm-broker.service"; fi
set_layout "$APP_DIR/venv" "$ETC_DIR" "$UNIT_DIR/$OTHER_UNIT"

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
    VENV_HINT=" (Debian/Ubuntu: apt-get install python3-venv)"
    check_python "(or pass --python PATH)" "(pass --python PATH)" "$VENV_HINT"
    if [ "$PREFIX_GIVEN" = 0 ]; then
        # The venv links to this interpreter, and the service cannot see /home or /root.
        base="$("$PYTHON" -c 'import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))')"
        case "$base" in
            /home/* | /root/* | /run/user/*)
                die "$PYTHON is $base, in a home directory the service cannot read (ProtectHome=yes): use a system-wide Python >= 3.11 (--python PATH)" ;;
        esac
    fi
    check_ensurepip "$VENV_HINT"
    [ -f "$UNIT_SRC" ] || die "$UNIT_SRC is missing: run this script from a remotellm checkout"
fi

make_work_dir

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
    remove_installed_files "holds secrets; "
    rmdir -- "$APP_DIR" 2>/dev/null || true
    rmdir -- "$ETC_DIR" 2>/dev/null || true
    say "uninstalled the $ROLE"
    exit 0
fi

# --- install -----------------------------------------------------------------------------
umask 022 # the venv must be readable by the service's (dynamic) user
UNIT_CHANGED=0

ensure_dir "$APP_DIR" 755
install_package

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
else
    cat >"$WORK/connector.env" <<'EOF'
# remotellm connector environment, read by systemd (as root) for remotellm-connector.service.
# Created by install-linux.sh, never overwritten by it. Holds the connector's token: keep it 0600.
EOF
fi
install_config /etc/ssl/certs/my-ca.pem

mkdir -p -- "$UNIT_DIR"
if put_file "$UNIT_SRC" "$UNIT_DIR/$UNIT" 644; then UNIT_CHANGED=1; fi

# --- service -----------------------------------------------------------------------------
MISSING="$(missing_settings)"
if [ "$MANAGE_SERVICE" = 1 ]; then
    [ "$UNIT_CHANGED" = 1 ] && systemctl daemon-reload
    systemctl is-enabled --quiet "$UNIT" 2>/dev/null || systemctl enable --quiet "$UNIT"
    if [ -z "$MISSING" ]; then
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
say_next_step
