"""connectors.yaml: parsing and validation with line numbers.

Besides ``user_api_keys`` and ``connectors``, the file may set any broker setting by
its long name (``port``, ``idle_timeout``...); the CLI and the environment override it.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from broker.keys import parse_secret

DEFAULT_MAX_CONCURRENT = 8

# Broker settings a YAML file may carry besides keys and connectors (see settings.py).
SETTING_KEYS = frozenset(
    {
        "host",
        "port",
        "certfile",
        "keyfile",
        "first_byte_timeout",
        "idle_timeout",
        "total_timeout",
        "log_format",
        "ping_interval",
        "poll_lifetime",
        "queue_timeout",
        "max_body_size",
    }
)
_CONNECTOR_KEYS = frozenset({"name", "token", "llm_api_key", "models", "max_concurrent"})


class ConfigError(ValueError):
    """An invalid config; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class ConnectorSpec:
    """One connectors.yaml entry, with its token reduced to a digest."""

    name: str
    token_digest: bytes
    llm_api_key: str | None
    models: frozenset[str] | None  # None: any model
    max_concurrent: int


@dataclass(frozen=True, slots=True)
class FileConfig:
    user_key_digests: tuple[bytes, ...]
    connectors: tuple[ConnectorSpec, ...]
    settings: dict[str, Any]


class _Map(dict[str, Any]):
    line = 0


class _LineLoader(yaml.SafeLoader):
    """A safe loader whose mappings remember the line they start on."""


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> _Map:
    mapping = _Map({str(k): v for k, v in loader.construct_mapping(node, deep=True).items()})
    mapping.line = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)


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

    unknown = set(doc) - SETTING_KEYS - {"user_api_keys", "connectors"}
    if unknown:
        raise fail(doc.line, f"unknown key(s): {', '.join(sorted(map(str, unknown)))}")
    keys = doc.get("user_api_keys") or []
    if not isinstance(keys, list):
        raise fail(doc.line, "user_api_keys must be a list of strings")
    digests = tuple(_secret(k, f"user_api_keys[{i}]", doc.line, fail) for i, k in enumerate(keys))
    entries = doc.get("connectors") or []
    if not isinstance(entries, list):
        raise fail(doc.line, "connectors must be a list")
    specs = tuple(_connector(entry, i, doc.line, fail) for i, entry in enumerate(entries))
    seen: dict[bytes, str] = {}
    for spec in specs:
        if spec.token_digest in seen:
            raise fail(doc.line, f"connectors {seen[spec.token_digest]!r} and {spec.name!r} share a token")
        seen[spec.token_digest] = spec.name
    return FileConfig(digests, specs, {k: doc[k] for k in SETTING_KEYS & set(doc)})


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
    line = entry.line
    unknown = set(entry) - _CONNECTOR_KEYS
    if unknown:
        raise fail(line, f"connectors[{index}]: unknown key(s): {', '.join(sorted(map(str, unknown)))}")
    if "token" not in entry:
        raise fail(line, f"connectors[{index}]: token is required")
    name = entry.get("name", f"connector-{index + 1}")
    if not isinstance(name, str) or not name:
        raise fail(line, f"connectors[{index}]: name must be a non-empty string")
    llm_key = entry.get("llm_api_key")
    if llm_key is not None and (not isinstance(llm_key, str) or not llm_key):
        raise fail(line, f"connectors[{index}]: llm_api_key must be a non-empty string")
    models = entry.get("models")
    if models is not None:
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise fail(line, f"connectors[{index}]: models must be a list of model names")
        models = frozenset(models)
    limit = entry.get("max_concurrent", DEFAULT_MAX_CONCURRENT)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise fail(line, f"connectors[{index}]: max_concurrent must be a positive integer")
    token = _secret(entry["token"], f"connectors[{index}].token", line, fail)
    return ConnectorSpec(name, token, llm_key, models, limit)
