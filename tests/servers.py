"""Real redis-server and PostgreSQL for the tests, on free ports, killed by PID.

Both come from Debian's packages (``redis-server``, ``postgresql``), which ``./test.sh``
installs. A missing binary is a set-up bug, so it fails the test with the package to install
rather than skipping it.
"""

import contextlib
import os
import pwd
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.proxies import accepting, find_binary
from tests.support import Proc, Stack, free_port, wait_until

START_TIMEOUT = 30.0
# Debian keeps PostgreSQL's server binaries out of the PATH, one directory per major version.
POSTGRES_BIN_DIRS = "/usr/lib/postgresql/*/bin"
# initdb and postgres refuse to run as root: as root they run as the package's own user.
POSTGRES_USER = "postgres"
READY = "database system is ready to accept connections"


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


def postgres_binary(name: str) -> str:
    """The newest installed major version's ``name`` (initdb, postgres)."""
    found = sorted(Path("/").glob(POSTGRES_BIN_DIRS.lstrip("/") + f"/{name}"), key=lambda p: int(p.parts[-3]))
    on_path = find_binary(name)
    return require(str(found[-1]) if found else on_path, name, "postgresql")


@dataclass
class PostgresServer:
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://{POSTGRES_USER}@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        """A fast shutdown (SIGINT), so that no shared memory is left behind; SIGKILL if it hangs."""
        self.proc.signal(signal.SIGINT)
        with contextlib.suppress(Exception):
            self.proc.popen.wait(10)
        self.proc.kill()


def _as_postgres_user(args: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return args
    return [require(find_binary("runuser"), "runuser", "util-linux"), "-u", POSTGRES_USER, "--", *args]


@contextlib.contextmanager
def postgres_workdir() -> Iterator[Path]:
    """Outside pytest's tmp tree on purpose: as root the server runs as ``postgres``, which
    must own its data directory (pytest's directories are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="remotellm-postgres-"))
    try:
        if os.geteuid() == 0:
            user = pwd.getpwnam(POSTGRES_USER)
            os.chown(path, user.pw_uid, user.pw_gid)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_postgres(stack: Stack, workdir: Path, port: int | None = None) -> PostgresServer:
    """A server trusting local connections, tuned for tests (no fsync: a crash of the test
    machine loses a test database, nothing else); ``initdb`` into ``workdir`` the first time.
    ``port``: a given one (a restart)."""
    data = workdir / "data"
    if not data.exists():
        initdb = [postgres_binary("initdb"), "-D", str(data), "-A", "trust", "-U", POSTGRES_USER]
        init = stack.spawn("initdb", _as_postgres_user([*initdb, "--encoding=UTF8", "--locale=C", "--no-sync"]))
        exit_code = init.popen.wait(START_TIMEOUT)
        assert exit_code == 0, f"initdb failed:\n{init.log()}"
    port = port or free_port()
    server = [postgres_binary("postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", str(workdir)]
    tuning = ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
    proc = stack.spawn("postgres", _as_postgres_user([*server, *tuning]))
    # Its port accepts before it serves ("starting up"): its log says when it is ready.
    wait_until(lambda: _serving(proc, port) and READY in proc.log(), timeout=START_TIMEOUT, what="postgres to serve")
    return PostgresServer(proc, port)
