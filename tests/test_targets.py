"""wire.targets and wire.headers: what counts as a canonical target and a forwardable header."""

from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wire.headers import forwardable_request_header, forwardable_response_header, valid_header, valid_status
from wire.targets import canonical_path, canonical_query

CANONICAL = ["/v1/chat/completions", "/v1/responses/resp_abc-123", "/api/chat", "/v1/a:b@c", "/v1/x%41y", "/"]
REFUSED = [
    "",
    "v1/chat/completions",  # not origin-form
    "http://other-host/v1/chat/completions",  # absolute-form
    "//other-host/v1/x",
    "/v1/../api/create",
    "/v1/./chat/completions",
    "/v1/%2e%2e/api/create",
    "/v1/%2E./api/create",
    "/v1/.%2e/api/create",
    "/v1/..",
    "/v1//chat/completions",
    "/v1/chat/completions/",
    "/v1/%2Fv1%2F@other-host:8080/x",
    "/v1/a%2fb",
    "/v1/a%5Cb",
    "/v1/a\\b",
    "/v1/a%00b",
    "/v1/a%0d%0aX-Injected:1",
    "/v1/a\rb",
    "/v1/a b",
    "/v1/a%zz",
    "/v1/a%4",
    "/v1/é",
    "/v1/a#frag",
    "/v1/a?b",
    "/v1/a%7Fb",
]


@pytest.mark.parametrize("path", CANONICAL)
def test_canonical_paths(path: str) -> None:
    assert canonical_path(path)


@pytest.mark.parametrize("path", REFUSED)
def test_refused_paths(path: str) -> None:
    assert not canonical_path(path)


@pytest.mark.parametrize("query", ["", "a=1&b=2", "x=%2F..%2F", "q=a/b?c", "api-version=2024-10-21"])
def test_canonical_queries(query: str) -> None:
    assert canonical_query(query)


@pytest.mark.parametrize("query", ["a=1#f", "a=\r\n", "a b", "a=é", "a=\\", "a=%zz", "x" * 9000])
def test_refused_queries(query: str) -> None:
    assert not canonical_query(query)


@given(st.text(max_size=60))
def test_a_canonical_path_decodes_to_the_same_segments_everywhere(path: str) -> None:
    """Whatever a parser does with escapes, a canonical path keeps its segments: none is
    empty or a dot segment, and no escape introduces a separator or a control byte."""
    if not canonical_path(path) or path == "/":
        return
    segments = path[1:].split("/")
    decoded = [unquote(segment) for segment in segments]
    assert all(segment and segment not in (".", "..") for segment in decoded)
    assert all("/" not in d and "\\" not in d and not any(ord(c) < 32 or ord(c) == 127 for c in d) for d in decoded)
    assert path.isascii()


@pytest.mark.parametrize(
    "name",
    ["authorization", "cookie", "x-api-key", "api-key", "forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip",
     "proxy-authorization", "proxy-foo", "connection", "keep-alive", "te", "transfer-encoding", "upgrade", "host",
     "origin", "content-length"],
)  # fmt: skip
def test_request_headers_that_never_reach_the_llm(name: str) -> None:
    assert not forwardable_request_header(name)


@pytest.mark.parametrize("name", ["content-type", "accept", "user-agent", "anthropic-version", "anthropic-beta"])
def test_request_headers_that_do(name: str) -> None:
    assert forwardable_request_header(name)


@pytest.mark.parametrize(
    "name", ["set-cookie", "alt-svc", "strict-transport-security", "connection", "transfer-encoding"]
)
def test_response_headers_that_never_reach_the_user(name: str) -> None:
    assert not forwardable_response_header(name)
    assert forwardable_response_header("content-type")


@pytest.mark.parametrize(
    ("name", "value", "valid"),
    [
        ("content-type", "text/event-stream", True),
        ("x-a", "tab\tinside", True),
        ("x-a", "a\r\nx-injected: 1", False),
        ("x-a", "nul\x00", False),
        ("bad name", "v", False),
        (":status", "200", False),
        ("x-a\n", "v", False),
        ("", "v", False),
    ],
)
def test_valid_header(name: str, value: str, valid: bool) -> None:
    assert valid_header(name, value) is valid


def test_valid_status() -> None:
    assert [s for s in (0, 99, 100, 101, 199, 200, 404, 599, 600, 1000) if valid_status(s)] == [200, 404, 599]
