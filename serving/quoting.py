"""Client text in refusal messages: quoted, and cut to a length a person and a log can take.

A refusal names what it refuses (a model, a version, an input, a key), but the name comes from
the client and may be 100 KB long; echoing it whole would turn every refusal into an
amplifier. Every message that quotes client text goes through :func:`quote`.
"""

from __future__ import annotations

QUOTE_LIMIT = 100
"""The most characters of client text a message quotes."""


def quote(value: object) -> str:
    """``repr(value)``, with text past :data:`QUOTE_LIMIT` characters cut off and marked "…"."""
    if isinstance(value, str | bytes) and len(value) > QUOTE_LIMIT:
        return f"{value[:QUOTE_LIMIT]!r}…"
    text = repr(value)
    return text if len(text) <= QUOTE_LIMIT else f"{text[:QUOTE_LIMIT]}…"
