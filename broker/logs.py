"""One log line per request, plain or JSON. Secrets never reach these fields."""

import logging
import sys

import msgspec

from broker.settings import LogFormat

log = logging.getLogger("remotellm.broker")
_access = logging.getLogger("remotellm.access")


def setup() -> None:
    """Log to stderr unless the host application configured our loggers itself."""
    root = logging.getLogger("remotellm")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


class RequestLog:
    def __init__(self, fmt: LogFormat) -> None:
        self._json = fmt == "json"

    def write(self, **fields: object) -> None:
        if not _access.isEnabledFor(logging.INFO):
            return
        if self._json:
            _access.info(msgspec.json.encode(fields).decode())
        else:
            _access.info(" ".join(f"{k}={v}" for k, v in fields.items()))
