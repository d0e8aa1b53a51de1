"""A connector's credentials file: one JSON object, mode 0600, replaced atomically.

The file is written to a new name created with mode 0600 (O_EXCL: never someone else's
file, never readable by others even for a moment), then renamed over the old one, so a
crash leaves either the old file or the new one whole.
"""

import json
import logging
import os
import re
import stat
from pathlib import Path

log = logging.getLogger("remotellm.connector")

MAX_FILE = 4096  # a credentials file is a few hundred bytes
CREDENTIAL_LIMIT = 512  # a credential longer than this is not the broker's
_VISIBLE = re.compile(r"[\x21-\x7e]+")  # what a header carries unchanged


def usable(credential: object) -> bool:
    """Whether this is a credential the connector can present: short, visible ASCII."""
    return isinstance(credential, str) and bool(_VISIBLE.fullmatch(credential)) and len(credential) <= CREDENTIAL_LIMIT


def read_credential(path: str) -> str:
    """The credential in a credentials file; ValueError when it is unreadable or not one."""
    try:
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            data = file.read(MAX_FILE + 1)
    except OSError as exc:
        raise ValueError(f"--credentials-file {path}: cannot read: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("credentials file %s is readable by others: chmod 600 it", path)
    try:
        credential = json.loads(data)["credential"] if len(data) <= MAX_FILE else None
    except (ValueError, KeyError, TypeError):
        credential = None
    if not usable(credential):
        raise ValueError(f"--credentials-file {path}: not a remotellm credentials file")
    return str(credential)


def write_credential(path: str, name: str, credential: str) -> None:
    """Writes the file atomically with mode 0600."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(temporary, flags, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            os.fchmod(file.fileno(), 0o600)  # the umask could only have narrowed it; be exact
            json.dump({"name": name, "credential": credential}, file)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)
