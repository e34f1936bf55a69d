"""espro_client over TLS: ``https://`` and ``grpcs://`` verify the server against a CA bundle,
present a client certificate to a server that requires one, fail with a clear
:class:`TLSError` that is not retried, and a token never leaves loopback in clear text
unless told to. Against in-process HTTPS and gRPC servers on loopback with canned answers,
their certificates made here by a throwaway CA."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from espro_client import AsyncClient, Client, Protocol, Retry, TLSError, Unavailable
from espro_client._proto import grpc_predict_v2_pb2 as pb
from espro_client._proto import grpc_predict_v2_pb2_grpc as pb_grpc
from espro_client.cli import main

FAST = Retry(attempts=3, backoff=0.0)
HTTP_PROTOCOLS: list[Protocol] = ["native", "oip-rest"]

# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate it signed for 127.0.0.1 and localhost, a client
    certificate it signed, and another CA that signed neither."""

    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    """A one-day certificate for ``key``: a CA's when ``issuer`` is ``None`` (self-signed),
    else a leaf for ``usage`` (a server's also names 127.0.0.1 and localhost)."""
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if issuer is None else issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        return builder.sign(key, hashes.SHA256())
    assert usage is not None
    builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False
    )
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer[1], hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")

    def write(name: str, pem: bytes) -> Path:
        (root / name).write_bytes(pem)
        return root / name

    def cert_pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key, other_key, server_key, client_key = (
        ec.generate_private_key(ec.SECP256R1()) for _ in range(4)
    )
    ca = _certificate("espro test CA", ca_key)
    server = _certificate("localhost", server_key, (ca, ca_key), ExtendedKeyUsageOID.SERVER_AUTH)
    client = _certificate("client", client_key, (ca, ca_key), ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(
        ca=write("ca.pem", cert_pem(ca)),
        other_ca=write("other-ca.pem", cert_pem(_certificate("another CA", other_key))),
        server_cert=write("server.pem", cert_pem(server)),
        server_key=write("server.key", key_pem(server_key)),
        client_cert=write("client.pem", cert_pem(client)),
        client_key=write("client.key", key_pem(client_key)),
    )


# --------------------------------------------------------------------------- servers

MODELS = {"models": [{"name": "m", "versions": [{"version": "1", "bundle_sha256": "ab"}]}]}
METADATA = {
    "name": "m",
    "versions": ["1"],
    "platform": "stub",
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [],
}
ANSWERS: dict[str, Any] = {
    "/v2/health/live": {"live": True},
    "/v2/health/ready": {"ready": True},
    "/v1/models": MODELS,
    "/v2/models/m": METADATA,
}


class Canned(BaseHTTPRequestHandler):
    """Answers the GETs of :data:`ANSWERS`; records each request's Authorization header."""

    server: HttpsServer

    def do_GET(self) -> None:
        self.server.tokens.append(self.headers.get("Authorization"))
        answer = ANSWERS.get(self.path)
        body = json.dumps(answer or {"error": f"no route {self.path}"}).encode()
        self.send_response(200 if answer else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class HttpsServer(ThreadingHTTPServer):
    """HTTPS on 127.0.0.1 with the server certificate; ``mtls``: clients must present a
    certificate the CA signed. Counts the connections it accepts."""

    daemon_threads = True

    def __init__(self, pki: Pki, mtls: bool) -> None:
        super().__init__(("127.0.0.1", 0), Canned)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.server_cert, pki.server_key)
        if mtls:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(pki.ca)
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self.tokens: list[str | None] = []
        self.connections = 0

    def get_request(self) -> Any:
        self.connections += 1  # before the handshake, which runs in accept()
        return super().get_request()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server_address[1]}"


@contextmanager
def https_server(pki: Pki, mtls: bool = False) -> Iterator[HttpsServer]:
    server = HttpsServer(pki, mtls)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class CannedGrpc(pb_grpc.GRPCInferenceServiceServicer):
    """Live, ready and one model's metadata; records each call's ``authorization``."""

    def __init__(self) -> None:
        self.tokens: list[str | None] = []

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=True)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.tokens.append(dict(context.invocation_metadata()).get("authorization"))
        return pb.ModelMetadataResponse(name=request.name, platform="stub")


@dataclass
class GrpcsServer:
    url: str
    servicer: CannedGrpc


@contextmanager
def grpcs_server(pki: Pki, mtls: bool = False) -> Iterator[GrpcsServer]:
    """gRPC over TLS on 127.0.0.1, as :class:`HttpsServer`."""
    servicer = CannedGrpc()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca.read_bytes() if mtls else None,
        require_client_auth=mtls,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield GrpcsServer(f"grpcs://127.0.0.1:{port}", servicer)
    finally:
        server.stop(None)


