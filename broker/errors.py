"""OpenAI-shaped error bodies: ``{"error": {"message", "type", "code"}}``."""

import msgspec

from broker.asgi import Send

_TYPES = {
    401: "invalid_request_error",
    400: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(status: int, code: str, message: str) -> bytes:
    kind = _TYPES.get(status, "server_error")
    return msgspec.json.encode({"error": {"message": message, "type": kind, "code": code}})


async def send_error(
    send: Send, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = error_body(status, code, message)
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
