"""The connector's tunnels: one to every live broker, learnt from any broker's list.

It starts with a tunnel to each --broker-url (a scout: whichever broker answers there).
Each broker lists the live brokers (wire.Brokers); a broker listed and not held gets a
tunnel pinned to its id, at its own URL. A tunnel whose broker is missing from every list
for DROP_GRACE is drained; a scout whose broker lists itself at another URL hands over to
a pinned tunnel there (a balancer between connector and broker is not needed once the
broker is known). Two tunnels to one broker: the second ends. With no tunnel up for
SCOUT_AFTER, the --broker-url(s) are dialled again. A broker alone sends no list: then the
scout is the one tunnel, as it was before there were several.

Lists come from brokers, so they are hostile input: bounded (wire.check_brokers), and the
fleet never holds more than MAX_BROKERS tunnels, nor dials cleartext to another machine
unless a --broker-url is cleartext already.
"""

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from connector.llm import LLMClient
from connector.rotation import Rotation
from connector.settings import Settings
from connector.slots import SlotCounter
from connector.tunnel import Status, Tunnel
from wire import MAX_BROKERS
from wire.endpoints import loopback

log = logging.getLogger("remotellm.connector")

DROP_GRACE = 5.0  # a broker missing from every list this long loses its tunnel (seconds)
SCOUT_AFTER = 5.0  # no tunnel up this long: dial the --broker-url(s) again
TICK = 0.5  # the fleet looks again at least this often
DRAIN_TIMEOUT = 35.0  # a tunnel's own drain is bounded (30 s); this bounds the fleet's


@dataclass(eq=False)
class _Member:
    tunnel: Tunnel
    task: "asyncio.Task[None]"
    retiring: bool = False
    missing_since: float | None = None  # when its broker was last seen in no list

    def holds(self, broker_id: str) -> bool:
        return not self.retiring and broker_id in (self.tunnel.pin, self.tunnel.broker_id)


