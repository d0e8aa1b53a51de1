"""Every frame that crosses the tunnel.

Frames are array-like msgspec Structs with small integer tags: a token-sized chunk
costs a few bytes of envelope and well under a microsecond to encode or decode.
Request ids are integers chosen by the broker, increasing within a session.
Every frame after registration belongs to a session and is numbered by its place in
its direction (0, 1, 2, ...): a ``Batch`` opens each write and names the number of the
frame after it, so no frame carries its own (see wire/protocol.py for the rules).
Header names and values are ``str`` holding latin-1 decoded bytes, so any byte
sequence survives the round trip exactly.
"""

from typing import Literal

import msgspec

PROTOCOL_VERSION = 3  # 3: Brokers, Capacity and Slots (an older connector is refused at registration)

Headers = list[tuple[str, str]]

# How a request's token counts are known (End.usage).
UsageSource = Literal["reported", "estimated", "unknown"]

# Why a reply ended early. The broker maps each kind to the OpenAI error it returns
# (before the response head) or to a terminated stream (after it).
ErrorKind = Literal[
    "llm_unreachable",  # connect/DNS/TLS failure towards the LLM
    "llm_failed",  # the LLM broke the connection or the protocol mid-response
    "cancelled",  # the broker asked to cancel
    "forbidden",  # the connector refused the request: a method, path or header outside its bounds
    "internal",  # a bug in the connector
    "refused",  # the connector would not run it: a reused request id, too many at once, draining
    "busy",  # the connector is at its max_concurrent, over all its brokers: nothing was started
]


class _Frame(msgspec.Struct, array_like=True, tag_field="k"):
    pass


# Hello.connector_id is "<connector>.<tunnel>": the tunnels of one connector process (one to
# each broker) share the part before the separator, by which every broker knows the connector.
CONNECTOR_ID_SEPARATOR = "."


def connector_of(connector_id: str) -> str:
    """The connector a tunnel's ``Hello.connector_id`` belongs to (the same on every broker)."""
    return connector_id.partition(CONNECTOR_ID_SEPARATOR)[0]


class Hello(_Frame, tag=1):
    """Connector → broker registration (the body of the register call).

    An empty ``models`` asks the broker to discover them by listing the LLM's models
    through the tunnel, because only the broker holds the LLM key that listing may need.
    """

    connector_id: str
    version: str
    models: list[str]
    protocol: int = PROTOCOL_VERSION


class Welcome(_Frame, tag=2):
    """Broker → connector answer to Hello.

    ``session`` is the resume credential: polls and uplinks present it with the token,
    and with both a connector that lost its connections resumes the same session within
    ``resume_grace`` seconds. It is a secret, bound to the token that registered.
    ``broker`` names the broker process that holds the session: the connector pins its
    polls and uplinks to it (wire.endpoints.BROKER_HEADER), whatever balances in between.
    """

    session: str
    ping_interval: float
    resume_grace: float = 30.0
    broker: str = ""


class Request(_Frame, tag=3):
    """Broker → connector: one HTTP request to replay against the LLM.

    With ``more_body`` the body goes on in ``Body`` frames, as the connector's credit
    allows (an upload streamed through, never buffered whole).
    """

    id: int
    method: str
    path: str
    query: str
    headers: Headers
    body: bytes
    llm_api_key: str | None = None
    more_body: bool = False

    def __repr__(self) -> str:  # the LLM key and the body stay out of logs and tracebacks
        return f"Request(id={self.id}, method={self.method!r}, path={self.path!r}, body={len(self.body)} bytes)"


class Head(_Frame, tag=4):
    """Connector → broker: the LLM's status line and headers.

    ``llm_ms`` is how long the LLM took to send them, so the broker can tell its users
    what the bridge itself added.
    """

    id: int
    status: int
    headers: Headers
    llm_ms: float = 0.0


class Chunk(_Frame, tag=5):
    """Connector → broker: response body bytes, exactly as the LLM sent them."""

    id: int
    data: bytes


class End(_Frame, tag=6):
    """Connector → broker: the reply is over; ``error`` says why if it failed.

    The tokens are what the connector read from the LLM's answer: ``reported`` by the LLM,
    ``estimated`` from what was delivered (a stream cut short), or ``unknown``.
    """

    id: int
    error: ErrorKind | None = None
    detail: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage: UsageSource = "unknown"


class Cancel(_Frame, tag=7):
    """Broker → connector: the user went away or a timeout fired; abort the LLM call."""

    id: int


class Ping(_Frame, tag=8):
    """Broker → connector keepalive; ``sent`` is the broker's wall clock.

    ``pong`` echoes the last Pong the broker received (its ``ping_sent``): the connector's
    proof that its uploads arrive — a proxy that holds request bodies shows as no echo.
    """

    sent: float
    pong: float = 0.0


class Drain(_Frame, tag=9):
    """Either way: the sender is leaving; finish what is in flight, start nothing new.

    Broker → connector (on the poll): reconnect, this broker is shutting down.
    Connector → broker (in a reply body): stop routing to me, I leave when my replies end.
    """

    reason: str


class Models(_Frame, tag=10):
    """Broker → connector: the models the broker now routes to this connector."""

    models: list[str]


class Credit(_Frame, tag=11):
    """Either way: the receiver of a body consumed ``bytes`` more of it; send that much more.

    Broker → connector: the user read that much of the reply. Connector → broker: the
    LLM took that much of the request body. Per-request flow control: a slow reader holds
    back its own body at the sender, never the other's memory or the other requests.
    """

    id: int
    bytes: int


class Pong(_Frame, tag=12):
    """Connector → broker heartbeat, echoing the last Ping's ``sent`` (0 before any)."""

    ping_sent: float


class Batch(_Frame, tag=13):
    """Either way, first in every write of a session.

    ``seq`` is the number of the frame that follows it (later ones count on from there);
    ``ack`` is how many frames of the other direction the sender has received. A Batch
    alone is an acknowledgement.
    """

    seq: int
    ack: int


class Body(_Frame, tag=14):
    """Broker → connector: more of a request body (``Request.more_body``); ``more``
    is False on the last piece."""

    id: int
    data: bytes
    more: bool = True


class Brokers(_Frame, tag=15):
    """Broker → connector: the live brokers, as (broker id, URL) pairs; the connector holds
    a session to each. An empty URL means the one the connector reached this broker at
    (worker processes sharing one port). Sent after registration and when the set changes.
    """

    brokers: list[tuple[str, str]]


class Capacity(_Frame, tag=20):
    """Broker → connector: the connector's ``max_concurrent`` in this broker's configuration
    (0: no cap), before any request and again when a reload changes it. The connector holds
    the smallest cap any of its brokers gives, over all its sessions together."""

    max_concurrent: int


class Slots(_Frame, tag=21):
    """Connector → broker, to each broker that gave it a cap: how many more requests it takes
    now, over all its brokers. Sent when the number changes (coalesced), so brokers route
    away from a connector that is full because of the others' requests."""

    free: int


Frame = (
    Hello | Welcome | Request | Head | Chunk | End | Cancel | Ping | Drain | Models | Credit | Pong | Batch | Body
    | Brokers | Capacity | Slots
)  # fmt: skip

# Bytes of reply body a connector may send ahead of the user's reading.
INITIAL_CREDIT = 128 * 1024
# Bytes of request body the broker may send ahead of the LLM's reading: larger, because
# an upload is one long transfer whose speed is this window per round trip.
UPLOAD_CREDIT = 1024 * 1024
