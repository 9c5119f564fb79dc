"""The IMAP command grammar: every command parsed whole, byte by byte and pipelined,
literals, hostile input, and hypothesis round trips (value -> wire -> value)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from yimaporc.imap import _commands as c
from yimaporc.imap._connection import ImapConnection
from yimaporc.imap._events import CommandReceived, CommandRejected, ProtocolFailure
from yimaporc.imap._format import format_command
from yimaporc.imap._lexer import Limits, ParseError
from yimaporc.imap._wire import parse_command

H = c.BodySection

# (wire line without CRLF, expected value): one or more per command and extension.
CASES: list[tuple[bytes, c.Command]] = [
    (b"a CAPABILITY", c.Capability("a")),
    (b"a noop", c.Noop("a")),
    (b"a LOGOUT", c.Logout("a")),
    (b"a STARTTLS", c.StartTls("a")),
    (b"a NAMESPACE", c.Namespace("a")),
    (b"a IDLE", c.Idle("a")),
    (b"a CHECK", c.Check("a")),
    (b"a CLOSE", c.Close("a")),
    (b"a UNSELECT", c.Unselect("a")),
    (b"a AUTHENTICATE PLAIN", c.Authenticate("a", "PLAIN")),
    (b"a AUTHENTICATE PLAIN AHUAcA==", c.Authenticate("a", "PLAIN", b"\x00u\x00p")),
    (b"a AUTHENTICATE PLAIN =", c.Authenticate("a", "PLAIN", b"")),
    (b"a LOGIN alice secret", c.Login("a", "alice", "secret")),
    (b'a LOGIN "al ice" "p\\"w\\\\d"', c.Login("a", "al ice", 'p"w\\d')),
    (b"a LOGIN {5}\r\nalice {3+}\r\np w", c.Login("a", "alice", "p w")),
    (b"a ENABLE QRESYNC condstore", c.Enable("a", ("QRESYNC", "CONDSTORE"))),
    (b"a ID NIL", c.Id("a", None)),
    (b'a ID ("name" "mbsync" "version" NIL)', c.Id("a", (("name", "mbsync"), ("version", None)))),
    (b"a SELECT inbox", c.Select("a", "INBOX")),
    (b'a EXAMINE "Sent Items"', c.Select("a", "Sent Items", readonly=True)),
    (b"a SELECT INBOX (CONDSTORE)", c.Select("a", "INBOX", condstore=True)),
    (
        b"a SELECT INBOX (QRESYNC (67890007 20050715194045000 41,43:211,214:541))",
        c.Select("a", "INBOX", qresync=c.Qresync(67890007, 20050715194045000, "41,43:211,214:541")),
    ),
    (
        b"a SELECT INBOX (QRESYNC (67890007 90060115194045000 1:29997 (5000,7500,9000 15000,22500,27000)))",
        c.Select(
            "a",
            "INBOX",
            qresync=c.Qresync(
                67890007, 90060115194045000, "1:29997", ("5000,7500,9000", "15000,22500,27000")
            ),
        ),
    ),
    (b"a CREATE Archive/2024", c.Create("a", "Archive/2024")),
    (b"a CREATE MySent (USE (\\Sent))", c.Create("a", "MySent", ("\\Sent",))),
    (b"a DELETE foo", c.Delete("a", "foo")),
    (b'a RENAME foo "b r"', c.Rename("a", "foo", "b r")),
    (b"a SUBSCRIBE foo", c.Subscribe("a", "foo")),
    (b"a UNSUBSCRIBE foo", c.Unsubscribe("a", "foo")),
    (b'a LIST "" %', c.List("a", "", ("%",))),
    (b'a LIST "" ""', c.List("a", "", ("",))),
    (b"a LIST ~/Mail/ *", c.List("a", "~/Mail/", ("*",))),
    (
        b'a LIST (SUBSCRIBED RECURSIVEMATCH) "" ("INBOX" "Sent/%") RETURN (CHILDREN)',
        c.List("a", "", ("INBOX", "Sent/%"), ("SUBSCRIBED", "RECURSIVEMATCH"), ("CHILDREN",)),
    ),
    (
        b'a LIST "" * RETURN (SPECIAL-USE STATUS (MESSAGES UNSEEN))',
        c.List("a", "", ("*",), (), ("SPECIAL-USE", "STATUS"), ("MESSAGES", "UNSEEN")),
    ),
    (b'a LIST (SPECIAL-USE) "" *', c.List("a", "", ("*",), ("SPECIAL-USE",))),
    (b'a LSUB "" *', c.Lsub("a", "", "*")),
    (
        b"a STATUS INBOX (MESSAGES UIDNEXT UIDVALIDITY UNSEEN HIGHESTMODSEQ)",
        c.Status("a", "INBOX", ("MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ")),
    ),
    (b"a APPEND INBOX {5}\r\nhello", c.Append("a", "INBOX", b"hello")),
    (
        b'a APPEND Sent (\\Seen $Label) " 7-Feb-1994 21:52:25 -0800" {5+}\r\nhel\r\n',
        c.Append("a", "Sent", b"hel\r\n", ("\\Seen", "$Label"), " 7-Feb-1994 21:52:25 -0800"),
    ),
    (
        b'a APPEND Sent (\\Seen) {2+}\r\nm1 " 7-Feb-1994 21:52:25 -0800" {2}\r\nm2 {0+}\r\n',
        c.Append(
            "a",
            "Sent",
            b"m1",
            ("\\Seen",),
            None,
            (c.AppendMessage(b"m2", (), " 7-Feb-1994 21:52:25 -0800"), c.AppendMessage(b"")),
        ),
    ),
    (b"a APPEND INBOX ~{3}\r\na\x00b", c.Append("a", "INBOX", b"a\x00b", binary=True)),
    (
        b"a FETCH 1 (BINARY[1.2]<0.10> BINARY.PEEK[] BINARY.SIZE[3])",
        c.Fetch(
            "a",
            False,
            "1",
            (
                c.BinarySection(False, (1, 2), (0, 10)),
                c.BinarySection(True),
                c.BinarySection(False, (3,), None, True),
            ),
        ),
    ),
    (b"a APPEND INBOX UTF8 (~{2}\r\n\xc3\xa4)", c.Append("a", "INBOX", b"\xc3\xa4", utf8=True)),
    (b"a EXPUNGE", c.Expunge("a")),
    (b"a UID EXPUNGE 3:5,9", c.Expunge("a", "3:5,9")),
    (b"a SEARCH ALL", c.Search("a", False, ("ALL",))),
    (
        b"a UID SEARCH OR (SEEN FLAGGED) NOT UID 1:* SUBJECT {4}\r\ntest",
        c.Search("a", True, ("OR", ["SEEN", "FLAGGED"], "NOT", "UID", "1:*", "SUBJECT", b"test")),
    ),
    (
        b'a SEARCH CHARSET UTF-8 TEXT "caf\xc3\xa9" KEYWORD $Junk',
        c.Search("a", False, ("TEXT", "café".encode(), "KEYWORD", "$Junk"), "UTF-8"),
    ),
    (
        b"a SEARCH RETURN (MIN MAX COUNT ALL) 1:5 UNDELETED",
        c.Search("a", False, ("1:5", "UNDELETED"), None, ("MIN", "MAX", "COUNT", "ALL")),
    ),
    (b"a SEARCH RETURN () ALL", c.Search("a", False, ("ALL",), None, ())),
    (b"a SEARCH MODSEQ 620162338", c.Search("a", False, ("MODSEQ", "620162338"))),
    (
        b"a FETCH 1 ALL",
        c.Fetch("a", False, "1", tuple(c.FetchAtt(n) for n in c.FETCH_MACROS["ALL"])),
    ),
    (
        b"a FETCH 1 fast",
        c.Fetch("a", False, "1", tuple(c.FetchAtt(n) for n in c.FETCH_MACROS["FAST"])),
    ),
    (
        b"a FETCH 1 FULL",
        c.Fetch("a", False, "1", tuple(c.FetchAtt(n) for n in c.FETCH_MACROS["FULL"])),
    ),
    (b"a FETCH 1:* flags", c.Fetch("a", False, "1:*", (c.FetchAtt("FLAGS"),))),
    (b"a FETCH 2 BODY[]", c.Fetch("a", False, "2", (H(),))),
    (
        b"a UID FETCH 1:*,7 (UID RFC822.SIZE INTERNALDATE BODY.PEEK[]<0.2048>)",
        c.Fetch(
            "a",
            True,
            "1:*,7",
            (
                c.FetchAtt("UID"),
                c.FetchAtt("RFC822.SIZE"),
                c.FetchAtt("INTERNALDATE"),
                H(True, partial=(0, 2048)),
            ),
        ),
    ),
    (
        b"a FETCH 1 (BODY.PEEK[HEADER.FIELDS (X-TUID Message-Id)] BODY[1.2.MIME] BODY[2.TEXT] BODY[3])",
        c.Fetch(
            "a",
            False,
            "1",
            (
                H(True, (), "HEADER.FIELDS", ("X-TUID", "Message-Id")),
                H(False, (1, 2), "MIME"),
                H(False, (2,), "TEXT"),
                H(False, (3,)),
            ),
        ),
    ),
    (
        b"a FETCH 1 (BODY[HEADER.FIELDS.NOT (Received)] RFC822.HEADER RFC822.TEXT RFC822 ENVELOPE BODYSTRUCTURE BODY)",
        c.Fetch(
            "a",
            False,
            "1",
            (
                H(False, (), "HEADER.FIELDS.NOT", ("Received",)),
                *(
                    c.FetchAtt(n)
                    for n in (
                        "RFC822.HEADER",
                        "RFC822.TEXT",
                        "RFC822",
                        "ENVELOPE",
                        "BODYSTRUCTURE",
                        "BODY",
                    )
                ),
            ),
        ),
    ),
    (
        b"a UID FETCH 300:500 (FLAGS) (CHANGEDSINCE 12345 VANISHED)",
        c.Fetch("a", True, "300:500", (c.FetchAtt("FLAGS"),), 12345, True),
    ),
    (
        b"a FETCH 1 (FLAGS MODSEQ)",
        c.Fetch("a", False, "1", (c.FetchAtt("FLAGS"), c.FetchAtt("MODSEQ"))),
    ),
    (b"a STORE 1 FLAGS (\\Seen)", c.Store("a", False, "1", "", ("\\Seen",))),
    (
        b"a STORE 1:3 +FLAGS.SILENT \\Deleted \\Seen",
        c.Store("a", False, "1:3", "+", ("\\Deleted", "\\Seen"), True),
    ),
    (
        b"a UID STORE 5 (UNCHANGEDSINCE 320162338) -FLAGS ($Forwarded)",
        c.Store("a", True, "5", "-", ("$Forwarded",), False, 320162338),
    ),
    (b"a COPY 1:2 Trash", c.Copy("a", False, "1:2", "Trash")),
    (b'a UID COPY 4 "Old Mail"', c.Copy("a", True, "4", "Old Mail")),
    (b"a MOVE 1 Archive", c.Move("a", False, "1", "Archive")),
    (b"a UID MOVE 7:9 Junk", c.Move("a", True, "7:9", "Junk")),
]


@pytest.mark.parametrize(
    ("line", "expected"), CASES, ids=[x[0][:40].decode("latin-1") for x in CASES]
)
def test_parse_command(line: bytes, expected: c.Command) -> None:
    """Each command of the grammar parses to its typed value."""
    assert parse_command(line) == expected


def _feed(chunks: list[bytes]) -> tuple[list[object], bytes]:
    conn = ImapConnection()
    events: list[object] = []
    for chunk in chunks:
        events += conn.receive_data(chunk)
    return events, conn.data_to_send()


@pytest.mark.parametrize(
    ("line", "expected"), CASES, ids=[x[0][:40].decode("latin-1") for x in CASES]
)
def test_connection_whole_and_bytewise(line: bytes, expected: c.Command) -> None:
    """Fed whole or one byte at a time, a command gives the same single event."""
    data = line + b"\r\n"
    whole, _ = _feed([data])
    bytewise, out = _feed([data[i : i + 1] for i in range(len(data))])
    assert whole == bytewise == [CommandReceived(expected)]
    # A synchronising literal was asked for with one "+" per literal, never for LITERAL+.
    assert out.count(b"+ ") == line.count(b"}\r\n") - line.count(b"+}\r\n")


def test_pipelined_commands_in_order() -> None:
    """Every command of the table sent in one packet comes out in order."""
    data = b"".join(line + b"\r\n" for line, cmd in CASES if not isinstance(cmd, _HOLDING))
    events, _ = _feed([data])
    assert events == [CommandReceived(cmd) for _, cmd in CASES if not isinstance(cmd, _HOLDING)]


_HOLDING = (c.Idle, c.Authenticate, c.StartTls, c.Logout)


def test_synchronising_literal_continuation_once() -> None:
    """A synchronising literal gets one "+ " continuation, sent before its data arrives."""
    conn = ImapConnection()
    assert conn.receive_data(b"a1 LOGIN {5}\r\n") == []
    assert conn.data_to_send().startswith(b"+ ")
    assert conn.receive_data(b"al") == []
    assert conn.data_to_send() == b""
    assert conn.receive_data(b"ice {2}\r\n") == []
    assert conn.data_to_send().startswith(b"+ ")
    assert conn.receive_data(b"pw\r\n") == [CommandReceived(c.Login("a1", "alice", "pw"))]


def test_search_literal_is_continued() -> None:
    """A SEARCH term sent as a literal (issue 15) is continued and parsed, the session in step."""
    conn = ImapConnection()
    assert conn.receive_data(b"a SEARCH CHARSET UTF-8 SUBJECT {4}\r\n") == []
    assert conn.data_to_send().startswith(b"+ ")
    events = conn.receive_data(b"test\r\nb NOOP\r\n")
    assert events == [
        CommandReceived(c.Search("a", False, ("SUBJECT", b"test"), "UTF-8")),
        CommandReceived(c.Noop("b")),
    ]


HOSTILE = [
    b"\r\n",
    b"   \r\n",
    b"a\r\n",
    b"a FOO\r\n",
    b"a+b NOOP\r\n",
    b"* NOOP\r\n",
    b"a UID NOOP\r\n",
    b"a NOOP extra\r\n",
    b'a LOGIN "unterminated\r\n',
    b'a LOGIN "bad\\escape" x\r\n',
    b"a LOGIN \xff\xfe\x00 x\r\n",
    b"\xff\xfe\xfd\r\n",
    b"a SELECT\r\n",
    b"a FETCH 0 FLAGS\r\n",
    b"a FETCH 1:x FLAGS\r\n",
    b"a FETCH 1 (FLAGS\r\n",
    b"a FETCH 1 BODY[4.]\r\n",
    b"a FETCH 1 BODY[MIME]\r\n",
    b"a FETCH 1 BODY[HEADER.FIELDS ()]\r\n",
    b"a FETCH 1 NOPE\r\n",
    b"a FETCH 99999999999 FLAGS\r\n",
    b"a SEARCH\r\n",
    b"a SEARCH ((((((((((((((((((((((((((((((((ALL))))))))))))))))))))))))))))))))\r\n",
    b"a SEARCH (ALL\r\n",
    b"a SEARCH ALL)\r\n",
    b"a SEARCH ()\r\n",
    b"a STORE 1 FLAGS.LOUD (\\Seen)\r\n",
    b"a STATUS INBOX (BOGUS)\r\n",
    b'a APPEND INBOX (\\Seen) "yesterday" {1+}\r\nx\r\n',
    b"a APPEND INBOX\r\n",
    b"a AUTHENTICATE PLAIN !!!!\r\n",
    b'a ID ("a")\r\n',
    b"a ENABLE\r\n",
    b"a SELECT INBOX (BOGUS)\r\n",
    b'a LIST (NOPE) "" *\r\n',
    b'a LIST "" * RETURN (NOPE)\r\n',
    b"a LOGIN {3+}\r\n\xff\xff\xff x\r\n",
]


@pytest.mark.parametrize("data", HOSTILE, ids=[repr(x[:30]) for x in HOSTILE])
def test_hostile_input_is_bad_not_traceback(data: bytes) -> None:
    """Broken commands become one BAD-able rejection, and the next command still parses."""
    events, _ = _feed([data + b"z NOOP\r\n"])
    assert len(events) == 2, events
    assert isinstance(events[0], CommandRejected) and events[0].status == "BAD"
    assert events[1] == CommandReceived(c.Noop("z"))


def test_rejection_carries_the_tag() -> None:
    """A parse error answers with the client's tag when it was readable."""
    (event,), _ = _feed([b"t42 FETCH 1 NOPE\r\n"])
    assert isinstance(event, CommandRejected) and event.tag == "t42"
    (event,), _ = _feed([b"\xff NOOP\r\n"])
    assert isinstance(event, CommandRejected) and event.tag is None
    (event,), _ = _feed([b'a"b NOOP\r\n'])
    assert isinstance(event, CommandRejected) and event.tag is None


