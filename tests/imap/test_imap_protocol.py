"""The Twisted IMAP shell over the in-memory backend: commands in order behind late
Deferreds (pipelining), backpressure, IDLE, idle timeout, release on logout and loss,
STARTTLS injection, and the client-visible fixes of issue 15."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_imap_wire import COMMANDS
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from yimaporc.imap._format import format_command
from yimaporc.imap._protocol import ImapServerFactory, ImapServerProtocol
from yimaporc.imap._view import valid_mailbox_name
from yimaporc.testing.imap_memory import MemoryBackend, MemoryStore, SimpleRenderer

MSG1 = b"From: Bob <bob@example.org>\r\nSubject: one\r\nX-TUID: abc123\r\n\r\nhello world\r\n"
MSG2 = b"Subject: two\r\n\r\nsecond body\r\n"


class TlsTransport(StringTransport):
    """A StringTransport that records startTLS."""

    tls_started = 0

    def startTLS(self, ctx: Any) -> None:
        self.tls_started += 1


class Client:
    def __init__(self, factory: ImapServerFactory) -> None:
        self.factory = factory
        self.proto: ImapServerProtocol = factory.buildProtocol(None)
        self.t = TlsTransport()
        self.proto.makeConnection(self.t)
        self.greeting = self.take()

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def take(self) -> bytes:
        out = self.t.value()
        self.t.clear()
        return out

    def run(self, data: bytes) -> bytes:
        self.send(data)
        return self.take()


def setup(delay: Any = None, **kw: Any) -> tuple[MemoryStore, ImapServerFactory, Clock]:
    clock = Clock()
    store = MemoryStore({"alice": "pw", "bob": "pw2"})
    store.deliver("alice", MSG1)
    store.deliver("alice", MSG2, flags=("\\Seen",))
    factory = ImapServerFactory(MemoryBackend(store, delay), SimpleRenderer(), clock, **kw)
    return store, factory, clock


def tagged(out: bytes) -> list[tuple[str, str]]:
    """(tag, status) of the tagged responses, in order."""
    return re.findall(rb"^([A-Za-z0-9]+) (OK|NO|BAD)", out, re.M)  # type: ignore[return-value]


def later(clock: Clock) -> Any:
    def delay(value: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        clock.callLater(1.0, d.callback, value)
        return d

    return delay


def test_pipelined_select_fetch_noop_in_order_with_late_backend() -> None:
    """SELECT + FETCH + NOOP in one packet run in that order while the backend answers
    seconds later (issue 15: FETCH was answered BAD before SELECT finished)."""
    _, factory, clock = setup()
    factory.backend.delay = later(clock)  # type: ignore[attr-defined]
    cl = Client(factory)
    cl.send(b"a LOGIN alice pw\r\nb SELECT INBOX\r\nc FETCH 1:2 (FLAGS UID)\r\nd NOOP\r\n")
    out = cl.take()
    for _ in range(20):
        clock.advance(1.0)
        out += cl.take()
    assert [t for t, _ in tagged(out)] == [b"a", b"b", b"c", b"d"]
    assert all(s == b"OK" for _, s in tagged(out))
    assert out.index(b"* 1 FETCH") < out.index(b"c OK") < out.index(b"d OK")


def test_mbsync_style_uid_fetch_pipeline() -> None:
    """Twenty pipelined UID FETCHes with a late backend all answer OK, in order."""
    _, factory, clock = setup()
    factory.backend.delay = later(clock)  # type: ignore[attr-defined]
    cl = Client(factory)
    cmds = b"a LOGIN alice pw\r\nb SELECT INBOX\r\n" + b"".join(
        b"f%d UID FETCH %d (UID FLAGS BODY.PEEK[HEADER.FIELDS (X-TUID)])\r\n" % (i, 1 + i % 2)
        for i in range(20)
    )
    cl.send(cmds)
    out = b""
    for _ in range(200):
        clock.advance(1.0)
        out += cl.take()
    assert tagged(out) == [(b"a", b"OK"), (b"b", b"OK")] + [(b"f%d" % i, b"OK") for i in range(20)]
    assert b"BODY[HEADER.FIELDS (X-TUID)] {18}\r\nX-TUID: abc123\r\n\r\n" in out


def test_backpressure_pauses_reading() -> None:
    """Beyond max_queued waiting commands the transport stops reading, and resumes when
    the queue drains; every command is still answered in order."""
    _, factory, clock = setup(max_queued=2)
    factory.backend.delay = later(clock)  # type: ignore[attr-defined]
    cl = Client(factory)
    cl.send(
        b"a LOGIN alice pw\r\n"
        + b"".join(b"s%d STATUS INBOX (MESSAGES)\r\n" % i for i in range(10))
    )
    assert cl.t.producerState == "paused"
    assert len(cl.proto.queue) <= 2
    out = b""
    for _ in range(40):
        clock.advance(1.0)
        out += cl.take()
    assert cl.t.producerState == "producing"
    assert [t for t, _ in tagged(out)] == [b"a"] + [b"s%d" % i for i in range(10)]


def test_full_write_buffer_holds_commands() -> None:
    """While the transport's write buffer is full no new command starts; when it drains
    the waiting commands run, in order."""
    _, factory, clock = setup()
    cl = Client(factory)
    cl.t.producer.pauseProducing()  # what a full write buffer does
    assert cl.run(b"a NOOP\r\nb NOOP\r\nc NOOP\r\n") == b""
    cl.t.producer.resumeProducing()
    clock.advance(0)
    assert [t for t, _ in tagged(cl.take())] == [b"a", b"b", b"c"]
    cl.run(b"d LOGOUT\r\n")
    assert cl.t.producer is None and cl.t.disconnecting


def test_many_commands_answered_at_once_do_not_recurse() -> None:
    """Thousands of pipelined commands answered synchronously run in a loop (no deep stack)."""
    _, factory, _ = setup(max_queued=10000)
    cl = Client(factory)
    out = cl.run(b"".join(b"n%d NOOP\r\n" % i for i in range(3000)))
    assert out.count(b" OK NOOP completed") == 3000


def test_idle_timeout_says_bye() -> None:
    """A silent connection gets BYE and is closed after idle_timeout on the injected clock."""
    _, factory, clock = setup(idle_timeout=60.0)
    cl = Client(factory)
    clock.advance(30)
    cl.send(b"a NOOP\r\n")
    clock.advance(45)
    assert not cl.t.disconnecting
    clock.advance(30)
    assert b"* BYE" in cl.take() and cl.t.disconnecting
    assert factory.timed_out == 1


def test_silent_authenticate_or_idle_times_out() -> None:
    """A client that goes silent in the middle of AUTHENTICATE or IDLE is timed out too,
    while a command waiting on a slow backend is not."""
    _, factory, clock = setup(idle_timeout=60.0)
    sasl = Client(factory)
    sasl.run(b"a AUTHENTICATE PLAIN\r\n")
    idle = Client(factory)
    idle.run(b"a LOGIN alice pw\r\nb IDLE\r\n")
    slow = Client(factory)
    factory.backend.delay = lambda v: Deferred()  # type: ignore[attr-defined]
    slow.run(b"a LOGIN alice pw\r\n")
    clock.advance(61)
    clock.advance(61)
    assert sasl.t.disconnecting and idle.t.disconnecting
    assert not slow.t.disconnecting


def test_logout_releases_session_and_mailbox() -> None:
    """LOGOUT answers BYE then OK, closes, and releases the session and its mailbox."""
    _, factory, _ = setup()
    cl = Client(factory)
    out = cl.run(b"a LOGIN alice pw\r\nb SELECT INBOX\r\nc LOGOUT\r\nd NOOP\r\n")
    assert out.index(b"* BYE") < out.index(b"c OK")
    assert [t for t, _ in tagged(out)] == [b"a", b"b", b"c"]
    session = factory.backend.sessions[0]  # type: ignore[attr-defined]
    assert session.logged_out and session.open[0].closed
    assert cl.t.disconnecting


def test_closed_only_when_a_select_replaces_the_mailbox() -> None:
    """Under QRESYNC, [CLOSED] answers a SELECT over a selected mailbox (RFC 7162
    3.2.11), not LOGOUT (it followed the BYE)."""
    _, factory, _ = setup()
    cl = Client(factory)
    out = cl.run(b"a LOGIN alice pw\r\nb ENABLE QRESYNC\r\nc SELECT INBOX\r\n")
    assert b"[CLOSED]" not in out
    out = cl.run(b"d EXAMINE INBOX\r\n")
    assert out.count(b"[CLOSED]") == 1 and out.index(b"[CLOSED]") < out.index(b"d OK")
    out = cl.run(b"e LOGOUT\r\n")
    assert b"* BYE" in out and b"[CLOSED]" not in out


def test_connection_lost_mid_command_releases() -> None:
    """A connection lost while a command waits on the backend releases everything, and the
    late answer is dropped without error."""
    store, factory, clock = setup()
    cl = Client(factory)
    cl.run(b"a LOGIN alice pw\r\nb SELECT INBOX\r\n")
    factory.backend.delay = later(clock)  # type: ignore[attr-defined]
    cl.send(b"c FETCH 1 (BODY[])\r\n")
    cl.proto.connectionLost()
    clock.advance(5)
    session = factory.backend.sessions[0]  # type: ignore[attr-defined]
    assert session.logged_out and session.open[0].closed
    assert store.boxes["alice"]["INBOX"].watchers == []


def test_connection_lost_in_idle_or_authenticate_is_quiet() -> None:
    """A client that disappears during IDLE or AUTHENTICATE counts no server error and
    leaves no watcher behind."""
    store, factory, _ = setup()
    idle, sasl = Client(factory), Client(factory)
    idle.run(b"a LOGIN alice pw\r\nb SELECT INBOX\r\nc IDLE\r\n")
    sasl.run(b"a AUTHENTICATE PLAIN\r\n")
    idle.proto.connectionLost()
    sasl.proto.connectionLost()
    assert idle.proto.runner.server_errors == sasl.proto.runner.server_errors == 0
    assert store.boxes["alice"]["INBOX"].watchers == []
    assert factory.connections == set()


def test_starttls_injection_through_the_shell() -> None:
    """The shell starts TLS after the OK and never runs plaintext pipelined behind STARTTLS."""
    _, factory, _ = setup(tls=object())
    cl = Client(factory)
    assert b"STARTTLS" in cl.greeting
    out = cl.run(b"a STARTTLS\r\nb LOGIN alice pw\r\n")
    assert tagged(out) == [(b"a", b"OK")]
    assert cl.t.tls_started == 1
    assert cl.proto.conn.plaintext_discarded == len(b"b LOGIN alice pw\r\n")
    assert b"STARTTLS" not in cl.run(b"c CAPABILITY\r\n")
    assert tagged(cl.run(b"d LOGIN alice pw\r\n")) == [(b"d", b"OK")]


def test_login_waits_for_tls_when_a_certificate_is_configured() -> None:
    """With TLS configured, LOGIN and AUTHENTICATE before STARTTLS are NO [PRIVACYREQUIRED]
    and CAPABILITY says LOGINDISABLED; after STARTTLS they work."""
    _, factory, _ = setup(tls=object())
    cl = Client(factory)
    assert b"LOGINDISABLED" in cl.greeting and b"AUTH=PLAIN" not in cl.greeting
    out = cl.run(b"a LOGIN alice pw\r\nb AUTHENTICATE PLAIN AGFsaWNlAHB3\r\n")
    assert b"a NO [PRIVACYREQUIRED]" in out and b"b NO [PRIVACYREQUIRED]" in out
    cl.run(b"c STARTTLS\r\n")
    assert b"AUTH=PLAIN" in cl.run(b"d CAPABILITY\r\n")
    assert tagged(cl.run(b"e AUTHENTICATE PLAIN AGFsaWNlAHB3\r\n")) == [(b"e", b"OK")]


def test_state_errors_and_hostile_lines_are_bad() -> None:
    """Commands in the wrong state and junk lines get BAD (tagged when possible), and the
    session goes on."""
    _, factory, _ = setup()
    cl = Client(factory)
    out = cl.run(
        b"a FETCH 1 FLAGS\r\n\xff\xfe\r\nb SELECT INBOX\r\nc LOGIN alice pw\r\nd LOGIN alice pw\r\n"
    )
    assert tagged(out) == [(b"a", b"BAD"), (b"b", b"BAD"), (b"c", b"OK"), (b"d", b"BAD")]
    assert b"* BAD" in out
    assert factory.rejected == 1
    fresh = Client(factory)
    out = fresh.run(b"a IDLE\r\nb STARTTLS\r\nc NOOP\r\n")
    assert tagged(out) == [(b"a", b"BAD"), (b"b", b"BAD"), (b"c", b"OK")]


def test_login_failure_and_sasl_plain() -> None:
    """Wrong passwords are NO [AUTHENTICATIONFAILED]; AUTHENTICATE PLAIN works with SASL-IR
    and with a continuation."""
    _, factory, _ = setup()
    cl = Client(factory)
    assert b"a NO [AUTHENTICATIONFAILED]" in cl.run(b'a LOGIN alice "wrong"\r\n')
    assert tagged(cl.run(b"b AUTHENTICATE PLAIN AGFsaWNlAHB3\r\n")) == [(b"b", b"OK")]
    cl2 = Client(factory)
    assert cl2.run(b"a AUTHENTICATE PLAIN\r\n") == b"+ \r\n"
    assert tagged(cl2.run(b"AGJvYgBwdzI=\r\nb NOOP\r\n")) == [(b"a", b"OK"), (b"b", b"OK")]
    cl3 = Client(factory)
    cl3.run(b"a AUTHENTICATE PLAIN\r\n")
    assert tagged(cl3.run(b"*\r\n")) == [(b"a", b"BAD")]


def test_select_reports_rfc3501_codes() -> None:
    """SELECT answers FLAGS, PERMANENTFLAGS, EXISTS, RECENT, UNSEEN, UIDVALIDITY, UIDNEXT."""
    _, factory, _ = setup()
    cl = Client(factory)
    out = cl.run(b"a LOGIN alice pw\r\nb SELECT INBOX\r\nc EXAMINE INBOX\r\n")
    for part in (b"* FLAGS (", b"[PERMANENTFLAGS (", b"* 2 EXISTS", b"* 0 RECENT", b"[UNSEEN 1]",
                 b"[UIDVALIDITY ", b"[UIDNEXT 3]", b"b OK [READ-WRITE]", b"c OK [READ-ONLY]"):  # fmt: skip
        assert part in out


def test_uidplus_move_trycreate() -> None:
    """APPEND answers APPENDUID, COPY COPYUID, MOVE an untagged COPYUID then EXPUNGE;
    a missing target is NO [TRYCREATE]; UID EXPUNGE removes only the named UIDs."""
    store, factory, _ = setup()
    cl = Client(factory)
    cl.run(b"a LOGIN alice pw\r\nb SELECT INBOX\r\n")
    out = cl.run(b"c APPEND INBOX (\\Seen) {5+}\r\nhello\r\n")
    assert re.search(rb"\* 3 EXISTS\r\nc OK \[APPENDUID \d+ 3\]", out)
    assert b"d NO [TRYCREATE]" in cl.run(b"d COPY 1 Nowhere\r\n")
    assert b"e NO [TRYCREATE]" in cl.run(b"e APPEND Nowhere {1+}\r\nx\r\n")
    assert re.search(rb"f OK \[COPYUID \d+ 1:2 1:2\]", cl.run(b"f UID COPY 1:2 Archive\r\n"))
    out = cl.run(b"g UID MOVE 2 Trash\r\n")
    assert re.search(rb"\* OK \[COPYUID \d+ 2 1\].*\r\n\* 2 EXPUNGE\r\ng OK", out, re.S)
    cl.run(b"h STORE 1:2 +FLAGS.SILENT (\\Deleted)\r\n")
    out = cl.run(b"i UID EXPUNGE 3\r\n")
    assert out == b"* 2 EXPUNGE\r\ni OK EXPUNGE completed\r\n"
    assert [m.uid for m in store.boxes["alice"]["INBOX"].messages] == [1]


def test_store_recent_is_bad_and_fetch_sets_seen() -> None:
    """STORE of \\Recent is BAD; a non-PEEK body fetch sets \\Seen and says FLAGS."""
    _, factory, _ = setup()
    cl = Client(factory)
    cl.run(b"a LOGIN alice pw\r\nb SELECT INBOX\r\n")
    assert tagged(cl.run(b"c STORE 1 +FLAGS (\\Recent)\r\n")) == [(b"c", b"BAD")]
    out = cl.run(b"d FETCH 1 (BODY[TEXT])\r\n")
    assert b"BODY[TEXT] {13}\r\nhello world\r\n FLAGS (\\Seen))" in out
    assert b"FLAGS (\\Seen)" not in cl.run(b"e NOOP\r\n")


def test_list_patterns() -> None:
    """LIST "" % lists one level, LIST "" "" only the root, LSUB only subscribed,
    special-use attributes and children are shown, LIST-STATUS adds STATUS."""
    _, factory, _ = setup()
    cl = Client(factory)
    cl.run(b"a LOGIN alice pw\r\nb CREATE Work/Projects\r\nc CREATE Work\r\nd UNSUBSCRIBE Junk\r\n")
    out = cl.run(b'e LIST "" %\r\n')
    assert b'"Work/Projects"' not in out and b'* LIST (\\HasChildren) "/" "Work"' in out
    assert b'* LIST (\\Sent \\HasNoChildren) "/" "Sent"' in out
    assert cl.run(b'f LIST "" ""\r\n').startswith(b'* LIST (\\Noselect) "/" ""\r\nf OK')
    out = cl.run(b'g LSUB "" *\r\n')
    assert b'"Junk"' not in out and b'"Work/Projects"' in out
    out = cl.run(b'h LIST "" INBOX RETURN (STATUS (MESSAGES UNSEEN))\r\n')
    assert (
        b'* LIST (\\HasNoChildren) "/" "INBOX"\r\n* STATUS INBOX (MESSAGES 2 UNSEEN 1)\r\n' in out
    )
    out = cl.run(b'i LIST (SPECIAL-USE) "" *\r\n')
    assert out.count(b"* LIST") == 5 and b'"INBOX"' not in out
    cl.run(b"j UNSUBSCRIBE Work\r\n")
    out = cl.run(b'k LSUB "" %\r\n')
    assert b'* LSUB (\\Noselect) "/" "Work"\r\n' in out and b'"Work/Projects"' not in out
    assert b'"Work"' not in cl.run(b'l LSUB "" *\r\n')
    out = cl.run(b'm LIST (SUBSCRIBED RECURSIVEMATCH) "" %\r\n')
    assert b'* LIST (\\HasChildren) "/" "Work" (CHILDINFO ("SUBSCRIBED"))\r\n' in out
    assert b'"Work"' not in cl.run(b'n LIST (SUBSCRIBED) "" %\r\n')


def test_two_sessions_see_each_others_changes() -> None:
    """Flags set and messages expunged by one session reach the other on NOOP and IDLE."""
    store, factory, _ = setup()
    one, two = Client(factory), Client(factory)
    for cl in (one, two):
        cl.run(b"a LOGIN alice pw\r\nb SELECT INBOX\r\n")
    one.run(b"c STORE 1 +FLAGS (\\Flagged)\r\n")
    assert b"* 1 FETCH (FLAGS (\\Flagged) UID 1)" in two.run(b"c NOOP\r\n")
    assert two.run(b"d IDLE\r\n") == b"+ idling\r\n"
    one.run(b"e STORE 2 +FLAGS (\\Deleted)\r\nf EXPUNGE\r\n")
    assert two.take() == b"* 2 FETCH (FLAGS (\\Deleted \\Seen) UID 2)\r\n* 2 EXPUNGE\r\n"
    store.deliver("alice", b"Subject: new\r\n\r\nx\r\n")
    assert two.take() == b"* 2 EXISTS\r\n"
    assert tagged(two.run(b"DONE\r\n")) == [(b"d", b"OK")]


def test_fetch_flags_are_current() -> None:
    """FETCH FLAGS shows another session's change at once, in one FETCH response per
    message (no stale answer followed by an update)."""
    _, factory, _ = setup()
    one, two = Client(factory), Client(factory)
    for cl in (one, two):
        cl.run(b"a LOGIN alice pw\r\nb SELECT INBOX\r\n")
    one.run(b"c STORE 1:2 +FLAGS (\\Flagged)\r\n")
    out = two.run(b"c FETCH 1 (FLAGS)\r\n")
    assert out == (
        b"* 2 FETCH (FLAGS (\\Flagged \\Seen) UID 2)\r\n"
        b"* 1 FETCH (FLAGS (\\Flagged))\r\nc OK FETCH completed\r\n"
    )
    assert two.run(b"d NOOP\r\n") == b"d OK NOOP completed\r\n"


def test_condstore_qresync() -> None:
    """ENABLE QRESYNC; SELECT with QRESYNC gives VANISHED (EARLIER) and changed flags;
    STORE UNCHANGEDSINCE reports MODIFIED; FETCH CHANGEDSINCE filters."""
    store, factory, _ = setup()
    cl = Client(factory)
    out = cl.run(b"a LOGIN alice pw\r\nb ENABLE QRESYNC\r\nc SELECT INBOX\r\n")
    assert b"* ENABLED QRESYNC\r\n" in out
    assert b"* ENABLED\r\n" in cl.run(b"b2 ENABLE CONDSTORE QRESYNC\r\n")
    modseq = int(re.search(rb"HIGHESTMODSEQ (\d+)", out).group(1))  # type: ignore[union-attr]
    validity = int(re.search(rb"UIDVALIDITY (\d+)", out).group(1))  # type: ignore[union-attr]
    cl.run(b"d STORE 1 +FLAGS (\\Deleted)\r\ne EXPUNGE\r\nf UNSELECT\r\n")
    store.boxes["alice"]["INBOX"].messages[0].flags.add("\\Flagged")
    store.boxes["alice"]["INBOX"].messages[0].modseq = modseq + 10
    store.boxes["alice"]["INBOX"].changed()
    out = cl.run(b"g SELECT INBOX (QRESYNC (%d %d 1:2))\r\n" % (validity, modseq))
    assert b"* VANISHED (EARLIER) 1\r\n" in out
    assert b"* 1 FETCH (UID 2 FLAGS (\\Flagged \\Seen) MODSEQ (%d))" % (modseq + 10) in out
    assert b"* 1 FETCH" not in cl.run(b"h FETCH 1 (FLAGS) (CHANGEDSINCE %d)\r\n" % (modseq + 10))
    out = cl.run(b"i UID STORE 2 (UNCHANGEDSINCE 1) +FLAGS (\\Answered)\r\n")
    assert b"i OK [MODIFIED 2]" in out
    out = cl.run(b"j UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)\r\n")
    assert out.startswith(b"* VANISHED (EARLIER) 1\r\n* 1 FETCH (UID 2 FLAGS")


def test_search_and_esearch() -> None:
    """SEARCH with OR/NOT/UID sets and ESEARCH RETURN options; unknown charset BADCHARSET."""
    _, factory, _ = setup()
    cl = Client(factory)
    cl.run(b"a LOGIN alice pw\r\nb SELECT INBOX\r\n")
    assert b"* SEARCH 1 2\r\n" in cl.run(b"c SEARCH OR SEEN TEXT hello\r\n")
    assert b"* SEARCH 2\r\n" in cl.run(b"d UID SEARCH NOT UID 1\r\n")
    assert (
        b"* SEARCH 1\r\n"
        in cl.run(b"e SEARCH CHARSET UTF-8 SUBJECT {3}\r\none\r\n").split(
            b"+ Ready for literal data\r\n"
        )[-1]
    )
    out = cl.run(b"f UID SEARCH RETURN (MIN MAX COUNT ALL) 1:*\r\n")
    assert b'* ESEARCH (TAG "f") UID MIN 1 MAX 2 COUNT 2 ALL 1:2\r\n' in out
    assert b"g NO [BADCHARSET (US-ASCII UTF-8)]" in cl.run(b"g SEARCH CHARSET KOI8-R ALL\r\n")


def test_capability_id_namespace() -> None:
    """CAPABILITY lists the extensions; ID and NAMESPACE answer."""
    _, factory, _ = setup()
    cl = Client(factory)
    out = cl.run(b"a CAPABILITY\r\nb ID NIL\r\n")
    for cap in (b"IMAP4rev1", b"LITERAL+", b"UIDPLUS", b"MOVE", b"IDLE", b"AUTH=PLAIN", b"QRESYNC"):
        assert cap in out
    assert b'* ID ("name" "yimaporc"' in out
    assert b'* NAMESPACE (("" "/")) NIL NIL' in cl.run(b"c LOGIN alice pw\r\nd NAMESPACE\r\n")


def test_append_too_big() -> None:
    """An APPEND above the configured size is NO [TOOBIG] without waiting for the data."""
    from yimaporc.imap._lexer import Limits

    _, factory, _ = setup(limits=Limits(max_append=100))
    cl = Client(factory)
    out = cl.run(b"a LOGIN alice pw\r\nb APPEND INBOX {101}\r\nc NOOP\r\n")
    assert b"b NO [TOOBIG]" in out and b"\r\n+ " not in out and b"c OK" in out


@settings(max_examples=int(os.environ.get("IMAP_FUZZ_EXAMPLES", "60")), deadline=None)
@given(st.lists(COMMANDS, min_size=1, max_size=8), st.binary(max_size=60))
def test_fuzzed_sessions_never_hit_a_server_error(cmds: list[Any], junk: bytes) -> None:
    """Any sequence of valid commands (and junk) after login/select is answered with
    OK/NO/BAD; no handler fails with an unexpected exception (SERVERBUG)."""
    _, factory, _ = setup()
    cl = Client(factory)
    data = b"a LOGIN alice pw\r\nb SELECT INBOX\r\n" + b"".join(format_command(x) for x in cmds)
    cl.send(data + junk + b"\r\nz NOOP\r\n")
    out = cl.take()
    assert b"SERVERBUG" not in out, out
    assert cl.proto.runner.server_errors == 0


def test_session_fed_byte_by_byte_answers_the_same() -> None:
    """A whole session fed one byte at a time gets the same answers as fed in one packet
    (synchronising literals aside, whose "+" comes as soon as the brace is in)."""
    session = (
        b'a LOGIN alice "pw"\r\nb SELECT INBOX\r\nc UID FETCH 1:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (X-TUID)])\r\n'
        b"d SEARCH OR SEEN TEXT {5+}\r\nhello\r\ne STORE 1 +FLAGS (\\Answered)\r\n"
        b'f APPEND INBOX (\\Seen) {4+}\r\nabcd\r\ng LIST "" %\r\nh LOGOUT\r\n'
    )
    outs = []
    for chunks in ([session], [session[i : i + 1] for i in range(len(session))]):
        _, factory, _ = setup()
        cl = Client(factory)
        for chunk in chunks:
            cl.send(chunk)
        outs.append(cl.take())
    assert outs[0] == outs[1]
    assert [t for t, _ in tagged(outs[0])] == [b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"h"]


def test_rename_inbox_moves_messages_and_keeps_inbox() -> None:
    """RENAME INBOX (any case) moves its messages to the new name and leaves INBOX empty
    (RFC 3501 6.3.5; INBOX used to be renamed away, SELECT INBOX then failed); RENAME
    onto INBOX is NO [ALREADYEXISTS]."""
    store, factory, _ = setup()
    cl = Client(factory)
    cl.run(b"a LOGIN alice pw\r\n")
    assert b"b OK" in cl.run(b"b RENAME inbox Old\r\n")
    assert b"c NO [ALREADYEXISTS]" in cl.run(b"c RENAME Sent InBox\r\n")
    assert b"* 0 EXISTS" in cl.run(b"d SELECT INBOX\r\n")
    assert b"* 2 EXISTS" in cl.run(b"e SELECT Old\r\n")
    assert {"INBOX", "Old", "Sent"} <= set(store.boxes["alice"])


def test_list_pattern_matches_inbox_in_any_case() -> None:
    """LIST "" "inbox*" finds INBOX and its children, as Dovecot does (INBOX is
    case-insensitive); other names stay case-sensitive."""
    _, factory, _ = setup()
    cl = Client(factory)
    cl.run(b"a LOGIN alice pw\r\nb CREATE INBOX/Sub\r\nc CREATE Inboxes\r\n")
    out = cl.run(b'd LIST "" "inbox*"\r\n')
    assert b'"INBOX"\r\n' in out and b'"INBOX/Sub"\r\n' in out and b"Inboxes" not in out
    out = cl.run(b'e LIST "" "In%"\r\n')
    assert b'"INBOX"\r\n' in out and b'"Inboxes"\r\n' in out and b"INBOX/Sub" not in out
    assert b"* LIST" not in cl.run(b'f LIST "" "sent"\r\n')


def test_create_and_rename_refuse_names_that_are_not_modified_utf7() -> None:
    """CREATE/RENAME of a raw UTF-8 name (mbsync pushing a local folder "Lokal Grün") is
    NO [CANNOT] as in Dovecot, instead of a name LIST can only send back as 8-bit; valid
    modified UTF-7 (``Entw&APw-rfe``, ``&-``) is accepted."""
    store, factory, _ = setup()
    cl = Client(factory)
    cl.run(b"a LOGIN alice pw\r\n")
    assert b"b NO [CANNOT]" in cl.run('b CREATE "Lokal Grün"\r\n'.encode())
    assert b"c BAD" in cl.run(b"c CREATE {4+}\r\nx\xff\xfey\r\n")  # not even UTF-8
    assert b"d NO [CANNOT]" in cl.run(b"d CREATE &AGE-\r\n")  # ASCII inside base64
    assert b"e NO [CANNOT]" in cl.run(b"e CREATE &2D0-\r\n")  # a lone surrogate
    assert b"f NO [CANNOT]" in cl.run('f RENAME Sent "Gesendet ✓"\r\n'.encode())
    assert b"g OK" in cl.run(b"g CREATE Entw&APw-rfe\r\n")
    assert b"h OK" in cl.run(b'h CREATE "R&-D/&ZeVnLIqe-"\r\n')
    assert b"i OK" in cl.run(b"i RENAME Sent &U,BTFw-\r\n")
    assert {"Entw&APw-rfe", "R&-D/&ZeVnLIqe-", "&U,BTFw-"} <= set(store.boxes["alice"])
    assert not any(ord(ch) > 127 for name in store.boxes["alice"] for ch in name)


@given(st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40))
def test_modified_utf7_names_from_a_client_encoder_are_valid(name: str) -> None:
    """Every name imapclient's modified-UTF-7 encoder produces is accepted; the raw
    text is accepted only when it is printable ASCII with no lone ``&``."""
    imap_utf7 = pytest.importorskip("imapclient.imap_utf7")
    assert valid_mailbox_name(imap_utf7.encode(name).decode("ascii"))
    if any(not " " <= ch <= "~" for ch in name):
        assert not valid_mailbox_name(name)
