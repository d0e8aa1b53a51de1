"""Error bodies in the shape of the API the request belongs to: OpenAI, Anthropic or Ollama.

OpenAI: ``{"error": {"message", "type", "code"}}``; Anthropic:
``{"type": "error", "error": {"type", "message"}}``; Ollama: ``{"error": message}``.
The status code is the same whatever the shape.
"""

import msgspec

from broker.asgi import Send
from broker.routes import Family

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def routing_error(method: str, path: str, status: int) -> tuple[str, str]:
    """The code and message of a request no route takes (404, 405; else an internal error)."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "internal_error")
    return code, f"{method} {path}: {code.replace('_', ' ')}"


def error_body(status: int, code: str, message: str, family: Family = Family.OPENAI) -> bytes:
    if family is Family.ANTHROPIC:
        kind = _ANTHROPIC_TYPES.get(status, "api_error")
        return msgspec.json.encode({"type": "error", "error": {"type": kind, "message": message}})
    if family is Family.OLLAMA:
        return msgspec.json.encode({"error": message})
    kind = _OPENAI_TYPES.get(status, "server_error")
    return msgspec.json.encode({"error": {"message": message, "type": kind, "code": code}})


async def send_error(
    send: Send,
    status: int,
    code: str,
    message: str,
    headers: list[tuple[bytes, bytes]] | None = None,
    family: Family = Family.OPENAI,
) -> None:
    body = error_body(status, code, message, family)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
