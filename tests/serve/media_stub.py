"""Test doubles for media fetching: a loopback HTTP(S) stub server, a guard on every socket dial, a fake resolver.

Nothing here ever talks to another machine: the stub binds 127.0.0.1 on an ephemeral port, and `DialGuard` replaces
`media_fetch.dial_target` so that a fake *public* address (what the SSRF check sees) is connected to the stub on
loopback, while a dial to any other non-loopback address fails the test before a socket is opened.
"""

from __future__ import annotations

import collections
import http.server
import ipaddress
import socket
import ssl
import threading
import time

# Public addresses the SSRF check must accept. They are never contacted: DialGuard reroutes them to the stub.
PUBLIC_V4 = "8.8.8.8"
PUBLIC_V6 = "2001:4860:4860::8888"


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # e.g. a TLS handshake the client aborted on purpose; tests assert on what the client saw


class StubServer:
    """HTTP/1.1 server on 127.0.0.1 whose routes the test sets; records every request it receives.

    `routes[path]` is a callable taking the request handler; unknown paths answer 404. `hits[path]` counts requests,
    `hosts` keeps each request's Host header, `sni` the TLS server names, `sent[path]` the body bytes written.
    """

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.routes: dict = {}
        self.hits: collections.Counter = collections.Counter()
        self.sent: collections.Counter = collections.Counter()
        self.hosts: list[str | None] = []
        self.sni: list[str | None] = []
        self.stopping = threading.Event()
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 (http.server naming)
                path = self.path
                stub.hits[path] += 1
                stub.hosts.append(self.headers.get("Host"))
                route = stub.routes.get(path)
                try:
                    if route is None:
                        respond(404, b"not found", "text/plain")(self)
                    else:
                        route(self)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pass  # the client gave up (that is what most tests provoke)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            tls.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)
            # Handshake lazily in the handler thread, so a client that rejects the certificate cannot stall accept().
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True, do_handshake_on_connect=False)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stopping.set()  # releases stalled handlers
        self.server.shutdown()
        self.server.server_close()

    def wait(self, seconds: float) -> None:
        """Sleep in a handler, but return at once when the server closes."""
        self.stopping.wait(seconds)


# Route factories: each returns a callable(handler) that writes one response.


def respond(status=200, body=b"", content_type="image/png", headers=(), content_length=True):
    def route(h):
        h.send_response(status)
        if content_type is not None:
            h.send_header("Content-Type", content_type)
        if content_length:
            h.send_header("Content-Length", str(len(body)))
        for key, value in headers:
            h.send_header(key, value)
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(body)

    return route


def redirect(location, status=302):
    return respond(status, b"", "text/plain", headers=[("Location", location)])


def stall(stub: StubServer, seconds: float, declared: int = 1000):
    """Headers, then nothing for `seconds` (a stuck upstream)."""

    def route(h):
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(declared))
        h.end_headers()
        h.wfile.flush()
        stub.wait(seconds)

    return route


def drip(stub: StubServer, path: str, total: int, interval: float):
    """A correct Content-Length, then one byte every `interval` seconds (each read succeeds, the whole is slow)."""

    def route(h):
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(total))
        h.end_headers()
        for _ in range(total):
            if stub.stopping.is_set():
                return
            h.wfile.write(b"x")
            h.wfile.flush()
            stub.sent[path] += 1
            stub.wait(interval)

    return route


def endless(stub: StubServer, path: str, limit: int, chunk: int = 16 * 1024):
    """Chunked transfer encoding without Content-Length, up to `limit` bytes or until the client hangs up."""

    def route(h):
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        block = b"\x00" * chunk
        while stub.sent[path] < limit and not stub.stopping.is_set():
            h.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
            stub.sent[path] += len(block)
        h.wfile.write(b"0\r\n\r\n")

    return route


def short_body(declared: int, body: bytes):
    """Declares `declared` bytes, sends fewer, closes (an upstream that lies about Content-Length)."""

    def route(h):
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(declared))
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(body)
        h.wfile.flush()
        h.connection.shutdown(socket.SHUT_RDWR)

    return route


class DialGuard:
    """Replacement for `media_fetch.dial_target`: records every dial, reroutes mapped addresses to loopback, and
    fails the test on a dial to any other non-loopback address."""

    def __init__(self):
        self.reroute: dict[str, str] = {PUBLIC_V4: "127.0.0.1", PUBLIC_V6: "127.0.0.1"}
        self.dials: list[tuple[str, int]] = []

    def __call__(self, address: str, port: int) -> tuple[str, int]:
        self.dials.append((address, port))
        if address in self.reroute:
            return self.reroute[address], port
        if ipaddress.ip_address(address).is_loopback:
            return address, port
        raise AssertionError(f"the media layer tried to open a socket to {address}:{port}, which is off this machine")


class FakeResolver:
    """name -> addresses table standing in for DNS; records each lookup; unknown names fail like NXDOMAIN."""

    def __init__(self, table: dict[str, list[str]] | None = None, delay: float = 0.0):
        self.table = dict(table or {})
        self.calls: list[str] = []
        self.delay = delay

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if self.delay:
            time.sleep(self.delay)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.table[host])