def ask(client: Client) -> str:
    """A call every protocol answers (``native``: the model list; OIP: metadata)."""
    if client.protocol == "native":
        return client.models()[0].name
    return client.metadata("m").name


async def aask(client: AsyncClient) -> str:
    if client.protocol == "native":
        return (await client.models())[0].name
    return (await client.metadata("m")).name


# --------------------------------------------------------------------------- HTTPS


@pytest.mark.parametrize("protocol", HTTP_PROTOCOLS)
def test_https_verifies_the_server_with_the_ca_and_carries_the_token(
    pki: Pki, protocol: Protocol
) -> None:
    with https_server(pki) as server:
        localhost = server.url.replace("127.0.0.1", "localhost")
        for url in (server.url, localhost):
            with Client(url, protocol=protocol, ca_cert=pki.ca, token="tok") as c:
                assert ask(c) == "m" and c.health()

            async def run(url: str = url) -> str:
                async with AsyncClient(url, protocol=protocol, ca_cert=str(pki.ca)) as c:
                    return await aask(c)

            assert asyncio.run(run()) == "m"
    assert server.tokens.count("Bearer tok") == 4


@pytest.mark.parametrize("protocol", HTTP_PROTOCOLS)
@pytest.mark.parametrize("ca", ["default", "other"])
def test_https_without_the_ca_is_a_tls_error_and_not_retried(
    pki: Pki, protocol: Protocol, ca: str
) -> None:
    ca_cert = pki.other_ca if ca == "other" else None
    with (
        https_server(pki) as server,
        Client(server.url, protocol=protocol, ca_cert=ca_cert, retry=FAST) as c,
    ):
        with pytest.raises(TLSError, match="certificate does not verify") as err:
            ask(c)
        with pytest.raises(TLSError):
            c.health()  # not "down": the configuration is wrong
    assert len(str(err.value).splitlines()) == 1 and "ca_cert" in str(err.value)
    assert server.connections == 2 and server.tokens == []


@pytest.mark.parametrize("protocol", HTTP_PROTOCOLS)
def test_https_mutual_tls(pki: Pki, protocol: Protocol) -> None:
    with https_server(pki, mtls=True) as server:
        mtls = Client(
            server.url,
            protocol=protocol,
            ca_cert=pki.ca,
            client_cert=pki.client_cert,
            client_key=pki.client_key,
        )
        with mtls:
            assert ask(mtls) == "m"
        plain = Client(server.url, protocol=protocol, ca_cert=pki.ca, retry=FAST)
        with plain, pytest.raises(TLSError, match=r"handshake failed.*CERTIFICATE_REQUIRED"):
            ask(plain)
    assert server.connections == 2


# --------------------------------------------------------------------------- gRPC over TLS


def test_grpcs_verifies_the_server_with_the_ca_and_carries_the_token(pki: Pki) -> None:
    with grpcs_server(pki) as server:
        with Client(server.url, protocol="oip-grpc", ca_cert=pki.ca, token="tok") as c:
            assert ask(c) == "m" and c.health() and c.ready()

        async def run() -> str:
            async with AsyncClient(server.url, protocol="oip-grpc", ca_cert=pki.ca) as c:
                return await aask(c)

        assert asyncio.run(run()) == "m"
    assert server.servicer.tokens == ["Bearer tok", None]


@pytest.mark.parametrize("ca", ["default", "other"])
def test_grpcs_without_the_ca_is_a_tls_error_and_not_retried(pki: Pki, ca: str) -> None:
    ca_cert = pki.other_ca if ca == "other" else None
    with grpcs_server(pki) as server:
        c = Client(server.url, protocol="oip-grpc", ca_cert=ca_cert, retry=FAST)
        with c, pytest.raises(TLSError, match="certificate does not verify") as err:
            ask(c)

        async def run() -> None:
            async with AsyncClient(server.url, protocol="oip-grpc", ca_cert=ca_cert) as c:
                await aask(c)

        with pytest.raises(TLSError, match="certificate does not verify"):
            asyncio.run(run())
    assert len(str(err.value).splitlines()) == 1 and "ca_cert" in str(err.value)
    assert server.servicer.tokens == []


def test_grpcs_mutual_tls(pki: Pki) -> None:
    """A server that refuses a client without a certificate closes the connection, which is
    all gRPC reports: ``Unavailable``."""
    with grpcs_server(pki, mtls=True) as server:
        mtls = Client(
            server.url,
            protocol="oip-grpc",
            ca_cert=pki.ca,
            client_cert=pki.client_cert,
            client_key=pki.client_key,
        )
        with mtls:
            assert ask(mtls) == "m"
        plain = Client(server.url, protocol="oip-grpc", ca_cert=pki.ca, retry=FAST)
        with plain, pytest.raises(Unavailable):
            ask(plain)
    assert server.servicer.tokens == [None]


# --------------------------------------------------------------------------- refusals


