"""Length-prefixed msgpack framing and an incremental decoder.

Each frame is a 4-byte big-endian length followed by that many bytes of msgpack:
msgpack values back to back are not self-delimiting, and the prefix lets the decoder
reject an oversize frame before buffering a byte of it.
"""

import struct
from collections.abc import Iterable

import msgspec

from wire.frames import Frame

# Large enough for a request body at the broker's largest allowed size plus headers.
MAX_FRAME_SIZE = 64 * 1024 * 1024

_LENGTH = struct.Struct(">I")  # the prefix: a 4-byte big-endian length
_PREFIX = _LENGTH.size
_read_prefix = _LENGTH.unpack_from  # (int.from_bytes of a memoryview slice costs a third more per frame)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)


class FrameError(ValueError):
    """The byte stream is not a valid sequence of frames; the stream must be dropped."""


def encode(frame: Frame) -> bytes:
    """One frame with its length prefix."""
    payload = _encoder.encode(frame)
    return _LENGTH.pack(len(payload)) + payload


def encode_many(frames: Iterable[Frame]) -> bytes:
    """Frames that are ready together, in one buffer, so they cost one write."""
    buf = bytearray()
    for frame in frames:
        start = len(buf)
        _encoder.encode_into(frame, buf, start + _PREFIX)
        _LENGTH.pack_into(buf, start, len(buf) - start - _PREFIX)
    return bytes(buf)


class FrameDecoder:
    """Feed it byte slices as they arrive; it returns the frames they complete.

    Once the stream turns out to be invalid, ``feed`` raises FrameError — after first
    returning the valid frames that came before the fault, so none of them is lost.
    """

    __slots__ = ("_buf", "_error", "_max", "_pos")

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._max = max_frame_size
        self._error: FrameError | None = None

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a whole frame (non-zero at EOF = truncated)."""
        return len(self._buf) - self._pos

    def finish(self) -> None:
        """At the end of the stream: raise if it was invalid or stopped inside a frame."""
        if self._error is not None:
            raise self._error
        if self.pending:
            raise FrameError(f"the stream ended inside a frame ({self.pending} bytes left)")

    def feed(self, data: bytes) -> list[Frame]:
        if self._error is not None:
            raise self._error
        buf = self._buf
        if self._pos and self._pos == len(buf):
            buf.clear()
            self._pos = 0
        buf += data
        frames: list[Frame] = []
        pos = self._pos
        end = len(buf)
        view = memoryview(buf)
        try:
            while end - pos >= _PREFIX:
                (size,) = _read_prefix(buf, pos)
                if size > self._max:
                    raise FrameError(f"frame of {size} bytes exceeds the {self._max}-byte limit")
                if end - pos - _PREFIX < size:
                    break
                start = pos + _PREFIX
                try:
                    frames.append(_decoder.decode(view[start : start + size]))
                except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                    raise FrameError(f"undecodable frame: {exc}") from None
                pos = start + size
        except FrameError as exc:
            self._error = exc
            if not frames:
                raise
        finally:
            view.release()
        if pos > 65536 and pos * 2 > end:
            del buf[:pos]
            pos = 0
        self._pos = pos
        return frames


def decode_all(data: bytes, max_frame_size: int = MAX_FRAME_SIZE) -> list[Frame]:
    """Every frame of a complete body; FrameError if any byte of it is not a valid frame."""
    decoder = FrameDecoder(max_frame_size)
    frames = decoder.feed(data)
    decoder.finish()
    return frames
