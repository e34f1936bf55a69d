"""Ray's Prometheus metrics on ``--host``, while Ray itself stays on loopback.

A Ray that ``espro serve`` starts has the node address 127.0.0.1, so its exporter binds
loopback only, like every other Ray port (which must not answer strangers). With a ``--host``
beyond loopback ``espro serve`` runs this relay in its own process instead: it listens on
``--host:--metrics-port`` and answers ``GET /metrics``, and nothing else, with what the
exporter answers on its loopback port.

There is no authentication, as is Prometheus's convention: who reaches the port is for the
network to decide (a firewall, a NetworkPolicy). Each answer is bounded in size and time, and
so is the number of connections served at once.
"""

from __future__ import annotations

import http.client
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

MAX_BYTES = 64 << 20
"""The largest exporter answer relayed; a larger one is a 502."""
TIMEOUT_S = 10.0
"""How long a scrape may take end to end (Prometheus's default scrape timeout), and how long a
client may stall its request."""
MAX_CONNECTIONS = 16
"""Connections served at once; more are closed unanswered."""
TEXT = "text/plain; charset=utf-8"


def fetch(port: int, accept: str | None) -> tuple[int, str, bytes]:
    """The status, content type and body of the exporter on ``127.0.0.1:port``; a 502 that
    says why when it does not answer in full within ``TIMEOUT_S`` and ``MAX_BYTES``."""
    deadline = time.monotonic() + TIMEOUT_S
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        connection.request("GET", "/metrics", headers={"Accept": accept} if accept else {})
        response = connection.getresponse()
        body = bytearray()
        while chunk := response.read1(1 << 16):
            body += chunk
            if len(body) > MAX_BYTES:
                return 502, TEXT, f"the exporter's answer exceeds {MAX_BYTES} bytes\n".encode()
            if time.monotonic() > deadline:
                return 502, TEXT, f"the exporter did not answer within {TIMEOUT_S} s\n".encode()
        return response.status, response.getheader("Content-Type", TEXT), bytes(body)
    except (OSError, http.client.HTTPException) as err:
        return 502, TEXT, f"the exporter did not answer: {type(err).__name__}: {err}\n".encode()
    finally:
        connection.close()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = TIMEOUT_S

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/metrics":
            self._answer(*fetch(self.server.exporter_port, self.headers.get("Accept")))
        else:
            self._answer(404, TEXT, b"not found: this port serves /metrics only\n")

    def _answer(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Silent: a scrape every few seconds is no news."""


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, host: str, port: int, exporter_port: int) -> None:
        self.address_family = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0][0]
        self.exporter_port = exporter_port
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__((host, port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class MetricsRelay:
    """Answers ``GET /metrics`` on ``host:port`` with the exporter's on loopback
    ``exporter_port``, from a thread of this process until :meth:`close`. An ``OSError`` if
    ``host:port`` cannot be bound."""

    def __init__(self, host: str, port: int, exporter_port: int) -> None:
        self._server = _Server(host, port, exporter_port)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name="espro-metrics-relay", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        """The port it listens on (the one chosen when given 0)."""
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop answering and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
