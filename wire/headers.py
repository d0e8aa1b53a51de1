"""Which headers cross the bridge, each way, and what a valid header is.

One policy for both sides: the broker applies it before a request enters the tunnel and
before a response reaches a user; the connector applies the request half again, in case
the broker is not the one it should be.
"""

import re

# Request headers that describe the user's hop, or carry a credential of the user's:
# the LLM must not see them (the broker's own key for it travels separately).
_REQUEST_DROPPED = frozenset(
    {
        "authorization",
        "x-api-key",
        "api-key",
        "cookie",
        "forwarded",
        "x-real-ip",
        "via",
        "x-client-ip",
        "true-client-ip",
        "host",
        "origin",  # Ollama answers 403 to a foreign Origin
        "content-length",  # set from the body actually sent
        "expect",
        "http2-settings",
    }
)
_REQUEST_DROPPED_PREFIXES = ("x-forwarded-", "proxy-")
# Connection-specific (hop-by-hop) headers, never forwarded either way (RFC 9110 7.6.1);
# HTTP/2 forbids them outright.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)
# Response headers that would act on the broker's origin in the user's client.
_RESPONSE_DROPPED = frozenset({"set-cookie", "set-cookie2", "alt-svc", "strict-transport-security"})

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


def forwardable_request_header(name: str) -> bool:
    """Whether a user's request header (name in lower case) may reach the LLM."""
    return not (name in _REQUEST_DROPPED or name in HOP_BY_HOP or name.startswith(_REQUEST_DROPPED_PREFIXES))


def forwardable_response_header(name: str) -> bool:
    """Whether an LLM's response header (name in lower case) may reach the user."""
    return name not in _RESPONSE_DROPPED and name not in HOP_BY_HOP


def valid_header(name: str, value: str) -> bool:
    """A field name that is a token and a value without CR, LF or NUL (latin-1 text)."""
    return _TOKEN.fullmatch(name) is not None and _VALUE.fullmatch(value) is not None


def valid_status(status: int) -> bool:
    """A final response status a user can be sent (1xx are interim, never final)."""
    return 200 <= status <= 599
