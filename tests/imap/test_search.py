"""SEARCH: compiled keys over message views, what a search needs loaded, ESEARCH helpers.

The expected results (``imapmsg_dovecot.SEARCH``) are what Dovecot 2.3.19 answered
for the same keys on the same mailbox (the corpus APPENDed with the flags and dates
below); two deliberate differences are pinned by their own tests.
"""

from __future__ import annotations

import re

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from imapmsg_corpus import CORPUS
from imapmsg_dovecot import SEARCH

from yimaporc.imap._message import Message, parse_internaldate
from yimaporc.imap._search import (
    MAX_DEPTH,
    Need,
    Scope,
    SearchError,
    Token,
    View,
    compile_search,
    esearch_items,
    format_esearch,
    format_search,
    parse_return_options,
)
from yimaporc.imap._sequence import SequenceSet

DATES = [
    b"07-Feb-1994 21:52:25 -0800",
    b"01-Mar-2022 23:30:00 +0100",
    b"31-Dec-2022 23:59:59 -0500",
    b"15-Jun-2022 00:30:00 +0000",
    b"15-Jun-2022 23:30:00 +0000",
    b"16-Jun-2022 08:00:00 +0200",
    b"17-Jun-2022 12:00:00 +0000",
]
FLAGS = [
    ["\\Seen"],
    ["\\Seen", "\\Flagged", "$Forwarded"],
    [],
    ["\\Answered", "\\Deleted"],
    ["\\Draft", "work"],
    ["\\Seen", "Work"],
    ["\\Flagged"],
]

#: The corpus as Dovecot held it: UIDs 1..7, every message \Recent in that session.
SEARCH_MAILBOX = [
    View(
        seq=i,
        uid=i,
        flags=[*flags, "\\Recent"],
        internaldate=parse_internaldate(date),
        size=len(raw),
        modseq=i + 1,
        message=Message(raw),
    )
    for i, (raw, date, flags) in enumerate(zip(CORPUS.values(), DATES, FLAGS), 1)
]
SCOPE = Scope(last_seq=7, last_uid=7)


def keys(text: str) -> list[Token]:
    """SEARCH key text as the parser hands it over: atoms str, quoted bytes, lists list."""
    data = text.encode()
    stack: list[list[Token]] = [[]]
    i = 0
    while i < len(data):
        ch = data[i : i + 1]
        if ch == b" ":
            i += 1
        elif ch == b"(":
            stack.append([])
            i += 1
        elif ch == b")":
            inner = stack.pop()
            stack[-1].append(inner)
            i += 1
        elif ch == b'"':
            m = re.match(rb'"((?:[^"\\]|\\.)*)"', data[i:])
            assert m is not None
            stack[-1].append(re.sub(rb"\\(.)", rb"\1", m.group(1)))
            i += m.end()
        else:
            m = re.match(rb"[^ ()]+", data[i:])
            assert m is not None
            stack[-1].append(m.group(0).decode())
            i += m.end()
    return stack[0]


def run(text: str, views: list[View] = SEARCH_MAILBOX, scope: Scope = SCOPE) -> list[int]:
    program = compile_search(keys(text), "UTF-8")
    return [v.seq for v in program.search(views, scope)]


#: Where we answer differently from Dovecot 2.3.19, on purpose (see the tests below).
DEVIATIONS = {"NOT (SEEN FLAGGED)", "9:*"}


@pytest.mark.parametrize("query", [q for q in SEARCH if q not in DEVIATIONS])
def test_search_matches_dovecot(query: str) -> None:
    """Each search key gives the messages Dovecot 2.3 gave on the same mailbox."""
    assert run(query) == SEARCH[query]


def test_not_of_a_group_is_de_morgan() -> None:
    """NOT (SEEN FLAGGED) holds a \\Seen-only message (Dovecot 2.3.19 wrongly drops it)."""
    assert run("NOT (SEEN FLAGGED)") == [1, 3, 4, 5, 6, 7]
    assert run("OR UNSEEN UNFLAGGED") == [1, 3, 4, 5, 6, 7]


def test_sequence_range_past_the_end_holds_the_last() -> None:
    """9:* with 7 messages is 7:9 (RFC 3501/9051), so it matches message 7 (Dovecot: none)."""
    assert run("9:*") == [7]
    assert run("9:10") == []


def test_internal_dates_use_the_server_zone() -> None:
    """BEFORE/ON/SINCE read INTERNALDATE's calendar date in the server's zone."""
    east = Scope(7, 7, utc_offset_minutes=120)
    assert run("ON 15-Jun-2022") == [4, 5]
    assert run("ON 15-Jun-2022", scope=east) == [4]
    assert run("ON 16-Jun-2022", scope=east) == [5, 6]


