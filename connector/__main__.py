"""``python -m connector``: dial out to the broker(s) and serve the local LLM through them."""

import asyncio
import gc
import importlib
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Callable

import httpx

from connector.enroll import EnrollError, enroll
from connector.fleet import Fleet
from connector.health import serve_health
from connector.llm import LLMClient
from connector.settings import SettingsError, parse_cli, resolve
from wire.endpoints import loopback

log = logging.getLogger("remotellm.connector")


async def run(argv: list[str]) -> int:
    try:
        settings = resolve(parse_cli(argv), os.environ)
    except SettingsError as exc:
        print(f"python -m connector: {exc}", file=sys.stderr)
        return 2
    for url in settings.broker_urls:
        _warn_cleartext(url)
    if settings.enroll_code:
        try:
            settings = await enroll(settings, settings.enroll_code)
        except EnrollError as exc:
            log.error("enrollment failed: %s", exc)
            return 1
    llm = LLMClient(settings.llm_url)
    fleet = Fleet(settings, llm)
    health = await serve_health(settings.health_port, fleet.health) if settings.health_port else None
    gc.freeze()  # start-up's objects live on: a full collection need not scan them (as the broker)
    main = asyncio.create_task(fleet.run())
    stopping: list[asyncio.Task[None]] = []

    async def stop() -> None:
        log.info("stopping: finishing the requests in flight")
        try:
            await fleet.drain()
        finally:
            main.cancel()

    def on_signal() -> None:
        if stopping:  # a second signal: leave now
            main.cancel()
        else:
            stopping.append(asyncio.create_task(stop()))

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    try:
        await main
    except asyncio.CancelledError:
        log.info("connector stopped")
    finally:
        if health is not None:
            health.close()
        await llm.aclose()
    return 0


def _warn_cleartext(broker_url: str) -> None:
    url = httpx.URL(broker_url)
    if url.scheme == "http" and not loopback(url.host):
        log.warning("the broker URL is http:// to another machine: the token and every request cross "
                    "the network in clear text; use https://")  # fmt: skip


def _fastest_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when it is installed (the [speed] extra): less CPU per relayed frame."""
    return importlib.import_module("uvloop").new_event_loop if importlib.util.find_spec("uvloop") else None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with asyncio.Runner(loop_factory=_fastest_loop()) as runner:
        return runner.run(run(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
