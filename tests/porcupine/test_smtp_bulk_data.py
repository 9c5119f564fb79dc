"""SMTP message text taken in bulk stores exactly what the line-by-line path stored."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given, settings
from test_smtp_hostile import POLICY, codes, server

HEAD = b"EHLO c\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n"
RECEIVED = b"Received: from c"


def by_lines(text: bytes) -> bytes | None:
    """The stored body by the line-by-line rules (stock twisted.mail plus Transaction.line):
    None (refused) if a line has a bare CR or LF; else the Received line; a blank line
    before a first line that is not a header; each line un-dot-stuffed; CRLF after each."""
    lines = text.split(b"\r\n")[:-1]
    if any(b"\n" in line or b"\r" in line for line in lines):
        return None
    out = [RECEIVED]
    for i, line in enumerate(lines):
        if line[:1] == b".":
            line = line[1:]
        if i == 0 and b":" not in line and line:
            out.append(b"")
        out.append(line)
    return b"\r\n".join(out) + b"\r\n"


_piece = st.sampled_from(
    [b"\r\n", b".", b"..", b"\r", b"\n", b"a", b"Subject: x", b":", b" ", b"\r\n.", b"..\r\n"]
)
_text = (
    st.lists(_piece, max_size=40)
    .map(b"".join)
    .map(lambda t: t if t.endswith(b"\r\n") else t + b"\r\n")
)


def _without_terminator(text: bytes) -> bytes:
    """``text`` with every line that is a lone dot made '..' (the client's stuffing)."""
    lines = text.split(b"\r\n")
    return b"\r\n".join(b".." if ln == b"." else ln for ln in lines)


@settings(deadline=None)  # examples from the profile (fuzz: 1000)
@given(_text.map(_without_terminator), st.lists(st.integers(1, 50), max_size=12))
def test_bulk_equals_line_by_line_in_any_chunking(text: bytes, cuts: list[int]) -> None:
    """Whatever the text (dots, bare CR/LF, headerless first line) and however TCP cuts
    it, the stored body is the line-by-line one, answered 250 (or nothing stored and 550
    for a bare CR or LF), then QUIT 221."""
    p, t, stored, _ = server()
    p.dataReceived(HEAD)
    wire = text + b".\r\nQUIT\r\n"
    at = 0
    for c in cuts:
        p.dataReceived(wire[at : at + c])
        at += c
    p.dataReceived(wire[at:])
    body = by_lines(text)
    assert codes(t)[-2:] == ([b"550"] if body is None else [b"250"]) + [b"221"]
    assert stored == ([] if body is None else [body])


def test_a_plain_message_goes_in_bulk_and_odd_chunks_line_by_line() -> None:
    """A CRLF-only message after its first line is one bulk chunk; a chunk with a bare LF
    is taken line by line (and refused); the size limit still gives 552."""
    p, t, stored, _ = server()
    p.dataReceived(HEAD)  # a client sends the text after the 354 (RFC 2920)
    p.dataReceived(b"Subject: s\r\n\r\n" + b"line\r\n..dot\r\n" * 50 + b".\r\nQUIT\r\n")
    assert p.bulk_chunks == 1 and codes(t)[-2:] == [b"250", b"221"]
    assert stored[0].endswith(b"\r\n\r\n" + b"line\r\n.dot\r\n" * 50)
    p, t, stored, _ = server()
    p.dataReceived(HEAD + b"Subject: s\r\n")
    p.dataReceived(b"bare\nlf\r\n.\r\n")
    assert p.bulk_chunks == 0 and stored == [] and codes(t)[-1] == b"550"
    p, t, stored, _ = server()
    p.dataReceived(HEAD + b"Subject: s\r\n")
    p.dataReceived(b"x" * 1000 + b"\r\n")
    for _ in range(POLICY.max_message_size // 1000 + 2):
        p.dataReceived(b"y" * 998 + b"\r\n")
    p.dataReceived(b".\r\n")
    assert codes(t)[-1] == b"552" and stored == []
