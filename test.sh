#!/usr/bin/env bash
# Sets up and runs the whole test suite: Python 3.11, 3.12 and 3.13 (those present), ruff, mypy.
set -euo pipefail
cd "$(dirname "$0")"
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
