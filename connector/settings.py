"""Connector settings: CLI flags win over environment variables."""

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx
from argparse_dataclass import ArgumentParser

from connector.credentials import read_credential
from wire import DEFAULT_LIMITS, MAX_BROKERS


class SettingsError(ValueError):
    pass


@dataclass
class ConnectorArgs:
    """The CLI of ``python -m connector``; None means "not given here"."""

    broker_url: list[str] | None = field(
        default=None, metadata={"type": str, "metavar": "URL", "help": "a broker, or their balancer (repeatable)"}
    )
    token: str | None = field(default=None, metadata={"type": str, "help": "this connector's token"})
    credentials_file: str | None = field(
        default=None, metadata={"type": str, "metavar": "PATH", "help": "this connector's credential (from --enroll)"}
    )
    enroll: str | None = field(
        default=None, metadata={"type": str, "metavar": "CODE", "help": "enroll with this one-time code first"}
    )
    llm_url: str | None = field(
        default=None, metadata={"type": str, "metavar": "URL", "help": "base URL of the local LLM server"}
    )
    model: list[str] | None = field(
        default=None, metadata={"type": str, "metavar": "M", "help": "a model served (repeatable)"}
    )
    health_port: int | None = field(default=None, metadata={"type": int, "help": "local health port (0: off)"})
    proxy: str | None = field(default=None, metadata={"type": str, "metavar": "URL", "help": "outbound proxy"})
    ca_certs: str | None = field(
        default=None, metadata={"type": str, "metavar": "FILE", "help": "extra CA bundle for the broker"}
    )
    max_requests: int | None = field(
        default=None, metadata={"type": int, "metavar": "N", "help": "requests run at once; more are refused (4096)"}
    )


def parse_cli(argv: list[str], prog: str = "python -m connector") -> ConnectorArgs:
    parser = ArgumentParser(ConnectorArgs, prog=prog)
    for action in parser._actions:
        if action.dest in ("model", "broker_url"):  # argparse-dataclass has no "append" action
            action.__class__ = argparse._AppendAction
            action.default = None
    args: ConnectorArgs = parser.parse_args(argv)
    return args


@dataclass(frozen=True)
class Settings:
    broker_url: str
    token: str
    llm_url: str
    models: tuple[str, ...] = ()  # empty: the broker lists the LLM's models through the tunnel
    health_port: int = 0
    proxy: str | None = None
    ca_certs: str | None = None
    max_requests: int = DEFAULT_LIMITS.max_streams  # a broker asking for more at once is refused
    broker_urls: tuple[str, ...] = ()  # every --broker-url: where the fleet scouts (broker_url is the first)
    credentials_file: str | None = None  # where an enrolled connector's credential is kept
    enroll_code: str | None = None  # a one-time code to exchange for the credential first

    def __repr__(self) -> str:  # the token must not reach a log or a traceback
        return f"Settings(broker_url={self.public_broker_url!r}, llm_url={self.llm_url!r}, models={self.models!r})"

    @property
    def public_broker_url(self) -> str:
        """The broker's URL without any credentials in it: for logs and health."""
        return _without_userinfo(self.broker_url)


def resolve(args: ConnectorArgs | None, env: Mapping[str, str]) -> Settings:
    args = args or ConnectorArgs()

    def pick(value: str | None, var: str, what: str) -> str:
        chosen = value or env.get(var)
        if not chosen:
            raise SettingsError(f"{what} is required (or set {var})")
        return chosen

    given = ",".join(args.broker_url) if args.broker_url else None
    broker_urls = [u.strip().rstrip("/") for u in pick(given, "REMOTELLM_BROKER_URL", "--broker-url").split(",")]
    broker_urls = list(dict.fromkeys(u for u in broker_urls if u))
    llm_url = pick(args.llm_url, "REMOTELLM_LLM_URL", "--llm-url").rstrip("/")
    if not broker_urls or len(broker_urls) > MAX_BROKERS:
        raise SettingsError(f"--broker-url: give 1 to {MAX_BROKERS}")
    for name, url in (*(("--broker-url", u) for u in broker_urls), ("--llm-url", llm_url)):
        if not url.startswith(("http://", "https://")):
            raise SettingsError(f"{name} must start with http:// or https://")
    models = args.model or [m.strip() for m in env.get("REMOTELLM_MODELS", "").split(",") if m.strip()]
    port = args.health_port
    if port is None:
        try:
            port = int(env.get("REMOTELLM_HEALTH_PORT") or 0)
        except ValueError:
            raise SettingsError("REMOTELLM_HEALTH_PORT must be a port number") from None
    if not 0 <= port <= 65535:
        raise SettingsError("--health-port must be a port number")
    proxy = args.proxy
    if proxy is not None:
        try:
            if httpx.URL(proxy).scheme not in ("http", "https", "socks5"):
                raise ValueError
        except (httpx.InvalidURL, ValueError):
            raise SettingsError(f"--proxy is not a proxy URL: {_without_userinfo(proxy)!r}") from None
    ca_certs = args.ca_certs or env.get("REMOTELLM_CA_CERTS") or None
    if ca_certs is not None and not os.path.isfile(ca_certs):
        raise SettingsError(f"--ca-certs: no such file: {ca_certs}")
    max_requests = args.max_requests
    if max_requests is None:
        try:
            max_requests = int(env.get("REMOTELLM_MAX_REQUESTS") or DEFAULT_LIMITS.max_streams)
        except ValueError:
            raise SettingsError("REMOTELLM_MAX_REQUESTS must be a number") from None
    if max_requests < 1:
        raise SettingsError("--max-requests must be at least 1")
    token, credentials_file, enroll_code = _credential(args, env)
    return Settings(
        max_requests=max_requests,
        broker_url=broker_urls[0],
        broker_urls=tuple(broker_urls),
        token=token,
        credentials_file=credentials_file,
        enroll_code=enroll_code,
        llm_url=llm_url,
        models=tuple(dict.fromkeys(models)),
        health_port=port,
        proxy=proxy,
        ca_certs=ca_certs,
    )


def _credential(args: ConnectorArgs, env: Mapping[str, str]) -> tuple[str, str | None, str | None]:
    """The token (or enrolled credential), the credentials file, and a code to enroll with:
    an existing credentials file wins over --enroll (the code was used when it was written)."""
    token = args.token or env.get("REMOTELLM_CONNECTOR_TOKEN")
    path = args.credentials_file or env.get("REMOTELLM_CREDENTIALS_FILE") or None
    if args.enroll is not None and path is None:
        raise SettingsError("--enroll needs --credentials-file, where the credential is kept")
    if token:
        return token, path, None
    if path is not None and os.path.exists(path):
        try:
            return read_credential(path), path, None
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
    if args.enroll:
        return "", path, args.enroll
    raise SettingsError(
        "--token (or REMOTELLM_CONNECTOR_TOKEN) is required, or --credentials-file (with --enroll CODE the first time)"
    )


def _without_userinfo(url: str) -> str:
    try:
        return str(httpx.URL(url).copy_with(username=None, password=None))
    except httpx.InvalidURL:
        return "<invalid URL>"