def test_huge_synchronising_literal_refused_without_waiting() -> None:
    """A synchronising literal above the limit is refused at once (no "+"), TOOBIG."""
    conn = ImapConnection(Limits(max_literal=100))
    events = conn.receive_data(b"a LOGIN {999999999}\r\nb NOOP\r\n")
    assert events[0] == CommandRejected("a", "literal too big", "TOOBIG")
    assert events[1] == CommandReceived(c.Noop("b"))
    assert b"+ " not in conn.data_to_send()


def test_append_over_limit_is_no_toobig() -> None:
    """An APPEND announcing more than the message limit gets NO [TOOBIG] (RFC 7889 style)."""
    conn = ImapConnection(Limits(max_append=1000))
    (event,) = conn.receive_data(b"a APPEND INBOX {1001}\r\n")
    assert event == CommandRejected("a", "message too big", "TOOBIG", "NO")
    assert conn.receive_data(b"a APPEND INBOX {10}\r\n") == []  # within the limit: continued
    assert conn.data_to_send().startswith(b"+ ")


def test_huge_nonsynchronising_literal_is_fatal() -> None:
    """An oversized LITERAL+ cannot be skipped safely: a protocol failure (BYE and close)."""
    conn = ImapConnection(Limits(max_literal=100))
    (event,) = conn.receive_data(b"a LOGIN {5000+}\r\n" + b"x" * 200)
    assert isinstance(event, ProtocolFailure) and event.tag == "a" and event.code == "TOOBIG"
    assert conn.closed and conn.receive_data(b"b NOOP\r\n") == []


