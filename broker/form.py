"""The ``model`` field of a multipart form, found in the head of a body still arriving."""

import re

# How much of a form's head is searched for the model: clients put their fields before
# the file, so a model further in is refused rather than read (and held) for.
MODEL_SCAN_LIMIT = 1024 * 1024
_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,70})"|([^";\s]{1,70}))', re.IGNORECASE)
_MODEL_PART = re.compile(rb'^content-disposition:[^\r\n]*;\s*name="?model"?\s*(?:;|\r|$)', re.IGNORECASE | re.MULTILINE)
_FILE_PART = re.compile(rb";\s*filename\*?=", re.IGNORECASE)
Head = bytes | bytearray


class FormModel:
    """Searches the head of a multipart/form-data body, as it grows, for its ``model``
    field. Each look goes on where the last one stopped: a head that grows a byte at a
    time costs no more than one that comes whole."""

    __slots__ = ("_delimiter", "_from", "_part", "ended", "model")

    def __init__(self, boundary: str | None) -> None:
        # Every delimiter but a first one at the very start is CRLF--boundary.
        self._delimiter = None if boundary is None else b"\r\n--" + boundary.encode("latin-1")
        self._from = 0  # where the search for the next delimiter goes on
        self._part: int | None = None  # where the part after the last delimiter starts
        # No model will follow: the form's closing delimiter was seen, or the body is no form.
        self.ended = boundary is None
        self.model: str | None = None

    @classmethod
    def of(cls, content_type: str | None) -> "FormModel":
        """A searcher for a body of this type (one that finds nothing in any but a form)."""
        if content_type is None or not content_type.lower().startswith("multipart/form-data"):
            return cls(None)
        found = _BOUNDARY.search(content_type)
        return cls(None if found is None else found.group(1) or found.group(2))

    def enough(self, head: Head) -> bool:
        """Whether ``head`` (what arrived so far, grown since the last call) settles it: the
        model found (``model``; empty if it is not UTF-8), or never to be found."""
        if self.model is None and not self.ended:
            self.model = self._scan(head)
        return self.model is not None or self.ended or len(head) >= MODEL_SCAN_LIMIT

    def _scan(self, data: Head) -> str | None:
        delimiter = self._delimiter
        assert delimiter is not None
        if self._part is None and self._from == 0:  # the usual first delimiter has no CRLF
            dash = delimiter[2:]
            if len(data) < len(dash) and dash.startswith(data):
                return None
            if data.startswith(dash):
                self._part = self._from = len(dash)
        while True:
            part = self._part
            if part is not None and len(data) >= part + 2 and data[part : part + 2] == b"--":
                self.ended = True  # the closing delimiter
                return None
            at = data.find(delimiter, self._from)
            if at < 0:
                self._from = max(self._from, len(data) - len(delimiter) + 1)
                return None
            self._part = self._from = at + len(delimiter)
            if part is not None:
                value = _model_value(data, part, at)
                if value is not None:
                    return value


def _model_value(data: Head, start: int, end: int) -> str | None:
    """The value of the part in ``data[start:end]`` if it is the model field."""
    headers_end = data.find(b"\r\n\r\n", start, end)
    if headers_end < 0:
        return None
    headers = bytes(data[start:headers_end])
    if not _MODEL_PART.search(headers) or _FILE_PART.search(headers):
        return None
    try:
        return bytes(data[headers_end + 4 : end]).decode("utf-8")
    except UnicodeDecodeError:
        return ""
