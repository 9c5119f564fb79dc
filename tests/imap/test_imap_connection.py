"""The sans-IO IMAP connection: the state table, held commands (IDLE, AUTHENTICATE,
STARTTLS) and the STARTTLS plaintext-injection regression (CVE-2011-0411 class)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from yimaporc.imap import _commands as c
from yimaporc.imap._connection import ImapConnection, Mode
from yimaporc.imap._events import AuthenticateResponse, CommandReceived, IdleDone
from yimaporc.imap._machine import VALID_IN, State, after, allowed

N, A, S = State.NOT_AUTHENTICATED, State.AUTHENTICATED, State.SELECTED

SAMPLES: list[tuple[c.Command, set[State]]] = [
    (c.Capability("t"), {N, A, S}),
    (c.Noop("t"), {N, A, S}),
    (c.Logout("t"), {N, A, S}),
    (c.Id("t"), {N, A, S}),
    (c.StartTls("t"), {N}),
    (c.Login("t", "u", "p"), {N}),
    (c.Authenticate("t", "PLAIN"), {N}),
    (c.Enable("t", ("CONDSTORE",)), {A, S}),
    (c.Select("t", "INBOX"), {A, S}),
    (c.Create("t", "x"), {A, S}),
    (c.Delete("t", "x"), {A, S}),
    (c.Rename("t", "x", "y"), {A, S}),
    (c.Subscribe("t", "x"), {A, S}),
    (c.Unsubscribe("t", "x"), {A, S}),
    (c.List("t", "", ("*",)), {A, S}),
    (c.Lsub("t", "", "*"), {A, S}),
    (c.Status("t", "x", ("MESSAGES",)), {A, S}),
    (c.Append("t", "x", b"m"), {A, S}),
    (c.Namespace("t"), {A, S}),
    (c.Idle("t"), {A, S}),
    (c.Check("t"), {S}),
    (c.Close("t"), {S}),
    (c.Unselect("t"), {S}),
    (c.Expunge("t"), {S}),
    (c.Search("t", False, ("ALL",)), {S}),
    (c.Fetch("t", False, "1", (c.FetchAtt("FLAGS"),)), {S}),
    (c.Store("t", False, "1", "+", ("\\Seen",)), {S}),
    (c.Copy("t", False, "1", "x"), {S}),
    (c.Move("t", True, "1", "x"), {S}),
]


def test_table_covers_every_command() -> None:
    """Every command type has a row in the state table, and the samples cover them all."""
    assert {type(x) for x, _ in SAMPLES} == set(VALID_IN)


@pytest.mark.parametrize(("cmd", "states"), SAMPLES, ids=[type(x).__name__ for x, _ in SAMPLES])
def test_state_table(cmd: c.Command, states: set[State]) -> None:
    """A command is allowed exactly in its RFC 3501 states; elsewhere the answer is tagged BAD."""
    for state in (N, A, S, State.LOGOUT):
        assert allowed(state, cmd) is (state in states)
        conn = ImapConnection()
        conn.state = state
        bad = conn.check(cmd)
        assert (bad is None) is (state in states)
        if bad is not None:
            assert bad.status == "BAD" and bad.tag == "t"


def test_transitions() -> None:
    """Login/Authenticate lead to authenticated, SELECT to selected, a failed SELECT
    deselects, CLOSE/UNSELECT return to authenticated, LOGOUT ends everything."""
    assert after(N, c.Login("t", "u", "p"), "OK") is A
    assert after(N, c.Login("t", "u", "p"), "NO") is N
    assert after(N, c.Authenticate("t", "PLAIN"), "OK") is A
    assert after(A, c.Select("t", "x"), "OK") is S
    assert after(S, c.Select("t", "x"), "NO") is A
    assert after(S, c.Select("t", "x"), "BAD") is S
    assert after(S, c.Close("t"), "OK") is A
    assert after(S, c.Unselect("t"), "OK") is A
    assert after(S, c.Logout("t"), "OK") is State.LOGOUT
    conn = ImapConnection()
    conn.receive_data(b"a LOGOUT\r\n")
    conn.complete(c.Logout("a"))
    assert conn.closed and conn.state is State.LOGOUT


def test_starttls_discards_injected_plaintext() -> None:
    """Commands sent in the same packet after STARTTLS never run: they are discarded
    when TLS starts (CVE-2011-0411 class), and the count is exposed."""
    conn = ImapConnection()
    injected = b"b LOGIN victim secret\r\nc SELECT INBOX\r\n"
    events = conn.receive_data(b"a CAPABILITY\r\na STARTTLS\r\n" + injected)
    assert events == [CommandReceived(c.Capability("a")), CommandReceived(c.StartTls("a"))]
    assert conn.next_events() == []  # held until the STARTTLS answer
    conn.complete(c.StartTls("a"), "OK", "begin TLS")
    assert conn.start_tls() == len(injected)
    assert conn.plaintext_discarded == len(injected)
    assert conn.next_events() == []
    assert conn.receive_data(b"d NOOP\r\n") == [CommandReceived(c.Noop("d"))]


def test_starttls_refused_keeps_later_commands() -> None:
    """When STARTTLS is refused, the commands behind it are parsed normally."""
    conn = ImapConnection()
    conn.receive_data(b"a STARTTLS\r\nb NOOP\r\n")
    conn.complete(c.StartTls("a"), "BAD", "no TLS here")
    assert conn.next_events() == [CommandReceived(c.Noop("b"))]
    assert conn.plaintext_discarded == 0


def test_idle_done() -> None:
    """After IDLE the next line is DONE (only once the server said "+"); then commands again."""
    conn = ImapConnection()
    conn.state = A
    assert conn.receive_data(b"a IDLE\r\nDONE\r\nb NOOP\r\n") == [CommandReceived(c.Idle("a"))]
    assert conn.mode is Mode.HELD
    conn.idle_started()
    assert conn.data_to_send() == b"+ idling\r\n"
    assert conn.next_events() == [IdleDone(True), CommandReceived(c.Noop("b"))]
    conn2 = ImapConnection()
    conn2.receive_data(b"a IDLE\r\n")
    conn2.idle_started()
    assert conn2.receive_data(b"NOPE\r\n") == [IdleDone(False)]


def test_authenticate_lines() -> None:
    """AUTHENTICATE continuation lines are base64 responses, "*" cancels, junk is an error."""
    conn = ImapConnection()
    assert conn.receive_data(b"a AUTHENTICATE PLAIN\r\n") == [
        CommandReceived(c.Authenticate("a", "PLAIN"))
    ]
    conn.sasl_challenge(b"")
    assert conn.data_to_send() == b"+ \r\n"
    assert conn.receive_data(b"AHUAcA==\r\n") == [AuthenticateResponse(b"\x00u\x00p")]
    conn.sasl_challenge(b"")
    assert conn.receive_data(b"*\r\n") == [AuthenticateResponse(None)]
    conn.sasl_challenge(b"")
    (event,) = conn.receive_data(b"!!\r\n")
    assert isinstance(event, AuthenticateResponse) and event.data is None and event.error
    conn.complete(c.Authenticate("a", "PLAIN"), "NO", "failed")
    assert conn.receive_data(b"b NOOP\r\n") == [CommandReceived(c.Noop("b"))]


def test_max_events_leaves_the_rest_buffered() -> None:
    """Parsing stops after max_events (backpressure); the rest comes with next_events."""
    conn = ImapConnection()
    data = b"".join(b"t%d NOOP\r\n" % i for i in range(10))
    assert len(conn.receive_data(data, max_events=3)) == 3
    assert conn.buffered > 0
    assert len(conn.next_events(100)) == 7 and conn.buffered == 0


def test_absent_uids_wide_ranges() -> None:
    """VANISHED sets are computed from the present UIDs, not by enumerating wide ranges."""
    from yimaporc.imap._view import absent_uids

    assert absent_uids("1:*", [5, 7], 4_000_000_000) == "1:4,6,8:3999999999"
    assert absent_uids("3:6,6:9", [4, 8], 9) == "3,5:7"
    assert absent_uids("1:*", [], 1) == ""
    assert absent_uids("10:20", [1, 2], 5) == ""


@pytest.mark.parametrize("chunk", [None, 65536, 7])
def test_literal_after_a_big_literal_is_not_stalled(chunk: int | None) -> None:
    """mbsync pipelining: a 200 KB APPEND literal, then the next APPEND's line whose
    synchronising literal is still to come; after the big one is consumed (and the buffer
    compacted) the rest of the second still completes it (it used to wait forever on a
    stale buffer offset, and mbsync timed out)."""
    conn = ImapConnection()
    conn.state = A
    big, small = b"x" * 200_000, b"y" * 70_000
    first = b"5 APPEND INBOX {%d+}\r\n%s\r\n6 APPEND INBOX {%d}\r\n" % (len(big), big, len(small))
    rest = small + b"\r\n7 NOOP\r\n"
    events = []
    for data in (first, rest):
        pieces = [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]  # fmt: skip
        for piece in pieces:
            events += conn.receive_data(piece)
        if data is first:
            assert conn.data_to_send() == b"+ Ready for literal data\r\n"
    commands = [e.command for e in events if isinstance(e, CommandReceived)]
    assert [x.tag for x in commands] == ["5", "6", "7"]
    assert isinstance(commands[1], c.Append) and commands[1].message == small
    assert conn.buffered == 0


@given(
    st.lists(st.tuples(st.integers(0, 150_000), st.booleans()), min_size=1, max_size=5),
    st.integers(1, 100_000),
)
@settings(max_examples=25)
def test_pipelined_literals_of_any_size_in_any_chunks(
    literals: list[tuple[int, bool]], chunk: int
) -> None:
    """Pipelined APPENDs with literals of any size (synchronising or LITERAL+), fed in
    chunks of any size, each arrive whole and in order; one ``+`` per synchronising one."""
    conn = ImapConnection()
    conn.state = A
    stream = b""
    for i, (size, plus) in enumerate(literals):
        stream += b"t%d APPEND INBOX {%d%s}\r\n" % (i, size, b"+" if plus else b"")
        stream += bytes([65 + i]) * size + b"\r\n"
    events = []
    for at in range(0, len(stream), chunk):
        events += conn.receive_data(stream[at : at + chunk])
    commands = [e.command for e in events if isinstance(e, CommandReceived)]
    assert [x.tag for x in commands] == [f"t{i}" for i in range(len(literals))]
    for i, (cmd, (size, _)) in enumerate(zip(commands, literals, strict=True)):
        assert isinstance(cmd, c.Append) and cmd.message == bytes([65 + i]) * size
    continuations = conn.data_to_send().count(b"+ Ready")
    assert continuations <= sum(1 for size, plus in literals if not plus)
    assert conn.buffered == 0
