"""Canonical request targets: the one rule both sides apply before a path goes near an LLM.

A target is canonical when it is an origin-form path (``/a/b``) whose every segment is
plain text: no dot segments (raw or percent-encoded), no empty segments, no encoded
``/`` or ``\\``, no backslash, no control or non-ASCII byte, and percent-escapes only
where they are well formed. Anything else means different things to different URL
parsers on the way (the broker's router, httpx, the LLM's framework), which is how a
path walks out of ``/v1/`` or a request reaches another host: so it is refused, never
"normalised".
"""

import re

# RFC 3986 pchar without "%" (escapes are checked on their own): unreserved, sub-delims, ":", "@".
_SEGMENT = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})+")
# A query may also hold "/" and "?"; still no space, control byte, "#", backslash or non-ASCII.
_QUERY = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")
# Escapes that decode to a separator, a control byte or DEL: never inside a segment.
_BAD_ESCAPE = re.compile(r"%(?:2[Ff]|5[Cc]|[01][0-9A-Fa-f]|7[Ff])")
_DOTS = frozenset({".", ".."})
MAX_TARGET = 8192


def canonical_path(path: str) -> bool:
    """Whether ``path`` (still percent-encoded, without the query) is a canonical origin-form path."""
    if len(path) > MAX_TARGET or not path.startswith("/"):
        return False
    if path == "/":
        return True
    for segment in path[1:].split("/"):
        if not _SEGMENT.fullmatch(segment) or _BAD_ESCAPE.search(segment):
            return False
        if _decoded_dots(segment) in _DOTS:
            return False
    return True


def canonical_query(query: str) -> bool:
    """Whether ``query`` (without the ``?``) may be forwarded as it is."""
    return len(query) <= MAX_TARGET and _QUERY.fullmatch(query) is not None


def _decoded_dots(segment: str) -> str:
    """The segment with %2E decoded: ``%2e%2E`` is ``..`` to most servers."""
    return segment.replace("%2e", ".").replace("%2E", ".")
