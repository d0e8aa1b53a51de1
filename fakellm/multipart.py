"""A sans-IO, streaming multipart/form-data parser: bounded memory whatever the upload's size."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Literal

HEAD_LIMIT = 16384  # a part's headers; more is refused rather than buffered


class Event:
    """`start` (a part's name and filename), `data` (some of its bytes) or `end` (of the part)."""

    __slots__ = ("data", "filename", "kind", "name")

    def __init__(
        self, kind: Literal["start", "data", "end"], data: bytes = b"", name: str = "", filename: str | None = None
    ) -> None:
        self.kind, self.data, self.name, self.filename = kind, data, name, filename


class Multipart:
    """Feed the body in chunks split anywhere; get the parts' events back in order."""

    def __init__(self, content_type: str) -> None:
        found = re.search(r'boundary="?([^";]+)"?', content_type)
        if not content_type.lower().startswith("multipart/form-data") or found is None:
            raise ValueError("not a multipart/form-data body with a boundary")
        # Seen from a CRLF put before the body, every delimiter is CRLF--boundary, the first too.
        self._delimiter = b"\r\n--" + found.group(1).encode("latin-1")
        self._buffer = b"\r\n"
        self._state: Literal["preamble", "after", "head", "data", "done"] = "preamble"

    def feed(self, chunk: bytes) -> Iterator[Event]:
        self._buffer += chunk
        while (event := self._step()) is not None:
            yield event

    def _step(self) -> Event | None:
        """One event from the buffer, or None when more bytes are needed."""
        buffer = self._buffer
        if self._state in ("preamble", "data"):
            at = buffer.find(self._delimiter)
            if at < 0:
                # Keep what could be the start of a delimiter split across chunks.
                cut = max(0, len(buffer) - len(self._delimiter) + 1)
                self._buffer = buffer[cut:]
                return Event("data", buffer[:cut]) if self._state == "data" and cut else None
            if at and self._state == "data":
                self._buffer = buffer[at:]
                return Event("data", buffer[:at])
            self._buffer = buffer[at + len(self._delimiter) :]
            was, self._state = self._state, "after"
            return Event("end") if was == "data" else self._step()
        if self._state == "after":
            if len(buffer) < 2:
                return None
            self._state = "done" if buffer.startswith(b"--") else "head"
            self._buffer = buffer[2:]
            return None if self._state == "done" else self._step()
        if self._state == "head":
            return self._head(buffer)
        self._buffer = b""  # epilogue
        return None

    def _head(self, buffer: bytes) -> Event | None:
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > HEAD_LIMIT:
                raise ValueError("multipart part headers too long")
            return None
        head = buffer[:end].decode("latin-1")
        self._buffer = buffer[end + 4 :]
        self._state = "data"
        name = re.search(r'\bname="([^"]*)"', head)
        filename = re.search(r'\bfilename="([^"]*)"', head)
        return Event("start", name=name.group(1) if name else "", filename=filename.group(1) if filename else None)
