"""A recording HTTP/1.1 server for the tests: it notes every connection and request it gets.

Used as an LLM whose view must be exact (what path, which headers) and as a canary that
must see nothing at all. It answers every request with a small JSON body and, on demand,
with headers a user must never receive.
"""

import socket
import socketserver
import threading
from dataclasses import dataclass, field

import h11

# Headers the recorder adds to its answers: valid, but for the broker to drop.
HOSTILE_RESPONSE_HEADERS = [
    (b"set-cookie", b"session=llm-side; Path=/"),
    (b"alt-svc", b'h3=":443"'),
    (b"strict-transport-security", b"max-age=63072000"),
]


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Recorder:
    port: int = 0
    connections: int = 0
    requests: list[Seen] = field(default_factory=list)
    _server: socketserver.ThreadingTCPServer | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> "Recorder":
        recorder = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                recorder.connections += 1
                _serve(self.request, recorder)

        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def _serve(sock: socket.socket, recorder: Recorder) -> None:
    conn = h11.Connection(h11.SERVER)
    sock.settimeout(10)
    while True:
        request, body = _read_request(sock, conn)
        if request is None:
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers}
        recorder.requests.append(Seen(request.method.decode(), request.target.decode("latin-1"), headers, body))
        payload = b'{"object": "recorded", "choices": []}'
        head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
        sock.sendall(conn.send(h11.Response(status_code=200, headers=head + HOSTILE_RESPONSE_HEADERS)) or b"")
        sock.sendall((conn.send(h11.Data(data=payload)) or b"") + (conn.send(h11.EndOfMessage()) or b""))
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return
        conn.start_next_cycle()


def _read_request(sock: socket.socket, conn: h11.Connection) -> tuple[h11.Request | None, bytes]:
    request: h11.Request | None = None
    body = b""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return None, b""
        if event is h11.NEED_DATA:
            try:
                data = sock.recv(65536)
            except OSError:
                return None, b""
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return request, body
        else:  # ConnectionClosed, PAUSED
            return None, b""
