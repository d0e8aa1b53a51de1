"""Bounds on what a peer may make this side hold: every byte from the other end is hostile."""

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

# A model name as OpenAI, Ollama and Hugging Face spell them ("llama3:8b", "org/Model-7B"):
# visible ASCII, no spaces or quotes (names go into logs, metrics labels and JSON).
_MODEL_NAME = re.compile(r"[A-Za-z0-9._:/@+\-]{1,256}")
# A broker id (wire.Welcome.broker): it travels in a header and lands in logs and health.
BROKER_ID = re.compile(r"[A-Za-z0-9_\-]{1,64}")
# Brokers one list may name, and so the sessions one connector holds at most: a hostile
# broker must not make a connector dial hosts without bound.
MAX_BROKERS = 16
MAX_BROKER_URL = 512
_URL_TEXT = re.compile(r"[!-~]*")  # visible ASCII: no spaces, no control characters


@dataclass(frozen=True)
class Limits:
    """What one session may hold at once; the defaults suit one LLM box with headroom."""

    # Requests in flight on one session (replies the broker tracks, LLM calls the connector
    # runs); more are refused. The benchmark holds 1,000 idle streams on one connector.
    max_streams: int = 4096
    # Largest frame a connector may send (a Head, a Chunk): reply bodies arrive in LLM-sized
    # reads, far below this. Requests towards the connector may be larger (wire.MAX_FRAME_SIZE).
    max_reply_frame: int = 1024 * 1024
    # Frames sent and not yet acknowledged; a peer that never acknowledges is broken.
    max_unacked: int = 65536
    # A connector's model list (Hello, or its LLM's answer to GET /v1/models).
    max_models: int = 1024
    max_model_listing: int = 1024 * 1024  # bytes of the LLM's GET /v1/models answer
    # Uplink bodies open at once: a connector keeps one (a few overlap while a proxy batches);
    # each holds a frame buffer, so they are counted, not left to the number of connections.
    max_uplinks: int = 8
    # A connector's max_concurrent as a broker tells it, and the free slots a connector reports.
    max_slots: int = 1 << 20


DEFAULT_LIMITS = Limits()


def bad_model_name(name: object) -> bool:
    """Whether a peer-supplied model name is unfit to route by or to log."""
    return not isinstance(name, str) or _MODEL_NAME.fullmatch(name) is None


def check_models(models: list[str], limits: Limits = DEFAULT_LIMITS) -> str | None:
    """Why a peer's model list is refused, or None when it is fine."""
    if len(models) > limits.max_models:
        return f"{len(models)} models (at most {limits.max_models})"
    bad = next((name for name in models if bad_model_name(name)), None)
    if bad is not None:
        return f"model name {bad[:40]!r} is not 1-256 characters of [A-Za-z0-9._:/@+-]"
    return None


def check_brokers(brokers: list[tuple[str, str]]) -> str | None:
    """Why a peer's list of brokers is refused, or None when it is fine: a bounded count,
    ids fit for a header, and URLs that are plain http(s) bases (no credentials, query or
    fragment), or empty (the URL this broker was reached at)."""
    if len(brokers) > MAX_BROKERS:
        return f"{len(brokers)} brokers (at most {MAX_BROKERS})"
    for broker_id, url in brokers:
        if BROKER_ID.fullmatch(broker_id) is None:
            return f"broker id {broker_id[:40]!r} is not 1-64 characters of [A-Za-z0-9_-]"
        why = check_broker_url(url) if url else None
        if why is not None:
            return why
    return None


def check_broker_url(url: str) -> str | None:
    """Why ``url`` is no base URL of a broker, or None."""
    if len(url) > MAX_BROKER_URL or _URL_TEXT.fullmatch(url) is None:
        return f"broker URL is not 1-{MAX_BROKER_URL} characters of visible ASCII"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        return f"broker URL {url[:60]!r} does not parse"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"broker URL {url[:60]!r} is not http:// or https:// with a host"
    if "@" in parts.netloc or parts.query or parts.fragment:
        return f"broker URL {url[:60]!r} carries credentials, a query or a fragment"
    return None
