"""The tunnel protocol between broker and connector, sans-IO.

Frames are msgspec Structs encoded as msgpack and length-prefixed; both sides and
the tests import this one definition. Nothing here touches a socket or an event loop.
"""

from wire.endpoints import (
    DEAD_AFTER_PINGS,
    FRAMES_CONTENT_TYPE,
    POLL_PATH,
    RECEIVED_HEADER,
    REGISTER_PATH,
    REPLY_PATH,
    SESSION_HEADER,
    SHORT_POLL_QUERY,
)
from wire.frames import (
    INITIAL_CREDIT,
    PROTOCOL_VERSION,
    UPLOAD_CREDIT,
    Batch,
    Body,
    Cancel,
    Chunk,
    Credit,
    Drain,
    End,
    ErrorKind,
    Frame,
    Head,
    Hello,
    Models,
    Ping,
    Pong,
    Request,
    Welcome,
)
from wire.framing import MAX_FRAME_SIZE, FrameDecoder, FrameError, decode_all, encode, encode_many
from wire.limits import DEFAULT_LIMITS, Limits, check_models
from wire.protocol import BrokerConnection, ConnectorConnection, Inbound, ProtocolError, ReplyState

__all__ = [
    "DEAD_AFTER_PINGS",
    "DEFAULT_LIMITS",
    "FRAMES_CONTENT_TYPE",
    "INITIAL_CREDIT",
    "MAX_FRAME_SIZE",
    "POLL_PATH",
    "PROTOCOL_VERSION",
    "RECEIVED_HEADER",
    "REGISTER_PATH",
    "REPLY_PATH",
    "SESSION_HEADER",
    "SHORT_POLL_QUERY",
    "UPLOAD_CREDIT",
    "Batch",
    "Body",
    "BrokerConnection",
    "Cancel",
    "Chunk",
    "ConnectorConnection",
    "Credit",
    "Drain",
    "End",
    "ErrorKind",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "Head",
    "Hello",
    "Inbound",
    "Limits",
    "Models",
    "Ping",
    "Pong",
    "ProtocolError",
    "ReplyState",
    "Request",
    "Welcome",
    "check_models",
    "decode_all",
    "encode",
    "encode_many",
]
