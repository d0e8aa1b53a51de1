"""The fault relay itself, against an echo server: it must forward faithfully and break on cue."""

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.faultrelay import FaultRelay
from tests.support import free_port, wait_until


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        try:
            while data := sock.recv(65536):
                sock.sendall(data)
        except OSError:
            pass


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = _EchoServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def relay(echo_port: int) -> Iterator[FaultRelay]:
    with FaultRelay("127.0.0.1", echo_port) as relay:
        yield relay


def dial(relay: FaultRelay, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", relay.port), timeout=timeout)


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        part = sock.recv(65536)
        if not part:
            break
        got += part
    return got


def test_forwards_both_ways_over_many_connections(relay: FaultRelay) -> None:
    assert relay.url == f"http://127.0.0.1:{relay.port}"
    socks = [dial(relay) for _ in range(5)]
    try:
        for i, sock in enumerate(socks):
            assert roundtrip(sock, b"hello %d" % i) == b"hello %d" % i
        big = bytes(range(256)) * 4096  # 1 MiB: the bounded queues must not lose or reorder
        sender = threading.Thread(target=socks[0].sendall, args=(big,))
        sender.start()
        got = b""
        while len(got) < len(big):
            part = socks[0].recv(65536)
            assert part
            got += part
        sender.join(5)
        assert got == big
        assert relay.open_connections() == 5
        assert relay.forwarded_bytes >= 2 * len(big)
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: relay.open_connections() == 0, timeout=5, what="closed connections to be forgotten")


def test_eof_is_passed_on_as_a_half_close(relay: FaultRelay) -> None:
    with dial(relay) as sock:
        assert roundtrip(sock, b"ping") == b"ping"
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b""  # the echo server saw our EOF and closed its side


def test_cut_resets_open_connections_and_new_ones_work(relay: FaultRelay) -> None:
    old = dial(relay)
    try:
        assert roundtrip(old, b"before") == b"before"
        started = time.monotonic()
        relay.cut()
        assert time.monotonic() - started < 1
        with pytest.raises(ConnectionResetError):
            old.sendall(b"x")
            old.recv(10)  # an RST, not a polite EOF
    finally:
        old.close()
    with dial(relay) as new:
        assert roundtrip(new, b"after") == b"after"


def test_blackhole_keeps_connections_open_but_silent(relay: FaultRelay) -> None:
    old = dial(relay, timeout=0.5)
    try:
        assert roundtrip(old, b"before") == b"before"
        relay.blackhole()
        old.sendall(b"lost")
        with pytest.raises(TimeoutError):
            old.recv(10)
        with dial(relay, timeout=0.5) as during:  # the handshake succeeds; nothing else does
            during.sendall(b"lost too")
            with pytest.raises(TimeoutError):
                during.recv(10)
        relay.restore()
        old.sendall(b"still lost")
        with pytest.raises(TimeoutError):
            old.recv(10)  # it lost bytes: it stays dead
        with dial(relay) as new:
            assert roundtrip(new, b"after") == b"after"
    finally:
        old.close()


def test_delay_adds_latency_each_way_without_capping_throughput(relay: FaultRelay) -> None:
    with dial(relay, timeout=5) as sock:
        relay.delay(0.3)
        started = time.monotonic()
        assert roundtrip(sock, b"slow") == b"slow"
        elapsed = time.monotonic() - started
        assert 0.55 < elapsed < 2.0, elapsed
        # Ten reads in a row cost one delay, not ten: it is latency, not a rate limit.
        started = time.monotonic()
        for i in range(10):
            sock.sendall(b"%d;" % i)
            time.sleep(0.01)
        expected = b"".join(b"%d;" % i for i in range(10))
        got = b""
        while len(got) < len(expected):
            got += sock.recv(100)
        assert got == expected
        assert time.monotonic() - started < 1.5
        relay.restore()
        started = time.monotonic()
        assert roundtrip(sock, b"fast") == b"fast"
        assert time.monotonic() - started < 0.2


def test_an_unreachable_target_is_refused() -> None:
    def poke(relay: FaultRelay) -> None:
        with dial(relay) as sock:  # the reset may even beat connect() back
            sock.sendall(b"x")
            assert sock.recv(10) == b""
            raise ConnectionResetError  # a plain EOF is as good as a reset here

    with FaultRelay("127.0.0.1", free_port()) as relay, pytest.raises((ConnectionResetError, BrokenPipeError)):
        poke(relay)


def test_close_stops_listening_and_is_idempotent(echo_port: int) -> None:
    relay = FaultRelay("127.0.0.1", echo_port)
    sock = dial(relay)
    relay.close()
    relay.close()
    with pytest.raises(OSError):
        sock.sendall(b"x")
        assert sock.recv(10) == b""
        raise ConnectionResetError
    sock.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", relay.port), timeout=1)
