"""Reloads the configuration when connectors.yaml changes on disk (SIGHUP does it at once)."""

import asyncio
import os
from collections.abc import Callable

CONFIG_WATCH_INTERVAL = 2.0
CONFIG_SETTLE = 0.5  # a changed file is applied once it stayed the same this long (not half-written)


async def watch(path: str, on_change: Callable[[], None]) -> None:
    last = _stamp(path)
    while True:
        await asyncio.sleep(CONFIG_WATCH_INTERVAL)
        stamp = _stamp(path)
        if stamp == last:
            continue
        while True:  # an editor may still be writing: wait until the file holds still
            await asyncio.sleep(CONFIG_SETTLE)
            settled, stamp = stamp, _stamp(path)
            if settled == stamp:
                break
        last = stamp
        on_change()


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino
