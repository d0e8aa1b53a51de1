"""Two brokers sharing one Redis (its registry, limits and response ids), for the tests of
what holds across brokers: max_concurrent, response-id affinity."""

from pathlib import Path

from tests.servers import start_redis
from tests.support import BrokerHandle, Stack, free_port

# Two connectors' tokens serving one model; the first capped.
CONFIG = """
connectors:
  - name: box
    token: tok-box
    max_concurrent: 3
  - name: other
    token: tok-other
"""
CAP = 3


def two_brokers(stack: Stack, workdir: Path, configs: tuple[str, str] = (CONFIG, CONFIG)) -> list[BrokerHandle]:
    """Brokers a and b, each advertising its own URL (a connector given one learns the other)."""
    redis = start_redis(stack, workdir)
    brokers = []
    for name, config in zip("ab", configs, strict=True):
        port = free_port()
        env = {"REMOTELLM_ADVERTISE_URL": f"http://127.0.0.1:{port}", "REMOTELLM_REDIS_URL": redis.url}
        brokers.append(stack.broker(config, via="python", port=port, env=env, name=f"broker-{name}"))
    return brokers


def free_slots(broker: BrokerHandle) -> list[object]:
    """Each session's free slots as its connector last reported them (None: no cap)."""
    return [tunnel["free_slots"] for tunnel in broker.health()["tunnels"]]  # type: ignore[attr-defined]
