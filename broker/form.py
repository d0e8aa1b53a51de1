"""The ``model`` field of a multipart form, found in the head of a body still arriving."""

import re

# How much of a form's head is searched for the model: clients put their fields before
# the file, so a model further in is refused rather than read (and held) for.
MODEL_SCAN_LIMIT = 1024 * 1024
_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,70})"|([^";\s]{1,70}))', re.IGNORECASE)
_MODEL_PART = re.compile(rb'^content-disposition:[^\r\n]*;\s*name="?model"?\s*(?:;|\r|$)', re.IGNORECASE | re.MULTILINE)
_FILE_PART = re.compile(rb";\s*filename\*?=", re.IGNORECASE)


class FormModel:
    """Searches the head of a multipart/form-data body for its ``model`` field."""

    __slots__ = ("_delimiter", "ended", "model")

    def __init__(self, boundary: str | None) -> None:
        # Seen from a CRLF put before the body, every delimiter is CRLF--boundary, the first too.
        self._delimiter = None if boundary is None else b"\r\n--" + boundary.encode("latin-1")
        # No model will follow: the form's closing delimiter was seen, or the body is no form.
        self.ended = boundary is None
        self.model: str | None = None

    def enough(self, head: bytes) -> bool:
        """Whether ``head`` settles it: the model found (``model``), or never to be found."""
        self.model = self.find(head)
        return self.model is not None or self.ended or len(head) >= MODEL_SCAN_LIMIT

    @classmethod
    def of(cls, content_type: str | None) -> "FormModel":
        """A searcher for a body of this type (one that finds nothing in any but a form)."""
        if content_type is None or not content_type.lower().startswith("multipart/form-data"):
            return cls(None)
        found = _BOUNDARY.search(content_type)
        return cls(None if found is None else found.group(1) or found.group(2))

    def find(self, head: bytes) -> str | None:
        """The model named in ``head`` once its whole part is there, else None (for now).

        A value that is not UTF-8 is reported as empty: the caller refuses it."""
        data, delimiter = b"\r\n" + head, self._delimiter
        if delimiter is None:
            return None
        at = data.find(delimiter)
        while at >= 0:
            start = at + len(delimiter)
            if data.startswith(b"--", start):
                self.ended = True
                return None
            headers_end = data.find(b"\r\n\r\n", start)
            end = data.find(delimiter, headers_end + 4) if headers_end >= 0 else -1
            if end < 0:
                return None
            headers = data[start:headers_end]
            if _MODEL_PART.search(headers) and not _FILE_PART.search(headers):
                try:
                    return data[headers_end + 4 : end].decode("utf-8")
                except UnicodeDecodeError:
                    return ""
            at = end
        return None