def test_line_without_end_is_fatal() -> None:
    """A line longer than the limit without CRLF ends the connection, memory bounded."""
    conn = ImapConnection(Limits(max_line=1000))
    (event,) = conn.receive_data(b"a LOGIN " + b"x" * 2000)
    assert isinstance(event, ProtocolFailure)


def test_unterminated_literal_waits_and_holds_memory_bound() -> None:
    """A literal whose data never comes only waits (bounded by the limits), no event."""
    conn = ImapConnection(Limits(max_literal=1000))
    assert conn.receive_data(b"a LOGIN {1000}\r\n" + b"x" * 999) == []
    assert conn.buffered == len(b"a LOGIN {1000}\r\n") + 999


def test_deep_nesting_rejected() -> None:
    """Parentheses nested beyond max_depth are BAD, without recursion trouble."""
    line = b"a SEARCH " + b"(" * 5000 + b"ALL" + b")" * 5000
    with pytest.raises(ParseError, match="nested"):
        parse_command(line, Limits(max_line=20000))


def test_argument_count_limited() -> None:
    """More tokens than max_args is BAD."""
    line = b"a SEARCH " + b" ".join([b"ALL"] * 50)
    with pytest.raises(ParseError, match="too many"):
        parse_command(line, Limits(max_args=20))


