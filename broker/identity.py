"""Which broker process this is: its broker id, and the ids of its sibling workers."""

import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from wire.limits import BROKER_ID

# Set by ``python -m broker --workers N`` for each worker it starts: "<base>/<index>/<count>".
# Each worker's id is "<base>-<index>": a restarted worker takes its slot's id again, so its
# siblings' lists stay right without telling them.
WORKER_ENV = "REMOTELLM_WORKER"


@dataclass(frozen=True)
class Identity:
    broker_id: str
    siblings: tuple[str, ...] = ()  # the other workers on this port

    @classmethod
    def single(cls) -> "Identity":
        return cls(secrets.token_hex(6))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Identity":
        value = env.get(WORKER_ENV)
        if not value:
            return cls.single()
        try:
            base, index, count = value.split("/")
            ids = [f"{base}-{n}" for n in range(int(count))]
            mine = ids[int(index)]
        except (ValueError, IndexError):
            raise ValueError(f"{WORKER_ENV} is not <base>/<index>/<count>: {value!r}") from None
        if BROKER_ID.fullmatch(mine) is None:
            raise ValueError(f"{WORKER_ENV}: {mine!r} is no broker id")
        return cls(mine, tuple(other for other in ids if other != mine))


def worker_value(base: str, index: int, count: int) -> str:
    """What WORKER_ENV holds for worker ``index`` of ``count``."""
    return f"{base}/{index}/{count}"
