"""Real processes on real sockets for the tests: start them, wait for them, kill them by PID.

Every process runs in its own session (process group), so a kill also takes the
children hypercorn forks; every wait here has a bound.
"""

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

from fakellm.common import spaced
from fakellm.openai_api import StreamOptions, _events

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metric(text: str, name: str, default: float | None = None, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``, in a /metrics text
    (parsed by prometheus_client's own parser); ``default`` if there is none, else an assertion."""
    values = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]
    if not values:
        assert default is not None, f"no {name} {labels} in /metrics"
        return default
    return sum(values)


def tunnel_polls(metrics: str, connector: str) -> int:
    """The polls a connector's tunnel has opened, from the broker's /metrics text."""
    return int(metric(metrics, "remotellm_tunnel_polls_total", connector=connector))


def rss_kib(pid: int) -> int:
    """A process's resident memory, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fake_state(llm: str) -> dict[str, Any]:
    """The fake LLM's counters (requests, streams, cancels...) and its last requests."""
    state: dict[str, Any] = httpx.get(llm + "/_fake/state", timeout=5).json()
    return state


def expected_stream(received: bytes, chunks: int) -> bytes:
    """What the fake LLM sent, byte for byte (its id and clock read from the first event)."""
    first = json.loads(received.split(b"\n\n", 1)[0].removeprefix(b"data: "))
    head = {key: first[key] for key in ("id", "object", "created", "model")}
    pieces = spaced([f"tok{i}" for i in range(chunks)])
    return b"".join(_events(True, head, pieces, "stop", 0, StreamOptions()))


def wait_until(check: Callable[[], T], timeout: float = 15.0, interval: float = 0.05, what: str = "") -> T:
    """Poll ``check`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except AssertionError:
            raise
        except Exception as exc:
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or check}: {last_error!r}")


async def llm_received(client: httpx.AsyncClient, llm: str, count: int, timeout: float = 15.0) -> None:
    """Wait, without blocking the event loop (a request of the test may be on its way), until
    the fake LLM at ``llm`` has received ``count`` requests: an event, not a guess at how long
    the bridge takes on this machine."""
    deadline = time.monotonic() + timeout
    while (await client.get(llm + "/_fake/state")).json()["requests"] < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"the LLM did not receive {count} request(s) within {timeout} s")
        await asyncio.sleep(0.02)


class Proc:
    """A child process with its output in a log file."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(
            args,
            cwd=ROOT,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    def kill(self, timeout: float = 5.0) -> None:
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)
        self._log.close()

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not leave within ``timeout``."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


class Stack:
    """Starts fake LLMs, brokers and connectors for one test and kills them all after it.

    A test that fails gets the logs of every stack open, or closed since the last report
    (conftest attaches them to its report): its own, and those of the module fixtures it
    used, even those a failing fixture or block closed on its way out.
    """

    live: ClassVar[set["Stack"]] = set()
    just_closed: ClassVar[list["Stack"]] = []

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self._count = 0
        Stack.live.add(self)

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        # A broker's usage database in the test's directory, never the tree's remotellm.db.
        env = {"REMOTELLM_DATABASE": str(self.log_dir / f"{name}-usage.db"), **(env or {})}
        self._count += 1
        proc = Proc(f"{self._count:02d}-{name}", args, self.log_dir, env)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        if self in Stack.live:
            Stack.live.discard(self)
            Stack.just_closed.append(self)
        for proc in reversed(self.procs):
            proc.kill()

    def logs(self, tail: int | None = None) -> str:
        """Every process's log (``tail``: only the last characters of each, so none is lost)."""
        return "\n".join(f"===== {p.name}\n{p.log()[-tail if tail else 0 :]}" for p in self.procs)

    def llm(
        self, *models: str, api_key: str | None = None, name: str = "llm", port: int = 0, ollama: bool = False
    ) -> str:
        """A fake OpenAI server (``ollama``: without /v1/models, like Ollama); returns its base URL."""
        args = [sys.executable, "-m", "fakellm", "--port", str(port), "--name", name, *(["--ollama"] * ollama)]
        for model in models:
            args += ["--model", model]
        if api_key:
            args += ["--api-key", api_key]
        proc = self.spawn(name, args)
        found = wait_until(
            lambda: re.search(r"listening on (http://\S+)", proc.log()), timeout=10, what=f"{name} to listen"
        )
        return found.group(1)

    def broker(
        self,
        config: str | None = None,
        *,
        user_keys: tuple[str, ...] = ("sk-user",),
        via: str = "hypercorn",
        port: int | None = None,
        env: dict[str, str] | None = None,
        name: str = "broker",
    ) -> "BrokerHandle":
        port = port or free_port()
        full_env = {"REMOTELLM_USER_API_KEYS": ",".join(user_keys), **(env or {})}
        if config is not None:
            path = self.log_dir / f"{name}-connectors.yaml"
            path.write_text(config)
            full_env["REMOTELLM_CONNECTOR_CONFIG"] = str(path)
        if via == "hypercorn":
            args = [sys.executable, "-m", "hypercorn", "broker.app:app", "--bind", f"127.0.0.1:{port}"]
        else:
            args = [sys.executable, "-m", "broker", "--port", str(port)]
        proc = self.spawn(name, args, full_env)
        handle = BrokerHandle(proc, f"http://127.0.0.1:{port}")
        handle.wait_serving()
        return handle

    def connector(
        self,
        broker_url: str,
        token: str,
        llm_url: str,
        *models: str,
        health_port: int | None = None,
        env: dict[str, str] | None = None,
        name: str = "connector",
    ) -> Proc:
        args = [sys.executable, "-m", "connector", "--broker-url", broker_url, "--token", token, "--llm-url", llm_url]
        for model in models:
            args += ["--model", model]
        if health_port:
            args += ["--health-port", str(health_port)]
        return self.spawn(name, args, env)


class BrokerHandle:
    def __init__(self, proc: Proc, url: str) -> None:
        self.proc = proc
        self.url = url

    def wait_serving(self) -> None:
        def serving() -> bool:
            assert self.proc.alive, f"the broker exited:\n{self.proc.log()[-3000:]}"
            return httpx.get(self.url + "/health", timeout=1).status_code == 200

        wait_until(serving, what=f"{self.proc.name} to serve")

    def health(self) -> dict[str, object]:
        result: dict[str, object] = httpx.get(self.url + "/health", timeout=2).json()
        return result

    def wait_models(self, *models: str, connectors: int | None = None, timeout: float = 15.0) -> None:
        """Wait until every model is routed (and, if given, that many connectors are live)."""

        def ready() -> bool:
            health = self.health()
            served = set(health["models"])  # type: ignore[call-overload]
            return set(models) <= served and (connectors is None or health["connectors"] == connectors)

        wait_until(ready, timeout=timeout, what=f"models {models} on the broker")
