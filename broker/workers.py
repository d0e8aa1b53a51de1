"""``python -m broker --workers N``: N broker processes serving one port, supervised.

Each worker binds the port itself with SO_REUSEPORT, so the kernel spreads connections
among them; each is a broker with its own id (broker.identity), and lists its siblings to
connectors, which hold a session to every one (wire.BROKER_HEADER pins each request to its
worker). The parent restarts a worker that dies, and passes SIGTERM on for a graceful drain.
"""

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

from broker import logs
from broker.identity import WORKER_ENV, worker_value

log = logging.getLogger("remotellm.workers")

RESTART_PAUSE = 1.0  # between a worker's death and its restart
EARLY_EXIT = 5.0  # a worker that dies this soon after its start did not come up
MAX_EARLY_EXITS = 5  # in a row: the port is taken, or the like; the parent gives up
WATCH_INTERVAL = 0.2


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A socket bound to the port that sibling workers bind too (the kernel balances them)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host.strip("[]"), port))
    return sock


class _Stop:
    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def supervise(argv: list[str], count: int, stop_timeout: float) -> int:
    """Run ``count`` workers of ``python -m broker argv`` until SIGTERM or SIGINT."""
    logs.setup()
    base = secrets.token_hex(4)
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def start(index: int) -> tuple[subprocess.Popen[bytes], float]:
        env_value = worker_value(base, index, count)
        proc = subprocess.Popen([sys.executable, "-m", "broker", *argv], env={**os.environ, WORKER_ENV: env_value})
        log.info("worker %s-%d started (pid %d)", base, index, proc.pid)
        return proc, time.monotonic()

    workers = [start(i) for i in range(count)]
    early_exits = 0
    gave_up = False
    while not stop.requested:
        time.sleep(WATCH_INTERVAL)
        for index, (proc, started) in enumerate(workers):
            if proc.poll() is None or stop.requested:
                continue
            log.warning("worker %s-%d exited with %s: restarting it", base, index, proc.returncode)
            early_exits = early_exits + 1 if time.monotonic() - started < EARLY_EXIT else 0
            if early_exits >= MAX_EARLY_EXITS:
                log.error("workers keep dying at start: giving up")
                stop.requested = gave_up = True
                break
            time.sleep(RESTART_PAUSE)
            workers[index] = start(index)
    _stop_all([proc for proc, _ in workers], stop_timeout)
    return 1 if gave_up else 0


def _stop_all(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """SIGTERM to each (each drains), SIGKILL to those still there after ``timeout``."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
