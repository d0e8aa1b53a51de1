#!/usr/bin/env bash
# Sets up and runs the whole test suite: Python 3.11, 3.12 and 3.13 (those present), ruff, mypy.
# Run as root on a Debian machine, it first installs the real components the tests drive.
set -euo pipefail
cd "$(dirname "$0")"

# What the tests start and drive for real (proxies, nginx, redis-server, PostgreSQL, and
# Chromium for the console), from Debian's packages: the one list, which .ci/run uses too.
apt_packages=(squid tinyproxy nginx systemd shellcheck redis-server postgresql chromium chromium-driver)

install_missing_packages() {
    command -v dpkg >/dev/null 2>&1 || return 0 # not Debian: the tests name what is missing
    local missing=() package
    for package in "${apt_packages[@]}"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    [ "${#missing[@]}" -gt 0 ] || return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "test.sh: not installed: ${missing[*]} (run as root, or apt-get install them): their tests fail" >&2
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Installing a server may start it as a service: the tests start their own, on free ports.
    for package in "${missing[@]}"; do
        service "$package" stop >/dev/null 2>&1 || true
    done
}

install_missing_packages
if command -v pyenv >/dev/null 2>&1; then
    # tox cannot see pyenv's non-global versions through its shims: put their bin dirs on PATH.
    for minor in 3.13 3.12 3.11; do
        version="$(pyenv versions --bare | grep -E "^${minor//./\\.}\.[0-9]+$" | tail -n 1 || true)"
        if [ -n "$version" ]; then PATH="$(pyenv root)/versions/$version/bin:$PATH"; fi
    done
    export PATH
fi
python3 -m pip install -q --disable-pip-version-check tox
python3 -m tox "$@"
