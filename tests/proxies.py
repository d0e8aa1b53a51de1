"""Real proxies for the tests: squid, tinyproxy and mitmproxy, started and killed per test.

Each proxy runs in the foreground as a `Stack` process (its own process group, killed by
PID) on a free loopback port, with its config file, pid file and logs in a directory of
its own; every wait here has a bound. A test that needs a proxy binary that is not
installed is skipped, with the package to install in the reason:

- squid, tinyproxy, nginx: ``apt-get install -y squid tinyproxy nginx`` (Debian).
- mitmdump: ``pip install mitmproxy``, in a virtualenv of its own (mitmproxy pins h2 and
  h11 below what hypercorn needs), with ``mitmdump`` on the PATH, e.g.
  ``python3 -m venv /opt/mitmproxy && /opt/mitmproxy/bin/pip install mitmproxy &&
  ln -sf /opt/mitmproxy/bin/mitmdump /usr/local/bin/mitmdump``.

Usage, through `Proxies` (one per test; it owns the directories)::

    proxies = Proxies(stack)
    squid = proxies.squid()                    # squid.url == "http://127.0.0.1:PORT"
    ...; squid.traffic()                       # its access log so far
    proxies.close()                            # kills them, removes their directories
"""

import contextlib
import os
import pwd
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.support import Proc, Stack, free_port, wait_until

START_TIMEOUT = 20.0  # how long a proxy may take to accept connections (mitmproxy makes its CA first)

SQUID_HINT = "apt-get install squid"
TINYPROXY_HINT = "apt-get install tinyproxy"
MITMPROXY_HINT = "pip install mitmproxy in a venv of its own, with mitmdump on the PATH"

# Squid as a corporate forward proxy: loopback clients only, no caching, and no WebSocket
# upgrades (the reason this project does not use WebSockets).
SQUID_CONF = """\
http_port 127.0.0.1:{port}
visible_hostname remotellm-test-squid
pid_filename {dir}/squid.pid
cache_log {dir}/cache.log
access_log stdio:{dir}/access.log
coredump_dir {dir}
netdb_filename none
pinger_enable off
logfile_rotate 0
cache deny all
cache_mem 8 MB
shutdown_lifetime 0 seconds
acl loopback src 127.0.0.0/8
http_access allow loopback
http_access deny all
http_upgrade_request_protocols WebSocket deny all
{extra}
"""

TINYPROXY_CONF = """\
Port {port}
Listen 127.0.0.1
Timeout {timeout}
MaxClients 200
LogLevel Info
LogFile "{dir}/tinyproxy.log"
PidFile "{dir}/tinyproxy.pid"
Allow 127.0.0.1
DisableViaHeader Yes
{extra}
"""


