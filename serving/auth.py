"""Optional bearer-token authentication, the same for the HTTP and gRPC doors.

Tokens come from a file (one per line, so a Kubernetes Secret can be mounted and rotated);
they never appear in configs, messages or logs. Every presented token is compared with every
configured one in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

from serving.errors import ServiceError


class BearerTokens:
    """The tokens a request may present as ``Authorization: Bearer <token>``; none: open."""

    def __init__(self, tokens: Iterable[str] = ()) -> None:
        self._tokens = [token.encode() for token in tokens]

    @classmethod
    def from_file(cls, path: str | Path) -> BearerTokens:
        """Tokens from a file: one per line; blank lines and ``#`` comments are skipped."""
        lines = Path(path).read_text().splitlines()
        tokens = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        if not tokens:
            raise ValueError(f"the token file {path} holds no token")
        return cls(tokens)

    @property
    def required(self) -> bool:
        return bool(self._tokens)

    def check(self, authorization: str | None) -> None:
        """Accept an ``Authorization`` header value, or refuse it with a 401."""
        if not self._tokens:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ServiceError(401, "authentication required: send 'Authorization: Bearer <token>'")
        presented = token.strip().encode()
        matched = False
        for known in self._tokens:  # no early exit: the time does not depend on which matched
            matched |= hmac.compare_digest(presented, known)
        if not matched:
            raise ServiceError(401, "the bearer token is not valid")
