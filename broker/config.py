"""connectors.yaml: parsing and validation with line numbers.

Besides ``user_api_keys`` and ``connectors``, the file may set any broker setting by
its long name (``port``, ``idle_timeout``...); the CLI and the environment override it.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from broker.keys import check_visible, parse_secret
from broker.routes import validate_allowed_path

DEFAULT_MAX_CONCURRENT = 8


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
    "body_timeout": _positive(float),
    "body_memory_limit": _positive(int),
    "resume_grace": _positive(float),
    "sessions_per_token": _positive(int),
}
_CONNECTOR_KEYS = frozenset({"name", "token", "llm_api_key", "models", "max_concurrent", "allowed_paths"})
_TOP_LEVEL_KEYS = frozenset({"user_api_keys", "connectors", "allowed_paths"})


class ConfigError(ValueError):
    """An invalid config; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class ConnectorSpec:
    """One connectors.yaml entry, with its token reduced to a digest."""

    name: str
    token_digest: bytes
    llm_api_key: str | None = field(repr=False)
    models: frozenset[str] | None  # None: any model not reserved to another token
    max_concurrent: int
    allowed_paths: frozenset[str] = frozenset()  # extra POST paths this connector's LLM may be sent


@dataclass(frozen=True, slots=True)
class FileConfig:
    user_key_digests: tuple[bytes, ...]
    connectors: tuple[ConnectorSpec, ...]
    settings: dict[str, Any]
    allowed_paths: frozenset[str] = frozenset()  # extra POST paths any connector may be sent
    warnings: tuple[str, ...] = ()  # valid, but worth an operator's attention


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
        if spec.token_digest in digests:
            raise fail(entries.lines[index], f"connector {spec.name!r} has a token that is also a user key")
    line = doc.lines.get("allowed_paths", 1) if doc else 1
    paths = _paths(doc.get("allowed_paths"), "allowed_paths", line, fail)
    return FileConfig(digests, specs, settings, paths, _warnings(specs, source, entries))


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
    limit = entry.get("max_concurrent", DEFAULT_MAX_CONCURRENT)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise fail(line, f"connectors[{index}]: max_concurrent must be a positive integer")
    token = _secret(entry["token"], f"connectors[{index}].token", line, fail)
    paths = _paths(entry.get("allowed_paths"), f"connectors[{index}].allowed_paths", line, fail)
    return ConnectorSpec(name, token, llm_key, models, limit, paths)
