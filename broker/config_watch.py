"""Reloads the configuration when connectors.yaml changes on disk (SIGHUP does it at once)."""

import asyncio
import os
from collections.abc import Callable

# A revoked key or token stops working within 2 s (issue 13), on every broker, with or without
# Redis: a stat twice a second costs nothing, and the interval plus the settle time stays well below.
CONFIG_WATCH_INTERVAL = 0.5
CONFIG_SETTLE = 0.25  # a changed file is applied once it stayed the same this long (not half-written)


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