def test_keyword_and_flags_case_insensitive() -> None:
    """KEYWORD matches flags case-insensitively (work and Work)."""
    assert run("KEYWORD WORK") == [5, 6]
    assert run("UNKEYWORD $forwarded") == [1, 3, 4, 5, 6, 7]


def test_literal_search_string_in_utf8() -> None:
    """A UTF-8 literal (bytes) search string matches RFC 2047 and raw 8-bit subjects."""
    program = compile_search(["SUBJECT", "grüße".encode()], "UTF-8")
    assert [v.seq for v in program.search(SEARCH_MAILBOX, SCOPE)] == [2, 3]


def test_other_charsets_decode_the_search_string() -> None:
    """CHARSET ISO-8859-1 reads its octets in Latin-1 and finds the same subjects (Dovecot)."""
    program = compile_search(["SUBJECT", b"gr\xfc\xdfe"], "ISO-8859-1")
    assert [v.seq for v in program.search(SEARCH_MAILBOX, SCOPE)] == [2, 3]
    assert compile_search(["ALL"], "koi8-r").charset == "KOI8-R"


def test_keyword_of_a_system_flag_matches_nothing() -> None:
    """KEYWORD \\Seen is no keyword: it matches nothing, UNKEYWORD \\Seen everything (Dovecot)."""
    assert run("KEYWORD \\Seen") == []
    assert run("UNKEYWORD \\Seen") == [1, 2, 3, 4, 5, 6, 7]


def test_modseq_search() -> None:
    """MODSEQ n matches modseq >= n and marks the program as using MODSEQ."""
    program = compile_search(keys("MODSEQ 6"))
    assert program.uses_modseq
    assert [v.seq for v in program.search(SEARCH_MAILBOX, SCOPE)] == [5, 6, 7]
    assert not compile_search(keys("SEEN")).uses_modseq
    assert compile_search(keys('OR SEEN MODSEQ "/flags/\\\\seen" priv 3')).uses_modseq


@pytest.mark.parametrize(
    ("query", "need"),
    [
        ("SEEN UID 1:* 2 LARGER 5 SINCE 1-Jan-2000 MODSEQ 3", Need.METADATA),
        ("FROM x", Need.HEADERS),
        ("HEADER X-TUID y", Need.HEADERS),
        ("SENTON 1-Jan-2000", Need.HEADERS),
        ("OR SEEN BODY x", Need.FULL),
        ("NOT (SUBJECT a TEXT b)", Need.FULL),
    ],
)
def test_program_says_what_it_needs(query: str, need: Need) -> None:
    """Flags/size/date keys need metadata only; header keys the header; BODY/TEXT it all."""
    assert compile_search(keys(query)).need == need


def test_metadata_search_without_message() -> None:
    """A metadata-only search runs on views with no message loaded."""
    bare = [View(seq=v.seq, uid=v.uid, flags=v.flags, size=v.size) for v in SEARCH_MAILBOX]
    assert run("SEEN LARGER 240", views=bare) == [2, 6]
    with pytest.raises(ValueError):
        run("SUBJECT x", views=bare)


@pytest.mark.parametrize(
    "tokens",
    [
        [],
        ["FOO"],
        ["SEEN", "FOO"],
        ["KEYWORD"],
        ["OR", "SEEN"],
        ["NOT"],
        ["LARGER", "x"],
        ["LARGER", "-1"],
        ["BEFORE", "2022-06-15"],
        ["BEFORE", "31-Foo-2022"],
        ["ON", "32-Jan-2022"],
        ["UID", "x"],
        ["0"],
        [[]],
        [b"subject"],
        ["SUBJECT", ["x"]],
        ["HEADER", "", "x"],
        ["HEADER", "a b", "x"],
        ["SUBJECT", b"\xff\xfe"],
        ["MODSEQ", b"/flags/x", "bogus", "1"],
    ],
)
def test_bad_search_keys(tokens: list[Token]) -> None:
    """Bad syntax, unknown keys and bad arguments raise SearchError answered BAD."""
    with pytest.raises(SearchError) as info:
        compile_search(tokens)
    assert info.value.status == "BAD"
    assert info.value.code is None


