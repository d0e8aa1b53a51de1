"""connectors.yaml: parsing and validation with line numbers.

Besides ``user_api_keys`` and ``connectors``, the file may set any broker setting by
its long name (``port``, ``idle_timeout``...); the CLI and the environment override it.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from broker.keys import check_visible, parse_secret
from broker.limits import Limits
from broker.routes import validate_allowed_path
from broker.users import User
from wire import MAX_BROKERS, check_broker_url


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def _port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("must be a port number")
    try:
        port = int(value)
    except ValueError:
        raise ValueError("must be a port number") from None
    if not 0 < port < 65536:
        raise ValueError("must be a port number (1-65535)")
    return port


def _positive(kind: type[float] | type[int]) -> Any:
    def convert(value: object) -> float | int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError("must be a positive number")
        try:
            number = kind(value)
        except ValueError:
            raise ValueError("must be a positive number") from None
        if not number > 0:  # also refuses NaN
            raise ValueError("must be a positive number")
        return number

    return convert


def _log_format(value: object) -> str:
    if value not in ("plain", "json"):
        raise ValueError("must be plain or json")
    return str(value)


def _redis_policy(value: object) -> str:
    if value not in ("local", "refuse"):
        raise ValueError("must be local or refuse")
    return str(value)


def _broker_url(value: object) -> str:
    why = check_broker_url(_text(value).rstrip("/"))
    if why is not None:
        raise ValueError(why.removeprefix("broker URL "))
    return _text(value).rstrip("/")


def _broker_urls(value: object) -> tuple[str, ...]:
    """A list (YAML, repeated flags) or a comma-separated string (the environment)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > MAX_BROKERS:
        raise ValueError(f"must be at most {MAX_BROKERS} URLs")
    return tuple(dict.fromkeys(_broker_url(item.strip() if isinstance(item, str) else item) for item in items))


# Every broker setting a CLI flag, an environment variable or the YAML file may carry,
# with the one function that validates it from any of the three.
SETTINGS: dict[str, Any] = {
    "host": _text,
    "port": _port,
    "certfile": _text,
    "keyfile": _text,
    "first_byte_timeout": _positive(float),
    "idle_timeout": _positive(float),
    "total_timeout": _positive(float),
    "log_format": _log_format,
    "ping_interval": _positive(float),
    "poll_lifetime": _positive(float),
    "model_refresh": _positive(float),
    "queue_timeout": _positive(float),
    "max_body_size": _positive(int),
    "max_upload_size": _positive(int),
    "body_timeout": _positive(float),
    "body_memory_limit": _positive(int),
    "resume_grace": _positive(float),
    "sessions_per_token": _positive(int),
    "response_ttl": _positive(float),
    "database": _text,
    "redis_url": _text,
    "redis_unreachable": _redis_policy,
    "usage_retention_days": _positive(int),
    "advertise_url": _broker_url,
    "peers": _broker_urls,
    "workers": _positive(int),
}
_CONNECTOR_KEYS = frozenset({"name", "token", "llm_api_key", "models", "max_concurrent", "allowed_paths"})
_TOP_LEVEL_KEYS = frozenset(
    {"user_api_keys", "connectors", "allowed_paths", "users", "admin_api_keys", "require_approval"}
)
_USER_KEYS = frozenset({"name", "key", "models", "limits"})
_LIMIT_KEYS = frozenset({"requests_per_minute", "tokens_per_minute", "max_parallel", "tokens_per_day"})
# A user's name becomes a metrics label and a log field: plain text, short.
_USER_NAME = re.compile(r"[A-Za-z0-9._@+-]{1,64}")


