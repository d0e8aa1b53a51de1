#!/usr/bin/env bash
# Sets up and runs the whole test suite: Python 3.11, 3.12 and 3.13 (those present), ruff, mypy.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q --disable-pip-version-check tox
python3 -m tox "$@"
