"""The metrics relay of ``espro serve`` beyond loopback: it answers ``GET /metrics`` with the
exporter's answer, within bounds, and nothing else. On loopback against a fake exporter; the
relay in a real ``espro serve`` is in test_app.py."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

import pytest

from helpers import wait_until
from serving import metrics_relay
from serving.metrics_relay import MetricsRelay

METRICS = b"# TYPE ray_serve_num_http_requests counter\nray_serve_num_http_requests_total 3\n"


class Answer(NamedTuple):
    status: int
    content_type: str | None
    body: bytes


class Exporter(BaseHTTPRequestHandler):
    """Answers every GET with :data:`METRICS` (or ``server.body``), after ``server.delay_s``;
    records the paths and Accept headers it was sent."""

    server: FakeExporter

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Accept")))
        time.sleep(self.server.delay_s)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class FakeExporter(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Exporter)
        self.seen: list[tuple[str, str | None]] = []
        self.body, self.delay_s = METRICS, 0.0


@pytest.fixture
def exporter() -> Iterator[FakeExporter]:
    server = FakeExporter()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def relay(exporter: FakeExporter) -> Iterator[MetricsRelay]:
    relay = MetricsRelay("127.0.0.1", 0, exporter.server_address[1])
    try:
        yield relay
    finally:
        relay.close()


def fetch(port: int, path: str, method: str = "GET", **headers: str) -> Answer:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        return Answer(response.status, response.getheader("Content-Type"), response.read())
    finally:
        connection.close()


def test_metrics_are_relayed_with_their_content_type_and_the_accept_header(
    relay: MetricsRelay, exporter: FakeExporter
) -> None:
    assert fetch(relay.port, "/metrics") == (200, "text/plain; version=0.0.4", METRICS)
    assert fetch(relay.port, "/metrics?name[]=x").body == METRICS
    assert fetch(relay.port, "/metrics", Accept="application/openmetrics-text").status == 200
    assert exporter.seen == [
        ("/metrics", None),
        ("/metrics", None),
        ("/metrics", "application/openmetrics-text"),
    ]


@pytest.mark.parametrize("path", ["/", "/metricsx", "/api/v0/nodes", "/../metrics"])
def test_any_other_path_is_404_and_never_reaches_the_exporter(
    relay: MetricsRelay, exporter: FakeExporter, path: str
) -> None:
    answer = fetch(relay.port, path)
    assert answer.status == 404 and b"/metrics only" in answer.body
    assert exporter.seen == []


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_only_get_is_answered(relay: MetricsRelay, exporter: FakeExporter, method: str) -> None:
    assert fetch(relay.port, "/metrics", method).status == 501
    assert exporter.seen == []


def test_an_exporter_that_does_not_answer_is_a_502(exporter: FakeExporter) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # nothing listens on it
    relay = MetricsRelay("127.0.0.1", 0, port)
    try:
        answer = fetch(relay.port, "/metrics")
    finally:
        relay.close()
    assert answer.status == 502 and b"ConnectionRefusedError" in answer.body


def test_an_answer_too_large_is_a_502(
    relay: MetricsRelay, exporter: FakeExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_relay, "MAX_BYTES", len(METRICS) - 1)
    answer = fetch(relay.port, "/metrics")
    assert answer.status == 502 and b"exceeds" in answer.body


def test_a_slow_answer_is_a_502(
    relay: MetricsRelay, exporter: FakeExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_relay, "TIMEOUT_S", 0.2)
    exporter.delay_s = 1.0
    answer = fetch(relay.port, "/metrics")
    assert answer.status == 502 and b"timed out" in answer.body


def test_connections_beyond_the_bound_are_closed_unanswered(
    exporter: FakeExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_relay, "MAX_CONNECTIONS", 1)
    relay = MetricsRelay("127.0.0.1", 0, exporter.server_address[1])
    try:
        with socket.create_connection(("127.0.0.1", relay.port)) as idle:
            idle.settimeout(30)
            with socket.create_connection(("127.0.0.1", relay.port)) as extra:
                extra.settimeout(30)
                assert extra.recv(1024) == b""  # closed unanswered
            idle.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert idle.recv(1024).startswith(b"HTTP/1.0 200")

        def answered() -> bytes | None:
            try:
                return fetch(relay.port, "/metrics").body
            except ConnectionError:  # refused: the slot is released just after the answer
                return None

        assert wait_until(answered, "the slot to be free again") == METRICS
    finally:
        relay.close()


def test_a_port_in_use_is_an_os_error_and_close_releases_the_port(
    exporter: FakeExporter,
) -> None:
    relay = MetricsRelay("127.0.0.1", 0, exporter.server_address[1])
    with pytest.raises(OSError):
        MetricsRelay("127.0.0.1", relay.port, exporter.server_address[1])
    relay.close()
    MetricsRelay("127.0.0.1", relay.port, exporter.server_address[1]).close()
