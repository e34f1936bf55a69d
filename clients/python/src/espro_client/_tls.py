"""TLS settings for the transports, and the check that keeps a token out of clear text.

A URL's scheme says whether a connection is encrypted: ``https://`` (native, oip-rest) and
``grpcs://`` (oip-grpc) are, ``http://``, ``grpc://`` and a bare ``host:port`` are not.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from espro_client.errors import TLSError

SECURE_SCHEMES = ("https://", "grpcs://")


@dataclass(frozen=True)
class Tls:
    """The CA bundle that verifies the server (``None``: the default trust store) and the
    certificate and key this client presents to a server that asks for one (mutual TLS)."""

    ca_cert: str | Path | None = None
    client_cert: str | Path | None = None
    client_key: str | Path | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key (--client-cert, --client-key) go together")

    @property
    def configured(self) -> bool:
        return self.ca_cert is not None or self.client_cert is not None

    def ssl_context(self) -> ssl.SSLContext:
        """A client context verifying the server's certificate and name: against ``ca_cert``
        alone, or else the system's trust store (OpenSSL's default locations, which
        ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` override). A ``ValueError`` names a file that
        is unreadable or holds no certificate or key."""
        try:
            context = ssl.create_default_context(cafile=self.ca_cert)
        except (OSError, ValueError) as err:
            raise ValueError(f"ca_cert (--ca-cert) {self.ca_cert}: {_reason(err)}") from None
        if self.client_cert is not None:
            try:
                context.load_cert_chain(self.client_cert, self.client_key)
            except (OSError, ValueError) as err:
                files = f"{self.client_cert}, {self.client_key}"
                raise ValueError(
                    f"client_cert, client_key (--client-cert, --client-key) {files}: {_reason(err)}"
                ) from None
        return context

    def pem(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """The CA bundle, client key and client certificate as gRPC takes them, each checked
        by loading it as :meth:`ssl_context` does."""
        self.ssl_context()
        return _read(self.ca_cert), _read(self.client_key), _read(self.client_cert)


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def _reason(err: Exception) -> str:
    """An ``ssl`` or file error's message, without the source line OpenSSL's carry."""
    if isinstance(err, OSError) and err.strerror and not isinstance(err, ssl.SSLError):
        return err.strerror
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(err))


def is_secure(url: str) -> bool:
    return url.startswith(SECURE_SCHEMES)


def host(url: str) -> str:
    """The host of ``scheme://host:port`` or of a bare ``host:port``."""
    return urlsplit(url if "://" in url else f"//{url}").hostname or ""


def is_loopback(name: str) -> bool:
    """Whether ``name`` (an address or ``localhost``) is reachable only from this machine; a
    host name other than ``localhost`` may resolve to any address."""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_token_is_safe(url: str, allow_insecure: bool) -> None:
    """A ``ValueError`` where a bearer token would cross the network unencrypted: a plain
    URL to a host beyond loopback, unless ``allow_insecure``."""
    if is_secure(url) or allow_insecure or is_loopback(host(url)):
        return
    raise ValueError(
        f"refusing to send the token in clear text to {host(url) or url}: use an https:// "
        "(gRPC: grpcs://) URL, or pass allow_insecure=True (--allow-insecure) for a network "
        "you trust"
    )


NOT_TRUSTED = "pass the CA that signed it as ca_cert (--ca-cert)"


def grpc_tls_error(details: str) -> TLSError | None:
    """The :class:`TLSError` for gRPC's ``UNAVAILABLE`` ``details`` where they name a failed
    handshake (gRPC has no other sign of one). A server that refuses the client's certificate
    closes the connection instead, which gRPC reports as a closed socket: ``Unavailable``."""
    if "handshake failed" not in details.lower():
        return None
    reason = re.search(r"OPENSSL_internal:([A-Z_]+): (.*?)(?:: OK)?$", details)
    if reason and reason[1] == "CERTIFICATE_VERIFY_FAILED":
        return TLSError(f"the server's certificate does not verify ({reason[2]}): {NOT_TRUSTED}")
    return TLSError(f"the TLS handshake failed: {details}")


def tls_error(err: BaseException) -> TLSError | None:
    """The :class:`TLSError` for a failed HTTP connection whose cause is TLS, where one is:
    the server's certificate does not verify, or the server refused this client's. A
    connection closed mid-handshake is not one (it may succeed later)."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return TLSError(
                f"the server's certificate does not verify ({cause.verify_message}): {NOT_TRUSTED}"
            )
        if isinstance(cause, ssl.SSLError) and not isinstance(
            cause, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError
        ):
            return TLSError(f"the TLS handshake failed: {_reason(cause)}")
        cause = cause.__cause__ or cause.__context__
    return None
