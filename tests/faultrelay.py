"""A TCP relay that breaks the network on command, for fault tests.

Tests put it between two processes (a connector and its broker, say) and then add
latency, cut every connection with a reset, or turn the path into a black hole that
accepts bytes and delivers none — the half-open connection a NAT timeout or a dead
peer leaves behind, which no process-level fault can produce on loopback.

It runs its own asyncio loop in a daemon thread, so synchronous tests and tests with
their own event loop can both drive it; every control method hands its work to that
loop and waits a bounded time for it::

    relay = FaultRelay("127.0.0.1", broker_port)
    try:
        connector = stack.connector(relay.url, ...)
        relay.blackhole(); ...; relay.restore()
    finally:
        relay.close()
"""

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

CONTROL_TIMEOUT = 5.0  # how long a control call may wait for the relay's loop
CONNECT_TIMEOUT = 5.0  # how long a new connection may take to reach the target
READ_SIZE = 65536
QUEUE_CHUNKS = 64  # reads in flight per direction: a slow receiver slows the sender (backpressure)
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, not FIN


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close abruptly: the peer gets ECONNRESET rather than a polite EOF."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()


class _Connection:
    """One relayed connection: a client side, an upstream side, a pump each way."""

    def __init__(self, relay: "FaultRelay", client: asyncio.StreamWriter) -> None:
        self.relay = relay
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        # A black-holed connection has lost bytes: forwarding again would hand the peers
        # a stream with a hole in it, so it stays silent until they give up on it.
        self.dead = relay._blackholed
        self.was_reset = False
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        self.was_reset = True
        for writer in (self.client, self.upstream):
            if writer is not None:
                _reset(writer)
        for task in self.tasks:
            task.cancel()

    async def run(self, reader: asyncio.StreamReader) -> None:
        if self.dead:  # a black hole opens no path to the target at all
            await self._swallow(reader)
            self.client.transport.abort()
            return
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                up_reader, self.upstream = await asyncio.open_connection(self.relay.target_host, self.relay.target_port)
        except (OSError, TimeoutError):
            _reset(self.client)  # the target is down: refuse, as a closed port would
            return
        if self.was_reset:  # cut while connecting
            self.reset()
            return
        self.tasks = [
            asyncio.ensure_future(self._pump(reader, self.upstream)),
            asyncio.ensure_future(self._pump(up_reader, self.client)),
        ]
        _, pending = await asyncio.wait(self.tasks, return_when=asyncio.FIRST_EXCEPTION)
        if pending and not self.dead:  # one side failed: the other learns it the hard way too
            self.reset()
        if pending:  # (a black hole passes on no reset either: that side lives until its peer leaves)
            await asyncio.wait(pending)
        for task in self.tasks:
            if not task.cancelled():
                task.exception()  # retrieved: a broken side is this relay's business, not a log line
        self.client.transport.abort()
        self.upstream.transport.abort()

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(READ_SIZE):
                pass

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Reads one side, writes the other after the current delay, in order.

        Reading and writing are separate tasks joined by a bounded queue, so a delay is
        latency (each read arrives ``delay`` later) rather than a cap on throughput; if
        either task fails, the task group cancels the other.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)

        async def receive() -> None:
            while True:
                data = await reader.read(READ_SIZE)
                if data and self.dead:
                    continue
                await queue.put((loop.time() + self.relay._delay, data))
                if not data:
                    return

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:  # EOF travels on as a half-close (a black hole swallows it too)
                    if not self.dead and writer.can_write_eof():
                        writer.write_eof()
                    return
                if self.dead:
                    continue
                writer.write(data)
                await writer.drain()
                self.relay._forwarded += len(data)

        async with asyncio.TaskGroup() as group:
            group.create_task(receive())
            group.create_task(deliver())


class FaultRelay:
    """Forwards 127.0.0.1:``port`` to the target, until told to misbehave.

    Control methods are thread-safe and return within ``CONTROL_TIMEOUT``.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self._delay = 0.0
        self._blackholed = False
        self._forwarded = 0
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultrelay", daemon=True)
        self._thread.start()
        self._server = self._run(self._listen())
        self.port: int = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def forwarded_bytes(self) -> int:
        """Bytes delivered so far, both ways (a cheap way to see traffic flow)."""
        return self._forwarded

    def open_connections(self) -> int:
        return self._call(lambda: len(self._connections))

    def delay(self, seconds: float) -> None:
        """Each read from now on reaches the other side ``seconds`` later (0: no delay)."""
        self._call(lambda: setattr(self, "_delay", max(0.0, seconds)))

    def cut(self) -> None:
        """Reset every open connection now; new connections are relayed as before."""

        def cut_all() -> None:
            for connection in list(self._connections):
                connection.reset()

        self._call(cut_all)

    def blackhole(self) -> None:
        """Keep every connection open but deliver nothing, either way, until restore().

        Open connections stay silent for good (they lost bytes); connections accepted
        meanwhile never reach the target.
        """

        def swallow() -> None:
            self._blackholed = True
            for connection in self._connections:
                connection.dead = True

        self._call(swallow)

    def restore(self) -> None:
        """Normal forwarding for new connections (and for old ones merely delayed)."""

        def heal() -> None:
            self._blackholed = False
            self._delay = 0.0

        self._call(heal)

    def close(self) -> None:
        """Stop listening, reset every connection, stop the thread (idempotent)."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._run(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> "FaultRelay":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- on the relay's loop -------------------------------------------

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._accept, "127.0.0.1", 0, backlog=256)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(self, writer)
        self._connections.add(connection)
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        try:
            await connection.run(reader)
        except OSError:
            connection.reset()
        except asyncio.CancelledError:
            pass  # by close(); Python 3.11's stream server would log a cancelled handler as an error
        finally:  # also when cancelled by close(): no socket outlives the relay
            self._connections.discard(connection)
            self._handlers.discard(handler)
            for side in (connection.client, connection.upstream):
                if side is not None:
                    side.transport.abort()

    async def _shutdown(self) -> None:
        """Reset everything and let the handlers end by themselves.

        Cancelling a stream handler makes asyncio log a spurious error, and closing the
        server while an accept is under way leaks that socket: hence the yields.
        """
        for _ in range(3):
            await asyncio.sleep(0)
        if self._server is not None:
            self._server.close()
        for _ in range(3):
            await asyncio.sleep(0)
        for connection in list(self._connections):
            connection.reset()
        if self._handlers:
            _, stuck = await asyncio.wait(set(self._handlers), timeout=CONTROL_TIMEOUT / 2)
            for task in stuck:
                task.cancel()
            if stuck:
                await asyncio.wait(stuck, timeout=CONTROL_TIMEOUT / 4)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(CONTROL_TIMEOUT)

    def _call(self, func: Callable[[], T]) -> T:
        future: Future[T] = Future()

        def call() -> None:
            try:
                future.set_result(func())
            except Exception as exc:
                future.set_exception(exc)

        self._loop.call_soon_threadsafe(call)
        return future.result(CONTROL_TIMEOUT)
