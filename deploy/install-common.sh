#!/usr/bin/env bash
# What install-linux.sh and install-macos.sh share; they source it from their own directory
# (DEPLOY_DIR, which they set first), so it works from any working directory. Run on its own,
# it only says so and fails.
#
# It holds the argument parsing, the Python checks, the venv with its source-hash idempotency,
# the config and env files with safe modes, the write-if-changed file helpers and what
# --uninstall removes besides the service. The platform script keeps its paths, its root
# rule, its config comments and its service manager (systemd or launchd), and goes:
#
#   usage_service_options, usage_uninstall_options   its own lines of --help (functions)
#   parse_args "$@"                                  ROLE, PREFIX, PYTHON, ... (below)
#   its layout, then set_layout VENV CONF_DIR OTHER_SERVICE
#   its checks, with check_python and check_ensurepip
#   make_work_dir
#   --uninstall: its service away, remove_installed_files, its directories
#   install: install_package, its config comments into WORK, install_config, its service
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    echo "$(basename "$0"): sourced by install-linux.sh and install-macos.sh; run one of those" >&2
    exit 1
fi

PROG="$(basename "$0")"
REPO_DIR="$(dirname "$DEPLOY_DIR")"

usage() {
    cat <<EOF
usage: $PROG --role broker|connector [options]

  --role ROLE         broker or connector (required)
$(usage_service_options)
  --no-pip            skip the pip install into the venv (also REMOTELLM_INSTALL_SKIP_PIP=1)
  --python PATH       the Python (>= 3.11) that creates the venv (default: python3, or \$PYTHON)
$(usage_uninstall_options)
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

need_arg() { if [ "$#" -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value (see --help)"; fi; }

# parse_args "$@": the options (and their REMOTELLM_* defaults) into ROLE, PREFIX, PREFIX_GIVEN,
# UNINSTALL, PURGE, NO_SERVICE, SKIP_PIP, PYTHON, BROKER_URL, LLM_URL and MODELS; dies on a bad
# one. A given PREFIX comes out absolute, without trailing slashes ("" for --prefix /).
parse_args() {
    local flag_models=""
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
            --model) need_arg "$@"; flag_models="${flag_models:+$flag_models,}$2"; shift 2 ;;
            --model=*) flag_models="${flag_models:+$flag_models,}${1#*=}"; shift ;;
            --uninstall) UNINSTALL=1; shift ;;
            --purge) PURGE=1; shift ;;
            --no-service) NO_SERVICE=1; shift ;;
            --no-pip) SKIP_PIP=1; shift ;;
            -h | --help) usage; exit 0 ;;
            *) usage >&2; die "unknown argument: $1" ;;
        esac
    done
    if [ -n "$flag_models" ]; then MODELS="$flag_models"; fi

    case "$ROLE" in
        broker | connector) ;;
        "") die "--role broker|connector is required" ;;
        *) die "--role must be broker or connector, not '$ROLE'" ;;
    esac
    if [ "$PURGE" = 1 ] && [ "$UNINSTALL" = 0 ]; then die "--purge goes with --uninstall"; fi

    if [ "$PREFIX_GIVEN" = 1 ]; then
        [ -n "$PREFIX" ] || die "--prefix needs a directory"
        case "$PREFIX" in /*) ;; *) PREFIX="$PWD/$PREFIX" ;; esac
        while [ "${PREFIX%/}" != "$PREFIX" ]; do PREFIX="${PREFIX%/}"; done
    fi
}

# set_layout VENV CONF_DIR OTHER_SERVICE: where the shared steps work. CONF_DIR holds the role's
# config and env files (SECRETS); OTHER_SERVICE is the other role's unit or plist, which keeps
# the shared venv on --uninstall while it is there. MANAGE_SERVICE=0: --prefix or --no-service.
# shellcheck disable=SC2034 # MANAGE_SERVICE is for the platform script: whether it calls systemctl/launchctl
set_layout() {
    VENV="$1"
    CONF_DIR="$2"
    OTHER_SERVICE="$3"
    MARKER="$VENV/.remotellm-source"
    if [ "$ROLE" = broker ]; then
        SECRETS=("$CONF_DIR/connectors.yaml" "$CONF_DIR/broker.env")
    else
        SECRETS=("$CONF_DIR/connector.env")
    fi
    MANAGE_SERVICE=1
    if [ "$PREFIX_GIVEN" = 1 ] || [ "$NO_SERVICE" = 1 ]; then MANAGE_SERVICE=0; fi
}

# --- prerequisites -----------------------------------------------------------------------
# check_python NOT_FOUND_HINT VERSION_HINT VENV_HINT: PYTHON runs, is >= 3.11 and has venv, or
# die with the platform's hint (where to get a Python, which package brings venv).
check_python() {
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: install Python >= 3.11 $1"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); remotellm needs >= 3.11 $2"
    "$PYTHON" -c 'import venv' 2>/dev/null || die "$PYTHON has no venv module$3"
}

# check_ensurepip VENV_HINT: unless the pip step is skipped, PYTHON can make a venv with pip.
check_ensurepip() {
    if [ "$SKIP_PIP" = 0 ] && ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
        die "$PYTHON cannot create a venv with pip: no ensurepip module$1"
    fi
}

# make_work_dir: WORK, a scratch directory removed on exit.
make_work_dir() {
    WORK="$(mktemp -d)"
    trap 'rm -rf -- "$WORK"' EXIT
}

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
# remove_installed_files NOTE [FILE...]: once the service is gone, remove the broker's example
# config and the venv (unless OTHER_SERVICE still uses it); the SECRETS and FILE... go with
# --purge only, and NOTE heads the "--purge removes it" of the message about a kept one.
remove_installed_files() {
    local note="$1" kept
    shift
    if [ "$ROLE" = broker ]; then remove_path "$CONF_DIR/connectors.yaml.example"; fi
    if [ -e "$OTHER_SERVICE" ]; then
        say "kept $VENV: $(basename -- "$OTHER_SERVICE") still uses it"
    else
        remove_path "$VENV"
    fi
    for kept in "${SECRETS[@]}" "$@"; do
        if [ -e "$kept" ]; then
            if [ "$PURGE" = 1 ]; then remove_path "$kept"; else say "kept $kept (${note}--purge removes it)"; fi
        fi
    done
}

# --- install -----------------------------------------------------------------------------
# install_package: the venv (made again unless it runs a Python >= 3.11), and remotellm
# pip-installed into it from this checkout unless the fingerprint in MARKER shows this very
# source is there already. PKG_CHANGED=1 when either changed.
# shellcheck disable=SC2034 # PKG_CHANGED is for the platform script: it restarts the service
install_package() {
    local venv_args fingerprint
    PKG_CHANGED=0
    if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        venv_args=()
        [ "$SKIP_PIP" = 1 ] && venv_args+=(--without-pip)
        [ -e "$VENV" ] && venv_args+=(--clear)
        # ${a[@]+...}: bash 3.2 (macOS) calls an empty array unbound under set -u.
        "$PYTHON" -m venv ${venv_args[@]+"${venv_args[@]}"} "$VENV"
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
}

# install_config CA_CERTS_EXAMPLE: the role's files in CONF_DIR, each created once (0600) and
# never overwritten; an existing one only gets its mode fixed. The platform script has put its
# text of connectors.yaml and broker.env (broker) or the comment heading connector.env
# (connector) in WORK; connector.env gets the flags and REMOTELLM_* settings below that.
install_config() {
    local token
    if [ "$ROLE" = broker ]; then
        put_config "$WORK/connectors.yaml" "$CONF_DIR/connectors.yaml"
        put_config "$WORK/broker.env" "$CONF_DIR/broker.env"
        put_file "$DEPLOY_DIR/connectors.yaml.example" "$CONF_DIR/connectors.yaml.example" 644 || true
    elif [ ! -e "$CONF_DIR/connector.env" ]; then
        token="${REMOTELLM_CONNECTOR_TOKEN:-}"
        check_env_value REMOTELLM_BROKER_URL "$BROKER_URL"
        check_env_value REMOTELLM_LLM_URL "$LLM_URL"
        check_env_value REMOTELLM_MODELS "$MODELS"
        check_env_value REMOTELLM_CONNECTOR_TOKEN "$token"
        {
            echo "REMOTELLM_BROKER_URL=$BROKER_URL"
            echo "REMOTELLM_LLM_URL=$LLM_URL"
            echo "REMOTELLM_CONNECTOR_TOKEN=$token"
            if [ -n "$MODELS" ]; then echo "REMOTELLM_MODELS=$MODELS"; else echo "#REMOTELLM_MODELS=llama3,qwen2.5"; fi
            echo "# without REMOTELLM_MODELS, the connector serves what the LLM's GET /v1/models lists"
            echo "#REMOTELLM_HEALTH_PORT=8081"
            echo "#REMOTELLM_CA_CERTS=$1"
            echo "#HTTPS_PROXY=http://proxy.example.com:3128"
            echo "#NO_PROXY=127.0.0.1,localhost"
        } >>"$WORK/connector.env"
        put_config "$WORK/connector.env" "$CONF_DIR/connector.env"
    else
        ensure_mode "$CONF_DIR/connector.env" 600 # kept as it is, but never readable by others
    fi
}

# missing_settings: for the connector, the settings its connector.env leaves empty (each after
# a space), without which it cannot start; nothing for the broker.
missing_settings() {
    local key
    if [ "$ROLE" = connector ]; then
        for key in REMOTELLM_BROKER_URL REMOTELLM_LLM_URL REMOTELLM_CONNECTOR_TOKEN; do
            if [ -z "$(env_value "$CONF_DIR/connector.env" "$key")" ]; then printf ' %s' "$key"; fi
        done
    fi
}

say_next_step() {
    if [ "$ROLE" = broker ]; then
        say "add user keys and connectors to $CONF_DIR/connectors.yaml (see connectors.yaml.example), then restart"
    fi
}
