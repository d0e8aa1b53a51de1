"""Broker settings: CLI flags win over environment variables, which win over the YAML file.

``python -m broker`` passes its parsed flags; ``broker.app:app`` under plain hypercorn
has only the environment (and the YAML file it names).
"""

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from argparse_dataclass import ArgumentParser

from broker.config import SETTINGS, ConfigError, ConnectorSpec, load_file
from broker.database import DEFAULT_DATABASE
from broker.identity import Identity
from broker.keys import parse_secret
from broker.limits_redis import RedisPolicy
from broker.users import User
from wire import DEFAULT_LIMITS, MAX_FRAME_SIZE, Limits

# Room in a request frame for everything but the body: method, path, headers.
FRAME_HEADROOM = 1024 * 1024

LogFormat = Literal["plain", "json"]


@dataclass
class BrokerArgs:
    """The CLI of ``python -m broker``; None means "not given here"."""

    host: str | None = field(default=None, metadata={"type": str, "help": "bind address (127.0.0.1)"})
    port: int | None = field(default=None, metadata={"type": int, "help": "bind port (8443)"})
    certfile: str | None = field(default=None, metadata={"type": str, "help": "TLS certificate (PEM)"})
    keyfile: str | None = field(default=None, metadata={"type": str, "help": "TLS private key (PEM)"})
    user_api_key: list[str] | None = field(
        default=None, metadata={"type": str, "help": "a user key (repeatable)", "metavar": "KEY"}
    )
    admin_api_key: list[str] | None = field(
        default=None, metadata={"type": str, "help": "an admin key (repeatable)", "metavar": "KEY"}
    )
    database: str | None = field(
        default=None, metadata={"type": str, "metavar": "URL", "help": "usage database: a SQLite path or postgresql://"}
    )
    redis_url: str | None = field(
        default=None,
        metadata={
            "type": str,
            "metavar": "URL",
            "help": "Redis shared by several brokers (limits, response ids, reload notices)",
        },
    )
    redis_unreachable: str | None = field(
        default=None,
        metadata={"type": str, "choices": ["local", "refuse"], "help": "limits while Redis is down (local)"},
    )
    usage_retention_days: int | None = field(
        default=None, metadata={"type": int, "help": "days each request's usage row is kept (90; hourly sums stay)"}
    )
    connector_config: str | None = field(
        default=None, metadata={"type": str, "help": "connectors.yaml", "metavar": "FILE"}
    )
    first_byte_timeout: float | None = field(
        default=None, metadata={"type": float, "help": "seconds to wait for the LLM's response head"}
    )
    idle_timeout: float | None = field(
        default=None, metadata={"type": float, "help": "seconds allowed between two chunks"}
    )
    total_timeout: float | None = field(default=None, metadata={"type": float, "help": "seconds per request, all in"})
    ping_interval: float | None = field(
        default=None, metadata={"type": float, "help": "seconds between tunnel pings (15)"}
    )
    poll_lifetime: float | None = field(
        default=None, metadata={"type": float, "help": "seconds before a poll is recycled (300)"}
    )
    model_refresh: float | None = field(
        default=None, metadata={"type": float, "help": "seconds between model listings of discovering connectors (60)"}
    )
    queue_timeout: float | None = field(
        default=None, metadata={"type": float, "help": "seconds a request waits for a free slot (2)"}
    )
    max_body_size: int | None = field(default=None, metadata={"type": int, "help": "request body limit in bytes"})
    max_upload_size: int | None = field(
        default=None, metadata={"type": int, "help": "limit in bytes of a streamed upload (audio forms; 256 MiB)"}
    )
    body_timeout: float | None = field(
        default=None, metadata={"type": float, "help": "seconds a request body may take to arrive (60)"}
    )
    body_memory_limit: int | None = field(
        default=None, metadata={"type": int, "help": "request-body bytes held at once, all users together"}
    )
    response_ttl: float | None = field(
        default=None,
        metadata={"type": float, "help": "seconds a Responses id routes to its connector (30 d)"},
    )
    log_format: str | None = field(
        default=None, metadata={"type": str, "choices": ["plain", "json"], "help": "request log format"}
    )
    resume_grace: float | None = field(
        default=None, metadata={"type": float, "help": "seconds a connector may take to resume its session (30)"}
    )
    sessions_per_token: int | None = field(
        default=None, metadata={"type": int, "help": "sessions one connector token may hold at once (16)"}
    )
    advertise_url: str | None = field(
        default=None, metadata={"type": str, "metavar": "URL", "help": "how connectors reach this broker itself"}
    )
    peers: list[str] | None = field(
        default=None,
        metadata={"args": ["--peer"], "type": str, "metavar": "URL", "help": "another broker (repeatable)"},
    )
    workers: int | None = field(
        default=None, metadata={"type": int, "metavar": "N", "help": "broker processes serving the one port (1)"}
    )


_REPEATABLE = ("user_api_key", "admin_api_key", "peers")