def find_binary(name: str) -> str | None:
    """``name`` on the PATH, or in the sbin/bin directories a non-root PATH may lack."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def require_binary(name: str, hint: str) -> str:
    """The binary's path; skips the calling test when it is not installed."""
    path = find_binary(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({hint})")
    return path


def accepting(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


@dataclass
class Proxy:
    kind: str
    port: int
    proc: Proc
    workdir: Path
    access_log: Path | None  # None: the proxy logs its traffic to its own output (mitmproxy)
    ca_cert: Path | None = None  # the CA an intercepting proxy signs with
    shm_prefix: str | None = None  # squid's shared-memory segments, removed after it

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_with_credentials(self, user: str, password: str) -> str:
        return f"http://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.port}"

    def traffic(self) -> str:
        """What the proxy logged of the requests it carried so far."""
        if self.access_log is None:
            return self.proc.log()
        try:
            return self.access_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_started(self) -> None:
        def ready() -> bool:
            assert self.proc.alive, f"{self.kind} exited:\n{self.proc.log()[-3000:]}\n{self.traffic()[-2000:]}"
            if self.ca_cert is not None and not self.ca_cert.exists():
                return False
            return accepting(self.port)

        wait_until(ready, timeout=START_TIMEOUT, interval=0.1, what=f"{self.kind} to accept connections")


@contextlib.contextmanager
def proxy_workdir(kind: str) -> Iterator[Path]:
    """A directory for one proxy's config, pid file and logs, removed afterwards.

    Outside pytest's tmp tree on purpose: squid started as root drops to its own user,
    which must be able to write there (pytest's directories are private to root).
    """
    path = Path(tempfile.mkdtemp(prefix=f"remotellm-{kind}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _squid_user() -> pwd.struct_passwd | None:
    """The user squid drops to when started as root (Debian's 'proxy'), else None."""
    if os.geteuid() != 0:
        return None
    for name in ("proxy", "squid", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    return None


def start_squid(stack: Stack, workdir: Path, *, extra: str = "") -> Proxy:
    """A squid forward proxy (CONNECT and plain HTTP) on a free loopback port.

    ``extra`` is appended to the config, e.g. ``read_timeout 3 seconds``.
    """
    binary = require_binary("squid", SQUID_HINT)
    port = free_port()
    user = _squid_user()
    if user is not None:
        extra += f"\ncache_effective_user {user.pw_name}"
        os.chown(workdir, user.pw_uid, user.pw_gid)
    conf = workdir / "squid.conf"
    conf.write_text(SQUID_CONF.format(port=port, dir=workdir, extra=extra))
    # -n: a service name of its own, so its shared-memory segments clash with no other squid.
    service = f"remotellm{port}"
    proc = stack.spawn("squid", [binary, "-N", "-d", "1", "-n", service, "-f", str(conf)])
    proxy = Proxy("squid", port, proc, workdir, workdir / "access.log", shm_prefix=f"squid-{service}")
    proxy.wait_started()
    return proxy


def start_tinyproxy(stack: Stack, workdir: Path, *, timeout: int = 600, auth: tuple[str, str] | None = None) -> Proxy:
    """A tinyproxy on a free loopback port; ``timeout``: seconds of idleness before it cuts a
    connection; ``auth``: (user, password) it demands as Proxy-Authorization Basic."""
    binary = require_binary("tinyproxy", TINYPROXY_HINT)
    port = free_port()
    extra = f"BasicAuth {auth[0]} {auth[1]}" if auth else ""
    conf = workdir / "tinyproxy.conf"
    conf.write_text(TINYPROXY_CONF.format(port=port, dir=workdir, timeout=timeout, extra=extra))
    proc = stack.spawn("tinyproxy", [binary, "-d", "-c", str(conf)])
    proxy = Proxy("tinyproxy", port, proc, workdir, workdir / "tinyproxy.log")
    proxy.wait_started()
    return proxy


# nginx as a reverse proxy in front of the broker, with its defaults for request bodies:
# it holds each upload until it is complete (proxy_request_buffering), while responses
# stream (proxy_buffering off) — the shape that starves a streaming upload, nothing else.
# nginx's main block, every file in its own directory ({dir}); {http}: the rest of the http block.
NGINX_MAIN = """\
daemon off;
worker_processes 1;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{http}
}}
"""
NGINX_CONF = """\
    access_log {dir}/access.log;
    client_max_body_size 20m;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass {upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 1h;
        }}
    }}
"""
NGINX_HINT = "apt-get install nginx"


def start_nginx(stack: Stack, workdir: Path, *, upstream: str) -> Proxy:
    """nginx on a free loopback port, reverse-proxying to ``upstream`` (the broker)."""
    binary = require_binary("nginx", NGINX_HINT)
    port = free_port()
    conf = workdir / "nginx.conf"
    http = NGINX_CONF.format(port=port, dir=workdir, upstream=upstream)
    conf.write_text(NGINX_MAIN.format(dir=workdir, http=http))
    proc = stack.spawn("nginx", [binary, "-c", str(conf), "-p", str(workdir)])
    proxy = Proxy("nginx", port, proc, workdir, workdir / "access.log")
    proxy.wait_started()
    return proxy


def start_mitmproxy(stack: Stack, workdir: Path, *, stream: bool = True, upstream_ca: Path | None = None) -> Proxy:
    """mitmdump: a TLS-intercepting proxy that re-signs every site with its own CA
    (``proxy.ca_cert``, made at its first start) and speaks HTTP/1.1 only on both sides.

    ``stream=False`` leaves mitmproxy's default: it buffers each whole body, request and
    response, before passing it on. ``upstream_ca``: the CA it trusts for the real server.
    """
    binary = require_binary("mitmdump", MITMPROXY_HINT)
    port = free_port()
    args = [binary, "--listen-host", "127.0.0.1", "--listen-port", str(port)]
    args += ["--set", f"confdir={workdir}", "--set", "http2=false", "--set", "flow_detail=1"]
    if stream:
        args += ["--set", "stream_large_bodies=1"]
    if upstream_ca is not None:
        args += ["--set", f"ssl_verify_upstream_trusted_ca={upstream_ca}"]
    proc = stack.spawn("mitmproxy", args)
    proxy = Proxy("mitmproxy", port, proc, workdir, None, ca_cert=workdir / "mitmproxy-ca-cert.pem")
    proxy.wait_started()
    return proxy


class Proxies:
    """The proxies of one test: started on demand; `close` kills them (by PID) and
    removes their directories, keeping a copy of each access log beside the test's logs."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.started: list[Proxy] = []
        self._dirs = contextlib.ExitStack()

    def _workdir(self, kind: str) -> Path:
        return self._dirs.enter_context(proxy_workdir(kind))

    def squid(self, *, extra: str = "") -> Proxy:
        proxy = start_squid(self.stack, self._workdir("squid"), extra=extra)
        self.started.append(proxy)
        return proxy

    def tinyproxy(self, *, timeout: int = 600, auth: tuple[str, str] | None = None) -> Proxy:
        proxy = start_tinyproxy(self.stack, self._workdir("tinyproxy"), timeout=timeout, auth=auth)
        self.started.append(proxy)
        return proxy

    def mitmproxy(self, *, stream: bool = True, upstream_ca: Path | None = None) -> Proxy:
        proxy = start_mitmproxy(self.stack, self._workdir("mitmproxy"), stream=stream, upstream_ca=upstream_ca)
        self.started.append(proxy)
        return proxy

    def nginx(self, *, upstream: str) -> Proxy:
        proxy = start_nginx(self.stack, self._workdir("nginx"), upstream=upstream)
        self.started.append(proxy)
        return proxy

    def close(self) -> None:
        for proxy in reversed(self.started):
            proxy.proc.kill()
            if proxy.access_log is not None:
                with contextlib.suppress(OSError):
                    shutil.copy(proxy.access_log, self.stack.log_dir / f"{proxy.proc.name}-access.log")
            if proxy.shm_prefix is not None:
                for segment in Path("/dev/shm").glob(f"{proxy.shm_prefix}*"):
                    segment.unlink(missing_ok=True)
        self._dirs.close()
