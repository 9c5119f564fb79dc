"""The serializer's atom check (one bytes.translate pass) accepts exactly the atoms."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from yimaporc.imap._lexer import ATOM_CHARS
from yimaporc.imap._serialize import _check_atom


def by_definition(value: str, extra: str) -> bytes | None:
    """The check spelled out character by character (None: not an atom)."""
    data = value.encode("ascii", "strict") if value.isascii() else b""
    if not data or any(b not in ATOM_CHARS and chr(b) not in extra for b in data):
        return None
    return data


@given(
    st.text(alphabet=st.characters(max_codepoint=0x8F), max_size=12)
    | st.sampled_from(["AUTH=PLAIN", "\\Seen", "a]b", "x y", "", "é", "LITERAL+"]),
    st.sampled_from(["", "=", "]"]),
)
def test_atom_check_matches_the_definition(value: str, extra: str) -> None:
    """Every string, with or without extra allowed characters: the same bytes or a
    ValueError as the character-by-character definition."""
    want = by_definition(value, extra)
    if want is None:
        with pytest.raises(ValueError):
            _check_atom(value, extra)
    else:
        assert _check_atom(value, extra) == want