def test_header_field_names_keep_spelling() -> None:
    """BODY[HEADER.FIELDS (X-TUID)] echoes the client's field names exactly."""
    cmd = parse_command(b"a FETCH 1 (BODY.PEEK[header.fields (x-TUID From)]<5.10>)")
    assert isinstance(cmd, c.Fetch)
    (item,) = cmd.items
    assert isinstance(item, H)
    assert item.echo == "BODY[HEADER.FIELDS (x-TUID From)]<5>"


# -- hypothesis: value -> wire -> value -------------------------------------------------

_atom = st.text(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.$", min_size=1, max_size=12
)
_tag = _atom
_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00\r\n"), max_size=30)
_any_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30)
_mailbox = _any_text.filter(lambda s: s.upper() != "INBOX" and "\r" not in s and "\n" not in s)
_num = st.integers(1, 2**32 - 1)
_seq_item = st.one_of(
    _num.map(str),
    st.just("*"),
    st.tuples(st.one_of(_num.map(str), st.just("*")), st.one_of(_num.map(str), st.just("*"))).map(
        ":".join
    ),
)
_seq = st.lists(_seq_item, min_size=1, max_size=4).map(",".join)
_flag = st.one_of(
    st.sampled_from(["\\Seen", "\\Deleted", "\\Answered", "\\Flagged", "\\Draft"]), _atom
)
_section = st.builds(
    H,
    peek=st.booleans(),
    part=st.lists(st.integers(1, 50), max_size=3).map(tuple),
    text=st.sampled_from([None, "HEADER", "TEXT", "HEADER.FIELDS", "HEADER.FIELDS.NOT"]),
    partial=st.one_of(st.none(), st.tuples(st.integers(0, 10**6), st.integers(1, 10**6))),
).flatmap(
    lambda s: (
        st.lists(_atom, min_size=1, max_size=3).map(
            lambda f: H(s.peek, s.part, s.text, tuple(f), s.partial)
        )
        if s.text and s.text.startswith("HEADER.FIELDS")
        else st.just(s)
    )
)
_binary = st.one_of(
    st.builds(c.BinarySection, st.booleans(), st.lists(st.integers(1, 30), max_size=3).map(tuple),
              st.one_of(st.none(), st.tuples(st.integers(0, 1000), st.integers(1, 1000)))),
    st.builds(c.BinarySection, st.just(False), st.lists(st.integers(1, 30), max_size=3).map(tuple),
              st.none(), st.just(True)),
)  # fmt: skip
_fetch_item = st.one_of(st.sampled_from(sorted(c.FETCH_ATTS)).map(c.FetchAtt), _section, _binary)
_search_token: st.SearchStrategy[object] = st.recursive(
    st.one_of(_atom, st.binary(max_size=20).filter(lambda b: b"\r" not in b or True)),
    lambda inner: st.lists(inner, min_size=1, max_size=3),
    max_leaves=8,
)