def test_tls_files_are_checked_before_anything_is_sent(pki: Pki, tmp_path: Path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    for protocol, url in [("native", "https://127.0.0.1:1"), ("oip-grpc", "grpcs://127.0.0.1:1")]:
        with pytest.raises(ValueError, match=r"ca_cert .*No such file"):
            Client(url, protocol=protocol, ca_cert=tmp_path / "missing.pem")
        with pytest.raises(ValueError, match=r"ca_cert .*not\.pem"):
            Client(url, protocol=protocol, ca_cert=not_pem)
        with pytest.raises(ValueError, match="client_cert, client_key"):
            Client(url, protocol=protocol, client_cert=pki.client_cert, client_key=pki.server_key)
        with pytest.raises(ValueError, match="go together"):
            Client(url, protocol=protocol, client_cert=pki.client_cert)


@pytest.mark.parametrize(
    ("protocol", "url"), [("native", "http://127.0.0.1:1"), ("oip-grpc", "grpc://127.0.0.1:1")]
)
def test_tls_options_need_a_tls_url(pki: Pki, protocol: Protocol, url: str) -> None:
    with pytest.raises(ValueError, match="need an https:// or grpcs:// URL"):
        Client(url, protocol=protocol, ca_cert=pki.ca)


@pytest.mark.parametrize(
    ("protocol", "url"),
    [("native", "grpcs://127.0.0.1:1"), ("oip-rest", "127.0.0.1:1"), ("oip-grpc", "https://x")],
)
def test_a_url_of_another_protocol_is_refused(protocol: Protocol, url: str) -> None:
    with pytest.raises(ValueError, match="needs a"):
        Client(url, protocol=protocol)


@pytest.mark.parametrize(
    ("protocol", "url"),
    [
        ("native", "http://espro.test:8000"),
        ("oip-rest", "http://10.1.2.3:8000"),
        ("oip-grpc", "grpc://espro.test:9000"),
        ("oip-grpc", "10.1.2.3:9000"),
    ],
)
def test_a_token_is_not_sent_in_clear_text_beyond_loopback(protocol: Protocol, url: str) -> None:
    """Refused when the client is made, so nothing is sent; ``allow_insecure`` lifts it."""
    with pytest.raises(ValueError, match="refusing to send the token in clear text"):
        Client(url, protocol=protocol, token="tok")
    Client(url, protocol=protocol, token="tok", allow_insecure=True).close()
    Client(url, protocol=protocol).close()


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000", "grpc://127.0.0.2:1"],
)
def test_a_token_may_go_in_clear_text_to_loopback(url: str) -> None:
    protocol: Protocol = "oip-grpc" if url.startswith("grpc") else "native"
    Client(url, protocol=protocol, token="tok").close()


# --------------------------------------------------------------------------- command line


def test_the_cli_verifies_with_ca_cert_and_presents_client_cert(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "token"
    token.write_text("tok\n")
    with https_server(pki, mtls=True) as server:
        flags = ["--ca-cert", str(pki.ca), "--client-cert", str(pki.client_cert)]
        flags += ["--client-key", str(pki.client_key), "--token-file", str(token)]
        assert main(["health", server.url, *flags]) == 0
        assert json.loads(capsys.readouterr().out) == {"live": True, "ready": True}
        assert main(["models", server.url, "--ca-cert", str(pki.ca)]) == 1
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"error: {server.url}: ") and "handshake failed" in line
    assert server.tokens == ["Bearer tok"] * 2
    with grpcs_server(pki) as grpcs:
        assert main(["health", grpcs.url, "--ca-cert", str(pki.ca)]) == 0
        assert json.loads(capsys.readouterr().out) == {"live": True, "ready": True}


def test_the_cli_refuses_tls_flags_and_insecure_tokens_in_one_line(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "token"
    token.write_text("tok\n")
    missing = str(tmp_path / "missing.pem")
    for argv in (
        ["health", "https://127.0.0.1:1", "--ca-cert", missing],
        ["health", "https://127.0.0.1:1", "--client-cert", str(pki.client_cert)],
        ["health", "http://127.0.0.1:1", "--ca-cert", str(pki.ca)],
        ["health", "http://espro.test:8000", "--token-file", str(token)],
    ):
        assert main(argv) == 2, argv
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("error: "), line


def test_the_cli_says_in_one_line_that_the_server_is_not_trusted(pki: Pki) -> None:
    """In its own process, so that gRPC's own log lines would show on stderr."""
    with https_server(pki) as https, grpcs_server(pki) as grpcs:
        for url in (https.url, grpcs.url):
            command = [sys.executable, "-m", "espro_client.cli", "health", url]
            result = subprocess.run(command, capture_output=True, text=True, timeout=60)
            assert result.returncode == 1, result.stderr
            (line,) = result.stderr.splitlines()
            assert line.startswith(f"error: {url}: the server's certificate does not verify")
