"""The IMAP response serializer: correct by construction, checked by a small reference
parser that reads responses back (strings, literals, NIL, lists, codes)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from yimaporc.imap import _serialize as s
from yimaporc.imap._serialize import ResponseCode, StatusResponse, serialize


class Ref:
    """A reference reader of one response: atoms as str, strings as bytes, NIL as None,
    lists as python lists, ``[...]`` as ("code", [...])."""

    def __init__(self, data: bytes) -> None:
        assert data.endswith(b"\r\n")
        self.data = data
        self.pos = 0

    def read_all(self) -> list[Any]:
        out = []
        while True:
            if self.data[self.pos :] == b"\r\n":
                return out
            out.append(self.token())
            if self.data[self.pos :] == b"\r\n":
                return out
            assert self.data[self.pos] == 0x20, (self.data, self.pos)
            self.pos += 1

    def token(self) -> Any:
        b = self.data[self.pos]
        if b == 0x22:
            self.pos += 1
            out = bytearray()
            while self.data[self.pos] != 0x22:
                ch = self.data[self.pos]
                assert ch not in b"\r\n"
                if ch == 0x5C:
                    self.pos += 1
                    assert self.data[self.pos] in b'"\\'
                out.append(self.data[self.pos])
                self.pos += 1
            self.pos += 1
            return bytes(out)
        if b == 0x7B:
            end = self.data.index(b"}\r\n", self.pos)
            n = int(self.data[self.pos + 1 : end])
            self.pos = end + 3 + n
            return self.data[end + 3 : end + 3 + n]
        if b in (0x28, 0x5B):
            close = 0x29 if b == 0x28 else 0x5D
            self.pos += 1
            items = []
            while self.data[self.pos] != close:
                items.append(self.token())
                if self.data[self.pos] == 0x20:
                    self.pos += 1
            self.pos += 1
            return items if b == 0x28 else ("code", items)
        start = self.pos
        while self.data[self.pos] not in b" ()[]\r":
            self.pos += 1
            # BODY[...] items keep their bracketed section in the atom
            if self.data[self.pos] == 0x5B and self.data[start : self.pos].upper() in (
                b"BODY",
                b"BINARY",
            ):
                self.pos = self.data.index(b"]", self.pos) + 1
        word = self.data[start : self.pos].decode("ascii")
        return None if word == "NIL" else word


def ref(data: bytes) -> list[Any]:
    return Ref(data).read_all()


def _norm(value: Any) -> Any:
    """The reference reading of a nested value: numbers are atoms, tuples lists, str bytes."""
    if value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes):
        return value
    return [_norm(v) for v in value]


_nested = st.recursive(
    st.one_of(st.none(), st.binary(max_size=40), st.integers(0, 2**40)),
    lambda inner: st.lists(inner, max_size=4).map(tuple),
    max_leaves=20,
)
# A keyword spelt NIL is a legal atom, but the generic reader below cannot tell
# it from NIL without knowing it reads a flag list: left out here.
_keyword = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789$_-", min_size=1, max_size=10
).filter(lambda k: k.upper() != "NIL")
_flags = st.lists(
    st.one_of(st.sampled_from(["\\Seen", "\\Deleted", "\\Flagged"]), _keyword), max_size=4
)


@given(st.integers(1, 2**32 - 1), st.binary(max_size=300), _nested, _flags, st.integers(0, 2**62))
def test_fetch_roundtrip(
    seq: int, body: bytes, structure: Any, flags: list[str], modseq: int
) -> None:
    """FETCH data with arbitrary octets and structures reads back equal."""
    data = serialize(
        s.fetch(
            seq,
            [("FLAGS", flags), ("BODY[1.2]<0>", body), ("ENVELOPE", structure), ("MODSEQ", modseq)],
        )
    )
    star, number, word, items = ref(data)
    assert (star, number, word) == ("*", str(seq), "FETCH")
    assert items == [
        "FLAGS",
        flags,
        "BODY[1.2]<0>",
        body,
        "ENVELOPE",
        _norm(structure),
        "MODSEQ",
        [str(modseq)],
    ]


@given(st.binary(max_size=2000))
def test_string_safe(data: bytes) -> None:
    """A string is quoted only for short printable 7-bit text; anything else is a literal."""
    out = s.string(data)
    if any(b in data for b in b"\r\n\x00") or any(b >= 128 for b in data) or len(data) > 1000:
        assert out.startswith(b"{")
    assert Ref(out + b"\r\n").token() == data
    assert s.nstring(None) == b"NIL"


@given(st.text(max_size=100))
def test_response_text_forced_ascii(text: str) -> None:
    """Response text of any content becomes one printable-ASCII line."""
    out = serialize(StatusResponse("NO", text, ResponseCode("TRYCREATE"), "a1"))
    assert out.endswith(b"\r\n") and b"\r" not in out[:-2] and b"\n" not in out[:-2]
    assert all(32 <= b < 127 for b in out[:-2])
    assert out.startswith(b"a1 NO [TRYCREATE] ")


@given(st.text(min_size=1, max_size=40).filter(lambda t: "\x00" not in t))
def test_list_name_roundtrip(name: str) -> None:
    """A LIST line with any mailbox name reads back to that name."""
    out = serialize(s.list_item(("\\HasNoChildren", "\\Sent"), "/", name))
    assert ref(out) == ["*", "LIST", ["\\HasNoChildren", "\\Sent"], b"/", name.encode()]


CODES = [
    (ResponseCode("ALERT"), b"[ALERT]"),
    (ResponseCode("TRYCREATE"), b"[TRYCREATE]"),
    (ResponseCode("NONEXISTENT"), b"[NONEXISTENT]"),
    (ResponseCode("ALREADYEXISTS"), b"[ALREADYEXISTS]"),
    (ResponseCode("TOOBIG"), b"[TOOBIG]"),
    (ResponseCode("AUTHENTICATIONFAILED"), b"[AUTHENTICATIONFAILED]"),
    (ResponseCode("UNAVAILABLE"), b"[UNAVAILABLE]"),
    (ResponseCode("CANNOT"), b"[CANNOT]"),
    (ResponseCode("READ-ONLY"), b"[READ-ONLY]"),
    (ResponseCode("READ-WRITE"), b"[READ-WRITE]"),
    (ResponseCode("NOMODSEQ"), b"[NOMODSEQ]"),
    (ResponseCode("CLOSED"), b"[CLOSED]"),
    (ResponseCode.number("UIDNEXT", 7), b"[UIDNEXT 7]"),
    (ResponseCode.number("UIDVALIDITY", 3857529045), b"[UIDVALIDITY 3857529045]"),
    (ResponseCode.number("UNSEEN", 12), b"[UNSEEN 12]"),
    (ResponseCode.number("HIGHESTMODSEQ", 715194045007), b"[HIGHESTMODSEQ 715194045007]"),
    (
        ResponseCode("PERMANENTFLAGS", ("\\Deleted", "\\Seen", "\\*")),
        b"[PERMANENTFLAGS (\\Deleted \\Seen \\*)]",
    ),
    (ResponseCode.appenduid(38505, "3955"), b"[APPENDUID 38505 3955]"),
    (
        ResponseCode.copyuid(38505, "304,319:320", "3956:3958"),
        b"[COPYUID 38505 304,319:320 3956:3958]",
    ),
    (ResponseCode("CAPABILITY", ("IMAP4rev1", "AUTH=PLAIN")), b"[CAPABILITY IMAP4rev1 AUTH=PLAIN]"),
    (ResponseCode("BADCHARSET", ("UTF-8",)), b"[BADCHARSET (UTF-8)]"),
    (ResponseCode("MODIFIED", ("7,9",)), b"[MODIFIED 7,9]"),
]


@pytest.mark.parametrize(("code", "wire"), CODES, ids=[w.decode() for _, w in CODES])
def test_response_codes(code: ResponseCode, wire: bytes) -> None:
    """Each response code the server uses is written as the RFCs spell it."""
    assert code.to_bytes() == wire


@pytest.mark.parametrize(
    "bad",
    [
        lambda: ResponseCode("BOGUS"),
        lambda: ResponseCode("UIDNEXT", (-1,)),
        lambda: ResponseCode("TRYCREATE", ("x",)),
        lambda: ResponseCode("PERMANENTFLAGS", ("\\Se en",)),
        lambda: ResponseCode.copyuid(1, "1:2", "3 4"),
        lambda: s.flags(["bad flag"]),
        lambda: s.flags(["caf\xe9"]),
        lambda: s.fetch(1, [("FLAGS", ["a(b"])]),
        lambda: s.fetch(1, [("UID", -1)]),
        lambda: s.fetch(0, [("UID", 1)]),
        lambda: s.fetch(1, [("UNKNOWN", 1)]),
        lambda: s.nested(object()),
        lambda: StatusResponse("MAYBE", "x"),
        lambda: StatusResponse("BYE", "x", tag="a"),
        lambda: StatusResponse("OK", "x", tag="a b"),
    ],
)
def test_refuses_what_cannot_be_written(bad: Any) -> None:
    """Values that would produce a wrong response raise ValueError at construction."""
    with pytest.raises(ValueError):
        bad()


def test_capability_code_is_checked_once_per_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CAPABILITY list built again (every greeting, every LOGIN) is not checked atom by
    atom again; a list with a bad atom is refused every time, a non-string too."""
    calls: list[str] = []
    real = s._check_atom

    def counted(value: str, extra: str = "") -> bytes:
        calls.append(value)
        return real(value, extra)

    monkeypatch.setattr(s, "_check_atom", counted)
    names = ("IMAP4rev1", "AUTH=PLAIN", "X-CACHE-TEST")
    for _ in range(50):
        code = ResponseCode("CAPABILITY", names)
        assert code.to_bytes() == b"[CAPABILITY IMAP4rev1 AUTH=PLAIN X-CACHE-TEST]"
    assert len(calls) == len(names)
    for _ in range(2):
        with pytest.raises(ValueError):
            ResponseCode("CAPABILITY", ("X-CACHE-TEST", "bad atom"))
        with pytest.raises((ValueError, AttributeError)):
            ResponseCode("CAPABILITY", ("X-CACHE-TEST", 7))