COMMANDS = st.one_of(
    st.builds(c.Login, _tag, _any_text, _any_text),
    st.builds(c.Select, _tag, _mailbox, st.booleans(), st.booleans()),
    st.builds(c.Create, _tag, _mailbox),
    st.builds(c.Rename, _tag, _mailbox, _mailbox),
    st.builds(c.Status, _tag, _mailbox, st.lists(st.sampled_from(["MESSAGES", "UNSEEN", "UIDNEXT"]), min_size=1).map(tuple)),
    st.builds(c.Append, _tag, _mailbox, st.binary(max_size=200), st.lists(_flag, max_size=3).map(tuple),
              st.none(), st.lists(st.builds(c.AppendMessage, st.binary(max_size=50),
                                            st.lists(_flag, max_size=2).map(tuple), st.none(),
                                            st.booleans(), st.booleans())
                                  .filter(lambda m: not (m.binary and m.utf8)), max_size=3).map(tuple),
              st.booleans(), st.booleans()).filter(lambda a: not (a.binary and a.utf8)),
    st.builds(c.Fetch, _tag, st.booleans(), _seq, st.lists(_fetch_item, min_size=1, max_size=4).map(tuple),
              st.one_of(st.none(), st.integers(0, 2**63 - 1))),
    st.builds(c.Store, _tag, st.booleans(), _seq, st.sampled_from(["", "+", "-"]),
              st.lists(_flag, min_size=1, max_size=3).map(tuple), st.booleans()),
    st.builds(c.Search, _tag, st.booleans(), st.lists(_search_token, min_size=1, max_size=5).map(tuple),
              st.one_of(st.none(), st.just("UTF-8"))),
    st.builds(c.Copy, _tag, st.booleans(), _seq, _mailbox),
    st.builds(c.Move, _tag, st.booleans(), _seq, _mailbox),
    st.builds(c.Id, _tag, st.lists(st.tuples(_text, st.one_of(st.none(), _text)), max_size=3).map(tuple)),
    st.builds(c.Authenticate, _tag, st.just("PLAIN"), st.one_of(st.none(), st.binary(max_size=30))),
)  # fmt: skip


@given(COMMANDS)
def test_roundtrip_command(cmd: c.Command) -> None:
    """Any command value written by the formatter parses back to itself."""
    assert parse_command(format_command(cmd)[:-2]) == cmd


@given(st.lists(COMMANDS, min_size=1, max_size=4), st.integers(1, 7))
def test_roundtrip_pipelined_chunked(cmds: list[c.Command], step: int) -> None:
    """Pipelined commands fed in arbitrary chunks come out in order, equal."""
    data = b"".join(format_command(x) for x in cmds if not isinstance(x, c.Authenticate))
    expected = [CommandReceived(x) for x in cmds if not isinstance(x, c.Authenticate)]
    events, _ = _feed([data[i : i + step] for i in range(0, len(data), step)])
    assert events == expected


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    """Arbitrary bytes give events (commands, rejections, failures), never an exception."""
    conn = ImapConnection(Limits(max_line=200, max_literal=50))
    conn.receive_data(data)
    conn.receive_data(b"\r\n")