def test_bad_charset() -> None:
    """An unknown charset is NO [BADCHARSET (US-ASCII UTF-8)]; known ones in any case."""
    with pytest.raises(SearchError) as info:
        compile_search(["ALL"], "BOGUS")
    assert info.value.status == "NO"
    assert info.value.response_code() == b"BADCHARSET (US-ASCII UTF-8)"
    assert compile_search(["ALL"], "utf-8").charset == "UTF-8"
    with pytest.raises(SearchError):
        compile_search(["ALL"], "base64")
    assert compile_search(["ALL"], None).charset == "US-ASCII"


def test_nesting_limit() -> None:
    """Deep NOT chains and nested lists are refused with SearchError, not a RecursionError."""
    with pytest.raises(SearchError):
        compile_search(["NOT"] * (MAX_DEPTH + 5) + ["ALL"])
    deep: list[Token] = ["ALL"]
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(SearchError):
        compile_search(deep)
    assert run(" ".join(["NOT"] * 10) + " SEEN") == [1, 2, 6]


def test_return_options_and_esearch() -> None:
    """RETURN () means ALL; ESEARCH items in Dovecot's order, MIN/MAX/ALL left out when empty."""
    assert parse_return_options([]) == ("ALL",)
    assert parse_return_options(["count", "MIN"]) == ("COUNT", "MIN")
    with pytest.raises(SearchError):
        parse_return_options(["SAVE2"])
    assert esearch_items([2, 3, 4, 9], ["ALL", "COUNT", "MAX", "MIN"]) == [
        ("MIN", 2),
        ("MAX", 9),
        ("ALL", b"2:4,9"),
        ("COUNT", 4),
    ]
    assert esearch_items([], ["MIN", "MAX", "COUNT", "ALL"]) == [("COUNT", 0)]
    assert format_esearch(b"A282", [2, 10, 11], ["MIN", "COUNT"], uid=True) == (
        b'ESEARCH (TAG "A282") UID MIN 2 COUNT 3'
    )
    assert format_esearch(b"a", [5], ["ALL"], modseq=9) == b'ESEARCH (TAG "a") ALL 5 MODSEQ 9'
    assert format_search([2, 3]) == b"SEARCH 2 3"
    assert format_search([2, 3], modseq=917162500) == b"SEARCH 2 3 (MODSEQ 917162500)"
    assert format_search([], modseq=5) == b"SEARCH"


# --- properties -----------------------------------------------------------------------------

_flag_names = ["\\Seen", "\\Flagged", "\\Answered", "\\Deleted", "\\Draft", "\\Recent", "work"]


@st.composite
def _mailboxes(draw: st.DrawFn) -> list[View]:
    n = draw(st.integers(0, 8))
    uids = sorted(draw(st.lists(st.integers(1, 40), min_size=n, max_size=n, unique=True)))
    views = []
    for i, uid in enumerate(uids, 1):
        subject = draw(
            st.sampled_from(["alpha", "Beta", "gamma delta", "=?utf-8?q?=C3=A9t=C3=A9?="])
        )
        raw = f"Subject: {subject}\r\nDate: {draw(st.integers(1, 28))} Jan 2022 10:00 +0000\r\n\r\nbody {subject}\r\n"
        views.append(
            View(
                seq=i,
                uid=uid,
                flags=draw(st.lists(st.sampled_from(_flag_names), unique=True)),
                internaldate=draw(st.integers(1640995200, 1643673600)),
                size=draw(st.integers(0, 300)),
                modseq=draw(st.integers(1, 20)),
                message=Message(raw.encode()),
            )
        )
    return views


_leaves = st.one_of(
    st.sampled_from(
        [["SEEN"], ["UNSEEN"], ["FLAGGED"], ["DELETED"], ["NEW"], ["OLD"], ["ALL"], ["DRAFT"]]
    ),
    st.builds(lambda n: ["LARGER", str(n)], st.integers(0, 300)),
    st.builds(lambda n: ["SMALLER", str(n)], st.integers(0, 300)),
    st.builds(lambda n: ["MODSEQ", str(n)], st.integers(1, 20)),
    st.builds(lambda d: ["SINCE", f"{d}-Jan-2022"], st.integers(1, 31)),
    st.builds(lambda d: ["SENTBEFORE", f"{d}-Jan-2022"], st.integers(1, 28)),
    st.builds(lambda s: ["UID", s], st.sampled_from(["1:5", "3,9:*", "*", "20:10"])),
    st.builds(lambda s: [s], st.sampled_from(["1:3", "2,4:*", "*", "6:2"])),
    st.builds(lambda s: ["SUBJECT", s], st.sampled_from([b"alp", b"BETA", b"\xc3\xa9t\xc3\xa9"])),
    st.builds(lambda s: ["BODY", s], st.sampled_from([b"delta", b"body", b"zzz"])),
    st.sampled_from([["KEYWORD", "WORK"], ["UNKEYWORD", "work"]]),
)


