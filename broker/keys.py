"""Keys and tokens: parsed once into SHA-256 digests, compared in constant time.

The broker never keeps a user key or connector token in plain text after start-up,
so nothing it logs, reports or dumps can leak one.
"""

import hashlib
import hmac
import re
from collections.abc import Iterable

_PREFIX = "sha256:"
# Visible ASCII, no whitespace: what survives every header, shell and YAML unchanged. A key
# with an edge space would otherwise work in one client and fail, or leak, in another.
_VISIBLE = re.compile(r"[\x21-\x7e]+")


def digest_of(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_secret(text: str) -> bytes:
    """A secret as written in config: plain, or ``sha256:<64 hex digits>``."""
    if text.startswith(_PREFIX):
        hexdigest = text[len(_PREFIX) :].strip().lower()
        if len(hexdigest) != 64:
            raise ValueError("a sha256: secret needs exactly 64 hex digits")
        try:
            return bytes.fromhex(hexdigest)
        except ValueError:
            raise ValueError("a sha256: secret needs exactly 64 hex digits") from None
    check_visible(text)
    return digest_of(text)


def check_visible(text: str) -> str:
    """A secret must be visible ASCII without whitespace; ValueError (never quoting it) if not."""
    if not text:
        raise ValueError("a secret may not be empty")
    if not _VISIBLE.fullmatch(text):
        raise ValueError("a secret must be visible ASCII characters, without spaces or control characters")
    return text


def hash_form(secret: str) -> str:
    """What ``python -m broker hash-key`` prints: the form to paste into the YAML."""
    return _PREFIX + digest_of(secret).hex()


def find_secret(presented: str, digests: Iterable[bytes]) -> int | None:
    """Index of the digest the presented secret matches, in time independent of which."""
    candidate = digest_of(presented)
    found = None
    for index, digest in enumerate(digests):
        if hmac.compare_digest(candidate, digest) and found is None:
            found = index
    return found


def presented_key(authorization: str | None, api_key: str | None) -> str | None:
    """The key of ``Authorization: Bearer KEY``, else of ``x-api-key: KEY`` (Anthropic clients)."""
    return bearer(authorization) or (api_key.strip() if api_key and api_key.strip() else None)


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