class ConfigError(ValueError):
    """An invalid config; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class ConnectorSpec:
    """One connectors.yaml entry, with its token reduced to a digest."""

    name: str
    token_digest: bytes
    llm_api_key: str | None = field(repr=False)
    models: frozenset[str] | None  # None: any model not reserved to another token
    max_concurrent: int | None  # None: no cap (the LLM server queues by itself)
    allowed_paths: frozenset[str] = frozenset()  # extra POST paths this connector's LLM may be sent


@dataclass(frozen=True, slots=True)
class FileConfig:
    user_key_digests: tuple[bytes, ...]
    connectors: tuple[ConnectorSpec, ...]
    settings: dict[str, Any]
    allowed_paths: frozenset[str] = frozenset()  # extra POST paths any connector may be sent
    warnings: tuple[str, ...] = ()  # valid, but worth an operator's attention
    users: tuple[User, ...] = ()  # named users
    admin_key_digests: tuple[bytes, ...] = ()
    require_approval: bool = False  # enrolled connectors wait for an admin's approval


class _Map(dict[str, Any]):
    """A YAML mapping that knows its line and the line of each value."""

    line = 0
    lines: dict[str, int]


class _Seq(list[Any]):
    """A YAML sequence that knows the line of each item."""

    line = 0
    lines: list[int]


class _LineLoader(yaml.SafeLoader):
    """A safe loader whose mappings and sequences remember where they stand."""


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> _Map:
    mapping = _Map({str(k): v for k, v in loader.construct_mapping(node, deep=True).items()})
    mapping.line = node.start_mark.line + 1
    mapping.lines = {str(key.value): value.start_mark.line + 1 for key, value in node.value}
    return mapping


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> _Seq:
    sequence = _Seq(loader.construct_sequence(node, deep=True))
    sequence.line = node.start_mark.line + 1
    sequence.lines = [item.start_mark.line + 1 for item in node.value]
    return sequence


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


def load_file(path: str) -> FileConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse(text, path)


def parse(text: str, source: str = "<config>") -> FileConfig:
    try:
        doc = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if doc is None:
        doc = _Map()
    if not isinstance(doc, _Map):
        raise ConfigError(f"{source}:1: the top level must be a mapping")

    def fail(line: int, message: str) -> ConfigError:
        return ConfigError(f"{source}:{line}: {message}")

    unknown = [key for key in doc if key not in SETTINGS and key not in _TOP_LEVEL_KEYS]
    if unknown:
        raise fail(doc.lines[unknown[0]], f"unknown key(s): {', '.join(sorted(unknown))}")
    settings = {}
    for key in SETTINGS.keys() & doc.keys():
        try:
            settings[key] = SETTINGS[key](doc[key])
        except ValueError as exc:
            raise fail(doc.lines[key], f"{key} {exc}") from None
    keys = doc.get("user_api_keys") or _Seq()
    if not isinstance(keys, _Seq):
        raise fail(doc.lines["user_api_keys"], "user_api_keys must be a list of strings")
    digests = tuple(_secret(k, f"user_api_keys[{i}]", keys.lines[i], fail) for i, k in enumerate(keys))
    entries = doc.get("connectors") or _Seq()
    if not isinstance(entries, _Seq):
        raise fail(doc.lines["connectors"], "connectors must be a list")
    specs = tuple(_connector(entry, i, entries.lines[i], fail) for i, entry in enumerate(entries))
    seen: dict[bytes, str] = {}
    for index, spec in enumerate(specs):
        if spec.token_digest in seen:
            message = f"connectors {seen[spec.token_digest]!r} and {spec.name!r} share a token"
            raise fail(entries.lines[index], message)
        seen[spec.token_digest] = spec.name
    users = _users(doc.get("users"), doc.lines.get("users", 1) if doc else 1, fail)
    admins = doc.get("admin_api_keys") or _Seq()
    if not isinstance(admins, _Seq):
        raise fail(doc.lines["admin_api_keys"], "admin_api_keys must be a list of strings")
    admin_digests = tuple(_secret(k, f"admin_api_keys[{i}]", admins.lines[i], fail) for i, k in enumerate(admins))
    people = {*digests, *(user.key_digest for user in users), *admin_digests}
    for index, spec in enumerate(specs):
        if spec.token_digest in people:
            raise fail(entries.lines[index], f"connector {spec.name!r} has a token that is also a user or admin key")
    line = doc.lines.get("allowed_paths", 1) if doc else 1
    paths = _paths(doc.get("allowed_paths"), "allowed_paths", line, fail)
    warnings = _warnings(specs, source, entries)
    approval = doc.get("require_approval", False)
    if not isinstance(approval, bool):
        raise fail(doc.lines["require_approval"], "require_approval must be true or false")
    return FileConfig(digests, specs, settings, paths, warnings, users, admin_digests, approval)


def _users(entries: object, line: int, fail: Any) -> tuple[User, ...]:
    if entries is None:
        return ()
    if not isinstance(entries, _Seq):
        raise fail(line, "users must be a list")
    users = tuple(_user(entry, i, entries.lines[i], fail) for i, entry in enumerate(entries))
    seen: dict[object, int] = {}
    for index, user in enumerate(users):
        for unique in (user.name, user.key_digest):
            if unique in seen:
                raise fail(entries.lines[index], f"users[{index}] repeats the name or key of users[{seen[unique]}]")
            seen[unique] = index
    return users


def _user(entry: object, index: int, line: int, fail: Any) -> User:
    what = f"users[{index}]"
    if not isinstance(entry, _Map):
        raise fail(line, f"{what} must be a mapping")
    unknown = set(entry) - _USER_KEYS
    if unknown:
        raise fail(line, f"{what}: unknown key(s): {', '.join(sorted(map(str, unknown)))}")
    name = entry.get("name")
    if not isinstance(name, str) or not _USER_NAME.fullmatch(name):
        raise fail(line, f"{what}: name must be 1-64 letters, digits or ._@+-")
    if "key" not in entry:
        raise fail(line, f"{what}: key is required")
    key = _secret(entry["key"], f"{what}.key", entry.lines.get("key", line), fail)
    models = entry.get("models")
    if models is not None:
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise fail(line, f"{what}: models must be a list of model names")
        models = frozenset(models)
    return User(name, key, models, _limits(entry.get("limits"), what, entry.lines.get("limits", line), fail))


def _limits(value: object, what: str, line: int, fail: Any) -> Limits:
    if value is None:
        return Limits()
    if not isinstance(value, _Map):
        raise fail(line, f"{what}.limits must be a mapping")
    unknown = set(value) - _LIMIT_KEYS
    if unknown:
        raise fail(line, f"{what}.limits: unknown key(s): {', '.join(sorted(map(str, unknown)))}")
    try:
        return Limits(**value)
    except ValueError as exc:
        raise fail(line, f"{what}.limits: {exc}") from None


def _warnings(specs: tuple[ConnectorSpec, ...], source: str, entries: "_Seq") -> tuple[str, ...]:
    return tuple(
        f"{source}:{entries.lines[index]}: connector {spec.name!r} has no models: list, so it may serve "
        "any model that no other token reserves; name its models to keep it to them"
        for index, spec in enumerate(specs)
        if spec.models is None
    )


def _paths(value: object, what: str, line: int, fail: Any) -> frozenset[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list):
        raise fail(line, f"{what} must be a list of paths")
    try:
        return frozenset(validate_allowed_path(path) for path in value)
    except ValueError as exc:
        raise fail(line, f"{what}: {exc}") from None


def _secret(value: object, what: str, line: int, fail: Any) -> bytes:
    if not isinstance(value, str):
        raise fail(line, f"{what} must be a string")
    try:
        return parse_secret(value)
    except ValueError as exc:
        raise fail(line, f"{what}: {exc}") from None


def _connector(entry: object, index: int, line: int, fail: Any) -> ConnectorSpec:
    if not isinstance(entry, _Map):
        raise fail(line, f"connectors[{index}] must be a mapping")
    unknown = set(entry) - _CONNECTOR_KEYS
    if unknown:
        raise fail(line, f"connectors[{index}]: unknown key(s): {', '.join(sorted(map(str, unknown)))}")
    if "token" not in entry:
        raise fail(line, f"connectors[{index}]: token is required")
    name = entry.get("name", f"connector-{index + 1}")
    if not isinstance(name, str) or not name:
        raise fail(line, f"connectors[{index}]: name must be a non-empty string")
    llm_key = entry.get("llm_api_key")
    if llm_key is not None:
        try:
            check_visible(llm_key if isinstance(llm_key, str) else "")
        except ValueError as exc:
            raise fail(line, f"connectors[{index}]: llm_api_key: {exc}") from None
    models = entry.get("models")
    if models is not None:
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise fail(line, f"connectors[{index}]: models must be a list of model names")
        models = frozenset(models)
    limit = entry.get("max_concurrent")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise fail(line, f"connectors[{index}]: max_concurrent must be a positive integer")
    token = _secret(entry["token"], f"connectors[{index}].token", line, fail)
    paths = _paths(entry.get("allowed_paths"), f"connectors[{index}].allowed_paths", line, fail)
    return ConnectorSpec(name, token, llm_key, models, limit, paths)