def test_data_responses() -> None:
    """The untagged data responses are spelled as in RFC 3501/9051 and their extensions."""
    cases = [
        (s.capability(["IMAP4rev1", "IDLE"]), b"* CAPABILITY IMAP4rev1 IDLE\r\n"),
        (s.enabled(["CONDSTORE"]), b"* ENABLED CONDSTORE\r\n"),
        (s.exists(23), b"* 23 EXISTS\r\n"),
        (s.recent(0), b"* 0 RECENT\r\n"),
        (s.expunge(3), b"* 3 EXPUNGE\r\n"),
        (s.vanished("41,43:116", earlier=True), b"* VANISHED (EARLIER) 41,43:116\r\n"),
        (s.flags(["\\Answered", "$Forwarded"]), b"* FLAGS (\\Answered $Forwarded)\r\n"),
        (s.list_item((), "/", "INBOX", lsub=True), b'* LSUB () "/" "INBOX"\r\n'),
        (s.list_item(("\\Noselect",), None, ""), b'* LIST (\\Noselect) NIL ""\r\n'),
        (
            s.status("blurdybloop", [("MESSAGES", 231), ("UIDNEXT", 44292)]),
            b"* STATUS blurdybloop (MESSAGES 231 UIDNEXT 44292)\r\n",
        ),
        (s.status("a b", [("UNSEEN", 0)]), b'* STATUS "a b" (UNSEEN 0)\r\n'),
        (s.search([2, 84, 882]), b"* SEARCH 2 84 882\r\n"),
        (s.search([]), b"* SEARCH\r\n"),
        (s.search([2], modseq=917162500), b"* SEARCH 2 (MODSEQ 917162500)\r\n"),
        (
            s.esearch("A282", True, [("MIN", 2), ("COUNT", 3), ("ALL", "2,10:11")]),
            b'* ESEARCH (TAG "A282") UID MIN 2 COUNT 3 ALL 2,10:11\r\n',
        ),
        (s.id_response(None), b"* ID NIL\r\n"),
        (s.id_response([("name", "x"), ("os", None)]), b'* ID ("name" "x" "os" NIL)\r\n'),
        (s.namespace([("", "/")]), b'* NAMESPACE (("" "/")) NIL NIL\r\n'),
        (
            s.fetch(12, [("INTERNALDATE", 838002265)]),
            b'* 12 FETCH (INTERNALDATE "22-Jul-1996 02:24:25 +0000")\r\n',
        ),
        (
            s.fetch(1, [("RFC822.SIZE", 44827), ("BODY[HEADER.FIELDS (X-TUID)]", None)]),
            b"* 1 FETCH (RFC822.SIZE 44827 BODY[HEADER.FIELDS (X-TUID)] NIL)\r\n",
        ),
        (s.Continuation(), b"+ Ready\r\n"),
        (s.Continuation(data=b"\x00abc"), b"+ AGFiYw==\r\n"),
        (StatusResponse("BYE", "bye \u00e9"), b"* BYE bye ?\r\n"),
        (StatusResponse("OK", "[fake] code"), b"* OK (fake] code\r\n"),
    ]
    for response, wire in cases:
        assert serialize(response) == wire


def test_utf8_envelope_is_a_literal() -> None:
    """A raw UTF-8 header in ENVELOPE (issue 15's dropped connection) goes out as a literal."""
    out = serialize(s.fetch(1, [("ENVELOPE", (None, "Grüße".encode(), None))]))
    assert out == b"* 1 FETCH (ENVELOPE (NIL {7}\r\nGr\xc3\xbc\xc3\x9fe NIL))\r\n"
