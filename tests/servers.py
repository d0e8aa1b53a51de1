"""Real redis-server for the tests, on free ports, killed by PID.

It comes from Debian's package ``redis-server``, which ``./test.sh`` installs. A missing
binary is a set-up bug, so it fails the test with the package to install rather than
skipping it.
"""

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.proxies import accepting, find_binary
from tests.support import Proc, Stack, free_port, wait_until

START_TIMEOUT = 30.0


def require(path: str | None, what: str, package: str) -> str:
    if path is None:
        pytest.fail(f"{what} is not installed: apt-get install {package} (./test.sh does it as root)", pytrace=False)
    return path


@dataclass
class RedisServer:
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def start_redis(stack: Stack, workdir: Path, port: int | None = None) -> RedisServer:
    """A redis-server that saves nothing to disk; ``port``: a given one (a restart)."""
    binary = require(find_binary("redis-server"), "redis-server", "redis-server")
    port = port or free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = stack.spawn("redis", [*args, "--dir", str(workdir)])
    wait_until(lambda: _serving(proc, port), timeout=START_TIMEOUT, what="redis-server to accept connections")
    return RedisServer(proc, port)


def _serving(proc: Proc, port: int) -> bool:
    assert proc.alive, f"the server exited:\n{proc.log()[-3000:]}"
    return accepting(port)
