"""``python -m broker``: serve, or the admin commands ``hash-key``, ``check-config``, ``usage`` and ``enroll``."""

import asyncio
import gc
import getpass
import importlib
import importlib.util
import os
import signal
import sys
from collections.abc import Callable

from hypercorn.asyncio import serve
from hypercorn.config import Config

from broker import hypercorn_fixes
from broker.config import ConfigError, load_file
from broker.edge import warn_cleartext
from broker.enroll_cli import enroll_main
from broker.keys import hash_form
from broker.logs import log
from broker.server import create_app
from broker.settings import Settings, parse_cli, resolve
from broker.usage_cli import usage_main
from broker.workers import reuseport_socket, supervise

GRACEFUL_TIMEOUT = 30.0  # requests in flight get this long to finish on SIGTERM
STOP_MARGIN = 10.0  # --workers: a worker still there this long after its drain is killed


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    if settings.identity.siblings:  # a worker of --workers: the port is shared with its siblings
        config.bind = [f"fd://{reuseport_socket(settings.host, settings.port).detach()}"]
    if settings.certfile and settings.keyfile:
        config.certfile = settings.certfile
        config.keyfile = settings.keyfile
    config.include_server_header = False
    config.accesslog = None
    return hypercorn_fixes.configure(config)


def _hash_key(args: list[str]) -> int:
    if args:
        secret = args[0]
    elif sys.stdin.isatty():
        secret = getpass.getpass("key or token: ")
    else:
        secret = sys.stdin.readline().strip()
    if not secret:
        print("hash-key: nothing to hash", file=sys.stderr)
        return 2
    print(hash_form(secret))
    return 0


def _check_config(args: list[str]) -> int:
    if len(args) != 1:
        print("usage: python -m broker check-config FILE", file=sys.stderr)
        return 2
    try:
        config = load_file(args[0])
    except ConfigError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"ok: {len(config.connectors)} connector(s), {len(config.user_key_digests)} user key(s)")
    return 0


def _fastest_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when it is installed (the [speed] extra): less CPU per relayed frame."""
    return importlib.import_module("uvloop").new_event_loop if importlib.util.find_spec("uvloop") else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hash-key"]:
        return _hash_key(argv[1:])
    if argv[:1] == ["check-config"]:
        return _check_config(argv[1:])
    if argv[:1] == ["usage"]:
        return usage_main(argv[1:])
    if argv[:1] == ["enroll"]:
        return enroll_main(argv[1:])
    args = parse_cli(argv)
    try:
        settings = resolve(args, os.environ)
    except ConfigError as exc:
        print(f"python -m broker: {exc}", file=sys.stderr)
        return 2
    if settings.workers > 1 and not settings.identity.siblings:
        return supervise(argv, settings.workers, GRACEFUL_TIMEOUT + STOP_MARGIN)
    if not settings.certfile:
        warn_cleartext(settings.host)
    try:
        with asyncio.Runner(loop_factory=_fastest_loop()) as runner:
            runner.run(_serve(settings, reload=lambda: resolve(args, os.environ)))
    except hypercorn_fixes.UnsupportedHypercorn as exc:
        print(f"python -m broker: {exc}", file=sys.stderr)
        return 2
    return 0


async def _serve(settings: Settings, reload: Callable[[], Settings]) -> None:
    """hypercorn, with a shutdown that first drains the tunnels (plain hypercorn cannot)."""
    broker = create_app(settings, reload)
    hub = broker.hub
    app = hypercorn_fixes.install(broker)
    signalled = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signalled.set)

    async def drained() -> None:
        await signalled.wait()
        log.info("shutting down: draining connectors (up to %.0f s)", GRACEFUL_TIMEOUT)
        await hub.drain(GRACEFUL_TIMEOUT)

    # What start-up made lives as long as the process: out of the collector's sight, a full
    # collection scans only what requests made (else it stalls every request for ~10-20 ms).
    gc.freeze()
    await serve(app, hypercorn_config(settings), shutdown_trigger=drained)  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