def _extend(children: st.SearchStrategy[list[Token]]) -> st.SearchStrategy[list[Token]]:
    return st.one_of(
        st.builds(lambda a: ["NOT", *a], children),
        st.builds(lambda a, b: ["OR", *a, *b], children, children),
        st.builds(lambda a, b: [[*a, *b]], children, children),
    )


_expressions = st.recursive(_leaves, _extend, max_leaves=6)


def _matches(tokens: list[Token], views: list[View]) -> list[int]:
    scope = Scope(len(views), views[-1].uid if views else 0)
    return [v.seq for v in compile_search(tokens, "UTF-8").search(views, scope)]


@given(_mailboxes(), _expressions)
def test_not_not_is_identity(views: list[View], x: list[Token]) -> None:
    """NOT NOT x matches exactly what x matches."""
    assert _matches(["NOT", "NOT", *x], views) == _matches(x, views)


@given(_mailboxes(), _expressions, _expressions)
def test_or_is_not_of_nots(views: list[View], a: list[Token], b: list[Token]) -> None:
    """OR a b matches exactly what NOT (NOT a NOT b) matches (De Morgan)."""
    assert _matches(["OR", *a, *b], views) == _matches(["NOT", ["NOT", *a, "NOT", *b]], views)


@given(_mailboxes(), _expressions, _expressions)
def test_and_is_intersection(views: list[View], a: list[Token], b: list[Token]) -> None:
    """Implicit AND is the intersection of the two keys' matches, in either order."""
    both = set(_matches(a, views)) & set(_matches(b, views))
    assert _matches([*a, *b], views) == sorted(both) == _matches([*b, *a], views)


@given(_mailboxes(), st.sampled_from(["1:5", "3,9:*", "*", "20:10", "40:*", "1:4294967295"]))
def test_uid_search_equals_uid_set_resolution(views: list[View], text: str) -> None:
    """SEARCH UID s finds exactly the messages whose UIDs the set resolves to."""
    found = [views[s - 1].uid for s in _matches(["UID", text], views)]
    assert found == SequenceSet.parse(text).resolve_uids([v.uid for v in views])


PROBE = View(
    seq=1,
    uid=1,
    message=Message(
        b'Cc: "X, Y" <x@y.z>, p@q.r (Pe  Q), =?utf-8?q?J=C3=B6rg?= <j@x>\r\n'
        b"To: g: a@b, c@d;\r\nFrom: Fred\t Foo <f@o>\r\nX-A: one\r\n\ttwo  three\r\n"
        b"Subject: =?utf-8?q?a?=\r\n  =?utf-8?q?b?= c\r\n\r\nbody\r\n"
    ),
)


@pytest.mark.parametrize(
    ("query", "hit"),
    [
        ('CC "X, Y"', True), ('CC "\\"X, Y\\" <x@y.z>"', True), ('CC "X, Y <x@y.z>"', False),
        ('CC "<x@y.z>"', True), ('CC "x@y.z>, p"', False), ('CC "Pe  Q"', True),
        ('CC "Pe Q"', False), ('CC "(Pe"', False), ('CC "Jörg <j@x>"', True),
        ('CC "=?utf-8"', False), ('TO "g:"', True), ('TO "g: a@b"', False),
        ('TO "a@b, c@d"', False), ('TO "c@d;"', False), ('FROM "Fred Foo"', True),
        ('FROM "Fred  Foo"', False), ('HEADER X-A "one two"', True),
        ('HEADER X-A "two  three"', True), ('HEADER X-A "two three"', False),
        ('SUBJECT "ab c"', True), ('SUBJECT "a b"', False), ('TEXT "one two"', True),
        ('TEXT "Fred Foo"', False), ('TEXT "Fred\t Foo"', True),
    ],
)  # fmt: skip
def test_address_and_folding_rules_as_dovecot(query: str, hit: bool) -> None:
    """Address keys match one address at a time; folds read as one space (Dovecot 2.3.19)."""
    assert run(query, views=[PROBE], scope=Scope(1, 1)) == ([1] if hit else [])


