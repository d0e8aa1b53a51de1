"""The forwarded API: which method and path may reach a connector, and what else is refused.

Only the contract's routes (and an operator's ``allowed_paths``) are forwarded; any other
path under the broker answers 404 and never reaches a connector. Paths here are compared
as sent (still percent-encoded): the target was already checked to be canonical.
"""

from enum import Enum

from wire.targets import canonical_path


class Family(Enum):
    """Which API a path belongs to: it decides the shape of the broker's error bodies."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    OLLAMA = "ollama"


# POST routes whose JSON body names the model.
JSON_MODEL_ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/rerank",
        "/v1/images/generations",
        "/v1/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/audio/speech",
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/embeddings",
        "/api/show",
    }
)
# POST routes whose multipart form names the model: the upload after it is streamed through.
FORM_MODEL_ROUTES = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})
RESPONSES_PATH = "/v1/responses"
# The Responses API's routes by id: (method, suffix after the id).
_BY_ID = frozenset({("GET", ""), ("DELETE", ""), ("POST", "/cancel"), ("GET", "/input_items")})
# Ollama's model management: it would change what every user of the LLM gets.
MANAGEMENT_ROUTES = frozenset({"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"})
_MANAGEMENT_PREFIX = "/api/blobs/"


def family(path: str) -> Family:
    if path.startswith("/api/"):
        return Family.OLLAMA
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return Family.ANTHROPIC
    return Family.OPENAI


def responses_object_id(method: str, path: str) -> str | None:
    """The id in a by-id route of the Responses API (``GET /v1/responses/{id}``...), else None."""
    if not path.startswith(RESPONSES_PATH + "/"):
        return None
    object_id, slash, rest = path[len(RESPONSES_PATH) + 1 :].partition("/")
    suffix = slash + rest
    return object_id if object_id and (method, suffix) in _BY_ID else None


def management(path: str) -> bool:
    """Ollama's model-management routes: refused with 403, never forwarded."""
    return path in MANAGEMENT_ROUTES or path.startswith(_MANAGEMENT_PREFIX)


def validate_allowed_path(path: str) -> str:
    """An operator's extra POST path, checked at load; ValueError says what is wrong."""
    if not isinstance(path, str) or not canonical_path(path):
        raise ValueError(f"{path!r} is not a canonical path such as /v1/load_lora_adapter")
    if management(path):
        raise ValueError(f"{path} manages the LLM's models and is never forwarded")
    return path
