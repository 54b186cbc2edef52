"""A fault-injecting HTTP proxy to put in front of a Hub server, for testing how pushes survive.

Every request is read in full, then, with probability ``rate`` (drawn from a seeded RNG), answered
with one fault instead of a plain forward:

- ``500`` / ``502`` / ``503``: an error status, the server never sees the request;
- ``429``: "Too Many Requests" with ``Retry-After: retry_after_s``;
- ``reset``: the connection is reset (TCP RST) before forwarding;
- ``reset_after``: forwarded (the server APPLIES it), then reset instead of answering: the lost
  response that tests whether a retried write is made twice;
- ``stall``: nothing happens for ``stall_s`` (set it past the client timeout), then the connection
  is reset without forwarding;
- ``stall_after``: forwarded and applied, then ``stall_s`` of silence and a reset.

A stalled request is never forwarded late: a request arriving after its client gave up and
retried is a different fault (reordering) that this proxy does not model. ``counts`` says what was
injected; ``log`` keeps (arrival time, method, path, outcome) per request. The server builds its own
URLs (LFS upload hrefs) from the Host header, which is forwarded unchanged, so they point back
through the proxy.

    with HubServer(d) as hub, FaultProxy(hub.endpoint, rate=0.3, seed=1) as proxy:
        HfApi(endpoint=proxy.endpoint).create_repo(...)
"""

from __future__ import annotations

import http.client
import logging
import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable
from urllib.parse import urlsplit

logger = logging.getLogger("etokit.hub.faults")

FAULTS = ("500", "502", "503", "429", "reset", "reset_after", "stall", "stall_after")
# Headers about one hop's connection, never forwarded (RFC 9110 7.6.1).
_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
}
_MAX_BODY = 1 << 30  # a proxy for tests: bodies are buffered, so refuse anything absurd


class FaultProxy:
    """Forwards to ``upstream`` (``http://host:port``), injecting faults into a ``rate`` share of
    requests. ``faults``: which kinds to draw from (uniformly). ``match(method, path)``: only
    requests it accepts may be faulted (default: all). ``max_faults``: inject no more than this
    many, then forward everything. ``rate`` may be changed while running."""

    def __init__(
        self,
        upstream: str,
        *,
        rate: float = 0.3,
        seed: int = 0,
        faults: Iterable[str] = FAULTS,
        stall_s: float = 5.0,
        retry_after_s: int = 1,
        match: Callable[[str, str], bool] | None = None,
        max_faults: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        u = urlsplit(upstream)
        if u.scheme != "http" or not u.hostname or not u.port:
            raise ValueError(f"upstream must be http://HOST:PORT, got {upstream!r}")
        self.faults = tuple(faults)
        unknown = set(self.faults) - set(FAULTS)
        if unknown or not self.faults:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; choose from {FAULTS}")
        self.upstream = (u.hostname, u.port)
        self.rate, self.stall_s, self.retry_after_s, self.match = rate, stall_s, retry_after_s, match
        self.max_faults = max_faults
        self.host, self.port = host, port
        self.counts: Counter[str] = Counter()
        self.log: list[tuple[float, str, str, str]] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: _ProxyServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    @property
    def injected(self) -> int:
        """Faults injected so far (every kind)."""
        with self._lock:
            return sum(self.counts[k] for k in FAULTS)

    def start(self) -> "FaultProxy":
        self._httpd = _ProxyServer((self.host, self.port), _Handler)
        self._httpd.proxy = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="etokit-fault-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._stopping.set()  # wakes stalled handlers
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = self._thread = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _decide(self, method: str, path: str, arrived: float) -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            if self.match is not None and not self.match(method, path):
                return None
            if self.max_faults is not None and sum(self.counts[k] for k in FAULTS) >= self.max_faults:
                return None
            # Draw both numbers every time so the sequence of decisions depends only on the seed
            # and the order of requests, not on which kinds are enabled.
            roll, pick = self._rng.random(), self._rng.randrange(1 << 30)
            if roll >= self.rate:
                return None
            fault = self.faults[pick % len(self.faults)]
            self.counts[fault] += 1  # counted here, under the lock that checks max_faults
            self.log.append((arrived, method, path, fault))
            return fault

    def _record(self, method: str, path: str, outcome: str, arrived: float) -> None:
        with self._lock:
            self.counts[outcome] += 1
            self.log.append((arrived, method, path, outcome))


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    proxy: FaultProxy

    def handle_error(self, request, client_address):
        # A client that resets or abandons its connection is the normal case here, not an error.
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def shutdown_request(self, request):
        # A reset connection must not send the FIN of a graceful shutdown first.
        linger = request.fileno() != -1 and request.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
        if linger and struct.unpack("ii", linger)[0]:
            request.close()
            return
        super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "etokit-fault-proxy"
    timeout = 120

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        logger.debug("%s %s", self.address_string(), format % args)

    def do_GET(self):
        self._handle()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    @property
    def proxy(self) -> FaultProxy:
        return self.server.proxy

    def _handle(self) -> None:
        body = self._read_body()
        if body is None:
            return
        method, path, arrived = self.command, urlsplit(self.path).path, time.monotonic()
        fault = self.proxy._decide(method, path, arrived)
        if fault is None:
            self._forward_and_answer(body, method, path, arrived)
            return
        logger.info("fault proxy: %s %s -> %s", method, path, fault)
        if fault in ("500", "502", "503", "429"):
            headers = {"Retry-After": str(self.proxy.retry_after_s)} if fault == "429" else {}
            self._answer(int(fault), {"Content-Type": "application/json", **headers}, b'{"error": "injected fault"}')
            return
        if fault in ("reset_after", "stall_after"):
            try:
                self._forward(body)
            except OSError:
                pass  # the upstream failed anyway: the client sees the reset either way
        if fault in ("stall", "stall_after"):
            self.proxy._stopping.wait(self.proxy.stall_s)
        self._reset()

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts, total = [], 0
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                total += size
                if total > _MAX_BODY:
                    self._answer(413, {}, b"")
                    self.close_connection = True
                    return None
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self._answer(413, {}, b"")
            self.close_connection = True
            return None
        return self.rfile.read(length) if length else b""

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.proxy.upstream, timeout=300)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP and k.lower() != "content-length"}
            if body or self.command in ("POST", "PUT", "PATCH"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP], data
        finally:
            conn.close()

    def _forward_and_answer(self, body: bytes, method: str, path: str, arrived: float) -> None:
        try:
            status, headers, data = self._forward(body)
        except OSError as e:  # the upstream is down: say so, as a gateway would
            self.proxy._record(method, path, "upstream_error", arrived)
            self._answer(502, {"Content-Type": "text/plain"}, f"upstream error: {e}".encode())
            return
        self.proxy._record(method, path, "forwarded", arrived)
        self._answer(status, dict(headers), data)

    def _answer(self, status: int, headers: dict, body: bytes) -> None:
        self.send_response(status)
        length = next((v for k, v in headers.items() if k.lower() == "content-length"), None)
        if self.command != "HEAD":
            length = None
        for k, v in headers.items():
            if k.lower() != "content-length":
                self.send_header(k, v)
        # A HEAD answer keeps the upstream's Content-Length (the size of the file it describes).
        self.send_header("Content-Length", length if length is not None else str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _reset(self) -> None:
        """Close with an RST (SO_LINGER 0): the client sees 'connection reset', not an answer."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
