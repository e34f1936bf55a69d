"""Bearer tokens: who gets in, what a refusal says, and what it never says."""

from __future__ import annotations

import pytest

from serving.auth import BearerTokens
from serving.errors import ServiceError


def test_no_tokens_means_open():
    tokens = BearerTokens()
    assert not tokens.required
    tokens.check(None)  # no exception


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "authentication required"),
        ("", "authentication required"),
        ("Basic czNjcmV0", "authentication required"),
        ("Bearer ", "authentication required"),
        ("Bearer s3cret-but-wrong", "not valid"),
        ("Bearer s3cre", "not valid"),
    ],
)
def test_refusals_are_401_and_never_echo_the_token(header, message):
    tokens = BearerTokens(["s3cret", "rotated"])
    with pytest.raises(ServiceError) as info:
        tokens.check(header)
    assert info.value.status == 401 and message in info.value.message
    assert "s3cre" not in info.value.message and "rotated" not in info.value.message
    assert info.value.grpc_code.name == "UNAUTHENTICATED"


def test_any_configured_token_is_accepted(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# current and next\ns3cret\n\n  rotated  \n")
    tokens = BearerTokens.from_file(path)
    assert tokens.required
    tokens.check("Bearer s3cret")
    tokens.check("bearer rotated")


def test_an_empty_token_file_is_an_error(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# nothing here\n")
    with pytest.raises(ValueError, match="holds no token"):
        BearerTokens.from_file(path)