@pytest.mark.parametrize(
    ("raw", "needle", "hit"),
    [
        # us-ascii (or no charset) holding UTF-8 octets is read as UTF-8
        (b"Content-Type: text/plain\r\n\r\nh\xc3\xa9llo\r\n", "héllo", True),
        # broken base64 is decoded as far as it goes, never searched raw
        (b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\nhello\r\n",
         "hello", False),
        # a non-MIME entity's encoding is still undone for searching
        (b"Content-Transfer-Encoding: base64\r\n\r\nh\xc3\xa9llo\r\n", "héllo", False),
        (b"Content-Transfer-Encoding: base64\r\n\r\nSGVsbG8=\r\n", "Hello", True),
        (b"Content-Type: text/plain; charset=iso-8859-1\r\n"
         b"Content-Transfer-Encoding: quoted-printable\r\n\r\nh=E9llo\r\n", "HÉLLO", True),
        (b"Content-Type: application/octet-stream\r\n\r\nhello\r\n", "hello", False),
    ],
)  # fmt: skip
def test_body_decoding_as_dovecot(raw: bytes, needle: str, hit: bool) -> None:
    """BODY reads text parts through their encoding and charset as Dovecot does."""
    program = compile_search(["BODY", needle.encode()], "UTF-8")
    assert program.matches(View(1, 1, message=Message(raw)), Scope(1, 1)) is hit


@given(_mailboxes(), _expressions)
def test_need_is_enough(views: list[View], x: list[Token]) -> None:
    """A program gets the same answer from only what its ``need`` says to load."""
    program = compile_search(x, "UTF-8")
    if program.need == Need.FULL:
        return
    scope = Scope(len(views), views[-1].uid if views else 0)
    slim = []
    for v in views:
        head = None
        if program.need == Need.HEADERS and isinstance(v.message, Message):
            head = Message(v.message.root.head)
        slim.append(attrs.evolve(v, message=head))
    assert [v.seq for v in program.search(slim, scope)] == [
        v.seq for v in program.search(views, scope)
    ]


SENT_DATES = [
    "Mon, 7 Feb 1994 21:52:25 -0800", "7 Feb 1994 21:52:25 -0800", "Mon, 07 Feb 94 21:52:25 -0800",
    "Mon, 7 Feb 1994 21:52 -0800", "Mon, 7 Feb 1994 23:52:25 -0300", "Mon, 7 Feb 1994 01:00:00 +1400",
    "Mon, 7 Feb 1994 21:52:25 PST", "Mon, 7 Feb 1994 21:52:25 EST", "Mon, 7 Feb 1994 21:52:25 GMT",
    "Mon, 7 Feb 1994 21:52:25", "Mon, 7 Feb 1994 21:52:25 +0000 (UTC)", "Mon,  7 Feb 1994 21:52:25 -0800",
    "7-Feb-1994", "garbage", "", "Mon, 31 Feb 1994 10:00:00 +0000", "Tue, 8 Feb 1994 00:30:00 +0100",
    "Sun, 6 Feb 1994 23:30:00 -0100", "Mon, 7 Feb 2094 21:52:25 -0800", "Mon, 7 Feb 49 21:52:25 -0800",
    "Mon, 7 Feb 50 21:52:25 -0800", "mon, 7 feb 1994 21:52:25 -0800", "Mon, 7 Feb 1994 21:52:25 z",
    "Mon, 7 Feb 1994 21:52:25 -08",
]  # fmt: skip


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SENTON 7-Feb-1994", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 22, 23, 24]),
        ("SENTON 6-Feb-1994", [18]),
        ("SENTON 8-Feb-1994", [17]),
        ("SENTBEFORE 2-Jan-1970", [13, 14, 15, 16]),
        ("SENTON 7-Feb-2049", [20]),
        ("SENTON 7-Feb-1950", []),
    ],
)
def test_sent_dates_in_many_forms(query: str, expected: list[int]) -> None:
    """Date: forms (2-digit years, zone names, no zone, garbage) read as Dovecot 2.3.19 reads them."""
    views = [
        View(i, i, message=Message(b"Date: " + d.encode() + b"\r\nSubject: x\r\n\r\nbody\r\n"))
        for i, d in enumerate(SENT_DATES, 1)
    ]
    assert run(query, views=views, scope=Scope(len(views), len(views))) == expected


def test_long_or_chain() -> None:
    """A 100-term OR chain compiles and evaluates (flattened, not 100 nested calls)."""
    tokens: list[Token] = []
    for n in range(1, 100):
        tokens += ["OR", "UID", str(n)]
    tokens += ["UID", "100"]
    program = compile_search(tokens)
    assert program.root.op == "or" and len(program.root.parts) == 100
    assert [v.seq for v in program.search(SEARCH_MAILBOX, SCOPE)] == [1, 2, 3, 4, 5, 6, 7]