@dataclass(eq=False)
class Fleet:
    settings: Settings
    llm: LLMClient
    slots: SlotCounter = field(default_factory=SlotCounter)  # max_concurrent over every tunnel
    connector_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # this connector on every broker
    rotation: Rotation = field(init=False)  # its credential, one for every tunnel
    _members: list[_Member] = field(default_factory=list)
    _lists: dict[Tunnel, list[tuple[str, str]]] = field(default_factory=dict)  # of tunnels with a session
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _down_since: float = field(default_factory=time.monotonic)
    _retiring: set["asyncio.Task[None]"] = field(default_factory=set)
    stopping: bool = False

    def __post_init__(self) -> None:
        self.rotation = Rotation(self.settings)

    async def run(self) -> None:
        """Keep the fleet right until cancelled (after drain(): draining, it changes nothing)."""
        self._scout()
        while True:
            if not self.stopping:
                self._reconcile(time.monotonic())
            self._changed.clear()
            try:
                async with asyncio.timeout(TICK):
                    await self._changed.wait()
            except TimeoutError:
                pass

    async def drain(self) -> None:
        """Graceful stop of every tunnel (each bounded)."""
        self.stopping = True
        members = list(self._members)
        if members:
            await asyncio.wait([asyncio.ensure_future(m.tunnel.drain()) for m in members], timeout=DRAIN_TIMEOUT)
        for member in members:
            member.task.cancel()

    # --- Membership, for the tunnels ------------------------------------------------

    def claim(self, tunnel: Tunnel, broker_id: str) -> bool:
        return not any(m.tunnel is not tunnel and m.holds(broker_id) for m in self._members)

    def heard(self, tunnel: Tunnel, brokers: list[tuple[str, str]]) -> None:
        # "" is the URL this tunnel came by (worker processes behind one port).
        self._lists[tunnel] = [(i, url or tunnel.settings.broker_url) for i, url in brokers]
        self._changed.set()

    def lost(self, tunnel: Tunnel) -> None:
        self._lists.pop(tunnel, None)
        self._changed.set()

    def keep(self, tunnel: Tunnel) -> bool:
        """A pinned tunnel goes on until its broker leaves the lists; a scout only while
        nothing else tells where the brokers are (no list, or no other tunnel up)."""
        if self.stopping:
            return False
        others_up = any(m.tunnel is not tunnel and m.tunnel.status.connected for m in self._members)
        return tunnel.pin is not None or not self._listed() or not others_up

    # --- keeping it right -----------------------------------------------------------------

    def _listed(self) -> dict[str, str]:
        """Every broker the tunnels that are up have heard of, with its URL."""
        listed: dict[str, str] = {}
        for tunnel, brokers in self._lists.items():
            if tunnel.status.connected:  # (a tunnel resuming may hold a dead broker's last word)
                for broker_id, url in brokers:
                    listed.setdefault(broker_id, url)
        return listed

    def _reconcile(self, now: float) -> None:
        listed = self._listed()
        for member in list(self._members):
            self._check(member, listed, now)
        for broker_id, url in listed.items():
            if not any(m.holds(broker_id) for m in self._members):
                self._add(broker_id, url)
        if any(m.tunnel.status.connected for m in self._members):
            self._down_since = now
        elif now - self._down_since > SCOUT_AFTER and not any(m.tunnel.pin is None for m in self._members):
            log.info("no tunnel up for %.0f s: dialling the broker URL(s) again", SCOUT_AFTER)
            self._down_since = now
            self._scout()

    def _check(self, member: _Member, listed: dict[str, str], now: float) -> None:
        tunnel = member.tunnel
        if member.retiring:
            return
        if tunnel.pin is None:  # a scout: hand over to the broker's own URL when it has one
            url = listed.get(tunnel.broker_id)
            if url is not None and url != tunnel.settings.broker_url and self._acceptable(url):
                log.info("broker %s is at %s: its tunnel moves there", tunnel.broker_id, url)
                self._retire(member)
            return
        if not listed or tunnel.pin in listed:
            member.missing_since = None
        elif member.missing_since is None:
            member.missing_since = now
        elif now - member.missing_since > DROP_GRACE:
            log.info("broker %s is in no list any more: its tunnel ends", tunnel.pin)
            self._retire(member)

    def _add(self, broker_id: str, url: str) -> None:
        if len(self._members) >= MAX_BROKERS:
            log.warning("brokers listed beyond %d: broker %s gets no tunnel", MAX_BROKERS, broker_id)
            return
        if not self._acceptable(url):
            log.warning("broker %s is listed at %s: not dialled (cleartext)", broker_id, url)
            return
        log.info("broker %s at %s: opening a tunnel", broker_id, url)
        self._start(url, broker_id)

    def _acceptable(self, url: str) -> bool:
        """https, or http to this machine, or http where the operator already gave an http:// URL."""
        parsed = httpx.URL(url)
        cleartext_given = any(u.startswith("http://") for u in self.settings.broker_urls)
        return parsed.scheme == "https" or loopback(parsed.host) or cleartext_given

    def _scout(self) -> None:
        for url in self.settings.broker_urls:
            self._start(url, None)

    def _start(self, url: str, pin: str | None) -> None:
        status = Status(models=list(self.settings.models))
        tunnel = Tunnel(replace(self.settings, broker_url=url), self.llm, status, self, pin)
        member = _Member(tunnel, asyncio.create_task(tunnel.run()))
        self._members.append(member)
        member.task.add_done_callback(lambda _: self._gone(member))

    def _gone(self, member: _Member) -> None:
        if member in self._members:
            self._members.remove(member)
        self._lists.pop(member.tunnel, None)
        self._changed.set()

    def _retire(self, member: _Member) -> None:
        """Drain the tunnel (its replies finish), then end it; one that is down ends now."""
        member.retiring = True
        if not member.tunnel.status.connected:
            member.task.cancel()
            return

        async def retire() -> None:
            try:
                await asyncio.wait_for(member.tunnel.drain(), DRAIN_TIMEOUT)
            finally:
                member.task.cancel()

        task = asyncio.create_task(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # --- health ------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """The connector's health: one entry per tunnel, and the whole as one tunnel was shown."""
        tunnels: list[dict[str, Any]] = [
            {
                "broker_url": m.tunnel.settings.public_broker_url,
                "broker": m.tunnel.broker_id or m.tunnel.pin or "",
                "connected": m.tunnel.status.connected,
                "protocol": m.tunnel.status.protocol,
                "last_error": m.tunnel.status.last_error,
                "models": m.tunnel.status.models,
            }
            for m in self._members
        ]
        up = [t for t in tunnels if t["connected"]]
        models = sorted({model for t in tunnels for model in t["models"]}) or list(self.settings.models)
        return {
            "status": "ok" if up else "degraded",
            "connected": bool(up),
            "broker_url": self.settings.public_broker_url,
            "models": models,
            "last_error": next((t["last_error"] for t in tunnels if t["last_error"]), ""),
            "protocol": next((t["protocol"] for t in up + tunnels), ""),
            "tunnels": tunnels,
        }