def parse_cli(argv: list[str], prog: str = "python -m broker") -> BrokerArgs:
    parser = ArgumentParser(BrokerArgs, prog=prog)
    for action in parser._actions:
        if action.dest in _REPEATABLE:  # argparse-dataclass has no "append" action
            action.__class__ = argparse._AppendAction
            action.default = None
    args: BrokerArgs = parser.parse_args(argv)
    return args


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8443
    certfile: str | None = None
    keyfile: str | None = None
    user_key_digests: tuple[bytes, ...] = ()
    connectors: tuple[ConnectorSpec, ...] = ()
    connector_config: str | None = None
    first_byte_timeout: float = 300.0
    idle_timeout: float = 300.0
    total_timeout: float = 3600.0
    log_format: LogFormat = "plain"
    max_body_size: int = 16 * 1024 * 1024
    # Streamed bodies are never held whole, so they may be larger than what is read whole.
    max_upload_size: int = 256 * 1024 * 1024
    body_timeout: float = 60.0  # a request body must arrive within this, else 408
    body_memory_limit: int = 256 * 1024 * 1024  # past it, new requests get 503 (never an OOM)
    response_ttl: float = 30 * 24 * 3600.0  # as long as OpenAI keeps a stored response
    database: str = DEFAULT_DATABASE  # usage: a SQLite path or postgresql:// URL
    redis_url: str | None = None  # limits, response ids and reload notices shared by several brokers
    # While Redis is unreachable: each broker enforces the limits alone, or refuses limited requests (503).
    redis_unreachable: RedisPolicy = "local"
    usage_retention_days: int = 90
    users: tuple[User, ...] = ()  # named users (connectors.yaml)
    admin_key_digests: tuple[bytes, ...] = ()
    require_approval: bool = False  # enrolled connectors wait for an admin's approval (connectors.yaml)
    allowed_paths: frozenset[str] = frozenset()  # extra POST paths any connector may be sent
    warnings: tuple[str, ...] = ()
    resume_grace: float = 30.0  # a connector that lost its connections may resume within this
    sessions_per_token: int = 16  # more registrations on one token are refused (a stolen token's flood)
    queue_timeout: float = 2.0  # how long a request may wait for a free slot before 429
    limits: Limits = DEFAULT_LIMITS  # what one session may hold (wire.limits)
    ping_interval: float = 15.0  # also the connector's heartbeat; silence for 3 of them = dead
    poll_lifetime: float = 300.0  # each poll ends after this long; the connector polls again
    model_refresh: float = 60.0  # how often a connector's LLM is asked for its models again
    advertise_url: str | None = None  # how connectors reach this broker (listed to them)
    peers: tuple[str, ...] = ()  # the other brokers' URLs, when there is no Redis registry
    workers: int = 1  # processes serving the one port (python -m broker --workers)
    # This process among the brokers (wire.Welcome.broker), and its sibling workers' ids.
    identity: Identity = field(default_factory=Identity.single, compare=False)  # not a setting: who this is


def resolve(args: BrokerArgs | None, env: Mapping[str, str]) -> Settings:
    """Merge the three layers; raises ConfigError naming the offending source."""
    args = args or BrokerArgs()
    config_path = args.connector_config or env.get("REMOTELLM_CONNECTOR_CONFIG")
    file = load_file(config_path) if config_path else None
    values: dict[str, Any] = dict(file.settings) if file else {}
    for name in SETTINGS:
        var = f"REMOTELLM_{name.upper()}"
        for source, value in ((var, env.get(var)), (f"--{name.replace('_', '-')}", getattr(args, name))):
            if value is None or value == "":
                continue
            try:
                values[name] = SETTINGS[name](value)
            except ValueError as exc:
                raise ConfigError(f"{name} ({source}) {exc}: {value!r}") from None
    try:
        identity = Identity.from_env(env)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if bool(values.get("certfile")) != bool(values.get("keyfile")):
        raise ConfigError("certfile and keyfile go together")
    _check_body_limits(values)

    digests = _key_digests(args.user_api_key, env.get("REMOTELLM_USER_API_KEYS", ""), "user")
    admin_digests = _key_digests(args.admin_api_key, env.get("REMOTELLM_ADMIN_API_KEYS", ""), "admin")
    if file:
        digests += file.user_key_digests
        admin_digests += file.admin_key_digests
        people = {*digests, *admin_digests, *(user.key_digest for user in file.users)}
        if any(spec.token_digest in people for spec in file.connectors):
            raise ConfigError("a user or admin API key is also a connector token: give each its own secret")
    return Settings(
        **values,
        user_key_digests=tuple(dict.fromkeys(digests)),
        connectors=file.connectors if file else (),
        connector_config=config_path,
        allowed_paths=file.allowed_paths if file else frozenset(),
        warnings=file.warnings if file else (),
        users=file.users if file else (),
        admin_key_digests=tuple(dict.fromkeys(admin_digests)),
        identity=identity,
        require_approval=file.require_approval if file else False,
    )


def _key_digests(given: list[str] | None, from_env: str, what: str) -> tuple[bytes, ...]:
    """Keys from the CLI (repeatable) and a comma-separated variable, as digests."""
    plain = list(given or []) + [k.strip() for k in from_env.split(",") if k.strip()]
    try:
        return tuple(parse_secret(k) for k in plain)
    except ValueError as exc:
        raise ConfigError(f"{what} API key: {exc}") from None


def _check_body_limits(values: dict[str, Any]) -> None:
    """A body must fit one request frame, and one body must fit the memory allowed for all."""
    size = values.get("max_body_size", Settings.max_body_size)
    if size > MAX_FRAME_SIZE - FRAME_HEADROOM:
        raise ConfigError(f"max_body_size may be at most {MAX_FRAME_SIZE - FRAME_HEADROOM} (a tunnel frame's limit)")
    if size > values.get("body_memory_limit", Settings.body_memory_limit):
        raise ConfigError("max_body_size may not exceed body_memory_limit")
