"""What the connector has learned about its path to the broker; each flag only ever moves
to the safe side."""

import logging

from connector.links import speaks_h2c
from connector.settings import Settings

log = logging.getLogger("remotellm.connector")


class PathProfile:
    """HTTP/2 or not, and whether something on the way buffers whole bodies."""

    def __init__(self, settings: Settings) -> None:
        self._cleartext = settings.broker_url.startswith("http://")
        self.http2 = not self._cleartext or speaks_h2c(settings)
        # Responses or uploads arrive only when they end (a buffering proxy): short polls
        # and batched short uplinks then, instead of long-lived streams.
        self.buffering = False
        self._late_first_frames = 0

    def observe_h2c_refused(self) -> bool:
        """Cleartext HTTP/2 failed on the way (a proxy, an HTTP/1.1 server): True if it changed."""
        if not (self.http2 and self._cleartext):
            return False
        log.warning("cleartext HTTP/2 refused on the way to the broker: falling back to HTTP/1.1")
        self.http2 = False
        return True

    def observe_first_frame(self) -> None:
        self._late_first_frames = 0

    def observe_late_first_frame(self) -> bool:
        """A poll's first frame did not come in time; True once that is the path's habit.

        Twice in a row, not once: a slow connect or TLS handshake looks the same.
        """
        self._late_first_frames += 1
        if self._late_first_frames < 2 or self.buffering:
            return False
        log.warning("responses from the broker arrive only when they end (a buffering proxy?): "
                    "switching to short polls and batched replies")  # fmt: skip
        self.buffering = True
        return True

    def observe_held_uploads(self) -> bool:
        """Heartbeats go unechoed while the poll works: True if the mode changed."""
        if self.buffering:
            return False
        log.warning("uploads to the broker arrive only when they end (a buffering proxy?): "
                    "switching to short polls and batched replies")  # fmt: skip
        self.buffering = True
        return True

    def describe(self, http_version: str) -> str:
        return http_version + (" with short polls" if self.buffering else "")
