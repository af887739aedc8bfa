"""The HTTP machinery the fake servers share: a real server on 127.0.0.1 in a background thread.

A real socket (not a mocked transport) so the client's whole stack — the openai SDK, HTTPX2,
keep-alive, timeouts, a refused connection — runs as it would against the real service. Each fake
(``fake_openai``, ``fake_vllm``) subclasses :class:`JsonHandler` with its routes and
:class:`FakeServer` with its state.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Generic, Protocol, Self, TypeVar


class Locked(Protocol):
    """A fake's state: tests and handler threads share it under ``lock``."""

    lock: threading.Lock


StateT = TypeVar("StateT", bound=Locked)


class FakeHTTPServer(ThreadingHTTPServer, Generic[StateT]):
    daemon_threads = True
    #: the listen backlog; the default of 5 resets connections when a debate opens dozens at once
    request_queue_size = 256
    state: StateT

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Cut every open connection, as a dying server does (keep-alive ones too)."""
        with self._open_lock:
            open_now, self._open = list(self._open), set()
        for sock in open_now:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class Drop(Exception):
    """Raised by a route to close the connection without a response (a lost response)."""


class JsonHandler(BaseHTTPRequestHandler):
    """Request plumbing; a subclass implements ``_dispatch(method)``."""

    server: FakeHTTPServer[Any]  #: a subclass narrows it to its own state type
    protocol_version = "HTTP/1.1"
    #: headers and body go out in separate writes; with Nagle on, each response waits ~40 ms for
    #: a delayed ACK, which would be measured as client overhead
    disable_nagle_algorithm = True
    #: json.dumps separators: the stdlib's by default; compact for servers that answer compactly
    json_separators: tuple[str, str] = (", ", ": ")

    def log_message(self, format: str, *args: Any) -> None:  # the tests' output stays quiet
        return None

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_bytes(
        self, status: int, body: bytes, content_type: str | None, headers: dict[str, str] | None = None
    ) -> None:
        """Send one response; ``content_type=None`` sends no Content-Type at all (as vLLM does for
        its plain-text answers), which a client must cope with."""
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, separators=self.json_separators).encode()
        self._send_bytes(status, body, "application/json", headers)

    def _dispatch(self, method: str) -> None:
        raise NotImplementedError

    def do_GET(self) -> None:
        self._safely("GET")

    def do_POST(self) -> None:
        self._safely("POST")

    def _safely(self, method: str) -> None:
        try:
            self._dispatch(method)
        except (Drop, BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class FakeServer(Generic[StateT]):
    """A fake's server and its state; ``base_url`` goes into a recipe's ``backend.options``.

    ``stop()`` closes the listening socket and cuts open connections (a client then gets
    "connection refused", as from a crashed server); ``start()`` after ``stop()`` listens again on
    the same port.
    """

    handler: type[JsonHandler]
    thread_name = "fake-server"

    def __init__(self, state: StateT) -> None:
        self.state = state
        self._port = 0
        self._server: FakeHTTPServer[StateT] | None = None
        self._thread: threading.Thread | None = None
        self._bind()

    def _bind(self) -> None:
        # allow_reuse_address (HTTPServer's default) lets a restart re-bind the port at once
        self._server = FakeHTTPServer(("127.0.0.1", self._port), self.handler)
        self._server.state = self.state
        self._port = int(self._server.server_address[1])

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/v1"

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> Self:
        if self._thread is not None:
            return self
        if self._server is None:
            self._bind()
        assert self._server is not None
        # a short poll interval: stop() waits up to one interval, and every test stops a server
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name=self.thread_name, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        if self._thread is not None:
            server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        server.server_close()
        server.drop_connections()

    def configure(self, **changes: Any) -> None:
        """Change state fields under the state's lock (every fake's state has one)."""
        with self.state.lock:
            for k, v in changes.items():
                if not hasattr(self.state, k):
                    raise AttributeError(f"{type(self.state).__name__} has no field {k!r}")
                setattr(self.state, k, v)
