"""Who is asking: named users (with their models and limits), unnamed user keys, admin keys.

Keys are held as digests only and matched in constant time (broker.keys); a user is
known by name from here on — in usage, metrics and logs — never by key.
"""

from dataclasses import dataclass, field
from typing import Protocol

from broker.keys import find_secret, presented_key
from broker.limits import Limits


@dataclass(frozen=True, slots=True)
class User:
    """A user as configured; ``name`` None for the unnamed keys of ``user_api_keys``."""

    name: str | None
    key_digest: bytes = field(repr=False)
    models: frozenset[str] | None = None  # None: every model
    limits: Limits = field(default_factory=Limits)

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class Caller:
    """The holder of a presented key: a user, an admin, or (for an admin's own key used as
    a user key) both."""

    user: User | None
    admin: bool


class Users:
    """Every key the broker accepts from people, looked up in time independent of which."""

    def __init__(self, users: tuple[User, ...], admin_digests: tuple[bytes, ...]) -> None:
        self._users = users
        self._user_digests = tuple(user.key_digest for user in users)
        self._admin_digests = admin_digests

    def identify(self, authorization: str | None, api_key: str | None) -> Caller | None:
        """The caller behind ``Authorization: Bearer KEY`` or ``x-api-key: KEY``; None if unknown."""
        key = presented_key(authorization, api_key)
        if key is None:
            return None
        index = find_secret(key, self._user_digests)
        admin = find_secret(key, self._admin_digests) is not None
        user = self._users[index] if index is not None else None
        return Caller(user, admin) if user is not None or admin else None


class _HasUsers(Protocol):
    @property
    def users(self) -> tuple[User, ...]: ...
    @property
    def user_key_digests(self) -> tuple[bytes, ...]: ...
    @property
    def admin_key_digests(self) -> tuple[bytes, ...]: ...


def users_of(settings: _HasUsers) -> Users:
    """The named users, then one unnamed user per plain user key, and the admin keys."""
    unnamed = tuple(User(None, digest) for digest in settings.user_key_digests)
    return Users(settings.users + unnamed, settings.admin_key_digests)
