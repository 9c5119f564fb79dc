"""Hostile IMAP/POP3 input without sockets: every former traceback is a protocol reply and
a count, pipelining is capped, sessions release what they hold, LIST matches linearly."""

from __future__ import annotations

import gc
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mailtest_helpers import ImmediateReactor, SyncPool, result_of
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import LoopingCall
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from yimaporc.porcupine._guard import ClientErrors, list_match, list_match_steps
from yimaporc.porcupine._pop3 import MailPOP3, Pop3Mailbox
from yimaporc.porcupine.auth import IImapUser
from yimaporc.porcupine.fragments import FragmentStore, MailboxManager
from yimaporc.porcupine.imap_backend import (
    MailboxRegistry,
    PorcupineImapBackend,
)
from yimaporc.porcupine.imap_server import PorcupineImapFactory
from yimaporc.porcupine.profiledb import ProfileDB
from yimaporc.porcupine.retrieval import HomeOnly, SingleCopies, UserMail
from yimaporc.porcupine.users import UserManager
from yimaporc.porcupine.values import INBOX, NewMessage
from yimaporc.testing.pytest_plugin import LoggedFailures

ALICE = "alice@example.org"
PLAIN = b"From: a@x.org\r\nTo: alice@example.org\r\nSubject: hello\r\n\r\nbody text\r\n"


@pytest.fixture
def failures(logged_failures: LoggedFailures) -> Iterator[list[dict[str, Any]]]:
    """Every logged event carrying a failure (a traceback), collected for the test:
    ``log_failure`` (twisted.logger) or ``failure``/``isError`` (legacy ``log.err``)."""
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event or "failure" in event or event.get("isError"):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    gc.collect()  # unhandled errors in Deferreds are logged when collected
    globalLogPublisher.removeObserver(observe)
    logged_failures.take()  # the tests using this fixture assert on what was logged


class CountingManager:
    """A mailbox manager proxy counting the calls made on it (internal calls)."""

    def __init__(self, inner: MailboxManager) -> None:
        self.inner = inner
        self.calls = 0
        self.node_id = "n1"

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*a: Any, **kw: Any) -> Any:
            self.calls += 1
            return attr(*a, **kw)

        return call


class Mail:
    """A synchronous one-node mail stack: fragment store, managers, an IMAP account."""

    def __init__(self, tmp_path: Any) -> None:
        self.clock = ImmediateReactor()
        store = FragmentStore(tmp_path, "n1", lambda: 1_700_000_000.0)
        self.manager = CountingManager(MailboxManager(self.clock, SyncPool(), store))  # type: ignore[arg-type]
        profiles = ProfileDB(
            self.clock,
            SyncPool(),  # type: ignore[arg-type]
            tmp_path / "mail" / "profiles.sqlite",
            lambda: 1_700_000_000.0,
        )
        self.users = UserManager("n1", profiles)
        self.registry = MailboxRegistry()
        self.manager.inner.on_change(self.registry.changed)
        self.errors = ClientErrors(self.clock.seconds)
        for i in range(3):
            body = PLAIN.replace(b"hello", b"hello %d" % i)
            result_of(self.manager.store([NewMessage(ALICE, INBOX, body)]))
        result_of(self.users.add_fragment(ALICE, "n1"))

    def usermail(self) -> UserMail:
        return UserMail(
            ALICE, "n1", self.users, lambda n: self.manager, HomeOnly("n1"), SingleCopies()
        )  # type: ignore[arg-type,return-value]

    def login(self, creds: Any, mind: Any, *ifaces: Any) -> Deferred[Any]:
        """The portal: any password opens alice's mail."""
        return succeed((IImapUser, self.usermail(), lambda: None))

    def factory(self, tls: Any = None) -> PorcupineImapFactory:
        backend = PorcupineImapBackend(self, self.registry, self.clock, self.errors)
        return PorcupineImapFactory(backend, lambda p, addr: self, self.errors, self.clock, tls=tls)

    def imap(self, logged_in: bool = True, tls: Any = None) -> tuple[Any, StringTransport]:
        p = self.factory(tls).buildProtocol(None)
        t = TLSStringTransport()
        p.makeConnection(t)
        if logged_in:
            p.dataReceived(b"x0 LOGIN alice pw\r\n")
            self.pump()
            assert b"x0 OK" in t.value(), t.value()
        t.clear()
        return p, t

    def pump(self) -> None:
        """Run every zero-delay call (FETCH output, SEARCH batches)."""
        for _ in range(10_000):
            if not self.clock.getDelayedCalls():
                return
            self.clock.advance(0)


@pytest.fixture
def mail(tmp_path: Any) -> Mail:
    """Three messages in alice's INBOX, served synchronously."""
    return Mail(tmp_path)


def send(m: Mail, p: Any, t: StringTransport, *lines: bytes) -> bytes:
    t.clear()
    for line in lines:
        p.dataReceived(line + b"\r\n")
        m.pump()
    return t.value()


def tagged(out: bytes, tag: bytes = b"a") -> bytes:
    found = re.findall(rb"^" + re.escape(tag) + rb" ((?:OK|NO|BAD)[^\r]*)\r$", out, re.M)
    assert len(found) == 1, out
    return found[0]  # type: ignore[no-any-return]


# --- IMAP: former tracebacks ----------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"a SEARCH OR SEEN UNSEEN", b"OK"),
        (b"a SEARCH NOT SEEN", b"OK"),
        (b"a SEARCH NOT OR DELETED 2:3", b"OK"),
        (b"a SEARCH UID 1:*", b"OK"),
        (b"a SEARCH 2:*", b"OK"),
        (b"a SEARCH BODY text", b"OK"),
        (b"a SEARCH FOO", b"BAD"),
        (b"a SEARCH OR", b"BAD"),
        (b"a SEARCH NOT", b"BAD"),
        (b"a SEARCH 1:abc", b"BAD"),
        (b"a SEARCH UID x", b"BAD"),
        (b"a SEARCH (((", b"BAD"),
        (b"a SEARCH BEFORE notadate", b"BAD"),
        (b"a SEARCH LARGER x", b"BAD"),
        (b"a FETCH 1 (BODY[1.2.3])", b"OK"),
        (b"a FETCH 1 (BODY.PEEK[5])", b"OK"),
        (b"a FETCH 1 (BODY[HEADER.FIELDS])", b"BAD"),
        (b"a FETCH 1 (BODY[HEADER.FIELDS (FROM])", b"BAD"),
        (b"a FETCH 1 (BODY[)", b"BAD"),
        (b"a FETCH 1 (BODY[HEADER.FIELDS (X-\xff)])", b"BAD"),
        (b"a FETCH 1 (BODY.PEEK[HEADER.FIELDS.NOT (\xc3\xa9)])", b"BAD"),
        (b"a FETCH 1 (BODY[]<x>)", b"BAD"),
        (b"a FETCH 1 NOSUCHATT", b"BAD"),
        (b"a FETCH 1:x FLAGS", b"BAD"),
        (b"a FETCH 0 FLAGS", b"BAD"),
        (b"a FETCH *:* FLAGS", b"OK"),  # valid (RFC 3501 seq-range)
        (b"a FETCH ,,, FLAGS", b"BAD"),
        (b"a STORE 1:x +FLAGS (\\Seen)", b"BAD"),
        (b"a UID FETCH 1:y FLAGS", b"BAD"),
        (b"a UID FOO 1", b"BAD"),
        (b"a COPY 1 Missing", b"NO [TRYCREATE]"),
        (b"a COPY 1:q INBOX", b"BAD"),
        (b'a SELECT "&@@@-"', b"NO"),
        (b'a CREATE "\xff"', b"BAD"),  # mailbox names are UTF-8
        (b'a LIST "" "&@@@-*"', b"OK"),  # matches nothing
        (b"a STATUS INBOX (FOO)", b"BAD"),
        (b"a STATUS INBOX", b"BAD"),
        (b"a \xff\xfe", b"BAD"),
        (b"a", b"BAD"),
        (b"a NOOP extra args", b"BAD"),
        (b"a EXAMINE", b"BAD"),
        (b'a LIST "unterminated', b"BAD"),
    ],
)
def test_imap_client_errors_answered_not_logged(
    mail: Mail, failures: list[dict[str, Any]], line: bytes, reply: bytes
) -> None:
    """A client mistake that stock twisted logged as a traceback is a tagged reply and a count."""
    p, t = mail.imap()
    assert tagged(send(mail, p, t, b"s SELECT INBOX"), b"s").startswith(b"OK")
    before = sum(mail.errors.counts.values())
    answer = tagged(send(mail, p, t, line))
    assert answer.startswith(reply), answer
    if not reply.startswith(b"OK"):
        assert sum(mail.errors.counts.values()) == before + 1, mail.errors.counts
    assert "imap.server_error" not in mail.errors.counts
    assert not failures
    assert tagged(send(mail, p, t, b"a NOOP")).startswith(b"OK")  # still serving


def test_imap_search_or_not_results(mail: Mail, failures: list[dict[str, Any]]) -> None:
    """SEARCH OR / NOT / sequence sets give the right messages (they raised before)."""
    p, t = mail.imap()
    send(mail, p, t, b"s SELECT INBOX", b"f STORE 2 +FLAGS (\\Seen)")
    out = send(mail, p, t, b"a SEARCH NOT SEEN")
    assert b"* SEARCH 1 3\r\n" in out
    out = send(mail, p, t, b"a SEARCH OR SEEN 3")
    assert b"* SEARCH 2 3\r\n" in out
    out = send(mail, p, t, b"a UID SEARCH UID 2:*")
    assert b"* SEARCH 2 3\r\n" in out
    assert not failures


def test_imap_append_to_missing_mailbox_trycreate(
    mail: Mail, failures: list[dict[str, Any]]
) -> None:
    """APPEND to a mailbox that does not exist is NO [TRYCREATE], the literal consumed."""
    p, t = mail.imap()
    t.clear()
    p.dataReceived(b"a APPEND Nowhere {5}\r\n")
    assert t.value().startswith(b"+ ")
    out = send(mail, p, t, b"hello")
    assert tagged(out).startswith(b"NO [TRYCREATE]")
    assert mail.errors.counts["imap.command_refused"] == 1
    assert tagged(send(mail, p, t, b"a NOOP")).startswith(b"OK")
    assert not failures


def test_imap_keyword_flood_is_limit_and_counted(
    mail: Mail, failures: list[dict[str, Any]]
) -> None:
    """STORE 1:* +FLAGS with thousands of keywords is NO [LIMIT] (imap.keyword_limit),
    nothing stored on any message; PERMANENTFLAGS offers \\* while keywords can be made."""
    p, t = mail.imap()
    out = send(mail, p, t, b"s SELECT INBOX")
    assert b"\\*)] " in out
    flood = b" ".join(b"k%d" % i for i in range(4000))
    out = send(mail, p, t, b"a STORE 1:* +FLAGS (" + flood + b")")
    assert tagged(out).startswith(b"NO [LIMIT]")
    assert mail.errors.counts["imap.keyword_limit"] == 1
    assert mail.errors.counts["imap.command_refused"] == 1
    out = send(mail, p, t, b"a FETCH 1:* FLAGS")
    assert tagged(out).startswith(b"OK") and b"k0" not in out
    assert not failures


def test_imap_pipelined_fetches_in_order(mail: Mail, failures: list[dict[str, Any]]) -> None:
    """Two FETCHes and a NOOP in one packet are answered in order (stock crashed on _oldTimeout)."""
    p, t = mail.imap()
    send(mail, p, t, b"s SELECT INBOX")
    t.clear()
    p.dataReceived(b"a FETCH 1:* (FLAGS BODY.PEEK[])\r\nb FETCH 1 (UID)\r\nc NOOP\r\n")
    mail.pump()
    out = t.value()
    tags = re.findall(rb"^([abc]) OK", out, re.M)
    assert tags == [b"a", b"b", b"c"], out
    assert not failures


def test_imap_many_garbage_lines_cost_no_tracebacks(
    mail: Mail, failures: list[dict[str, Any]]
) -> None:
    """Thousands of bad lines before and after login: each answered, none logged."""
    junk = [b"x FOO", b"\xff\xfe\xfd", b"x SEARCH", b"x FETCH", b"x LOGIN", b"* BAD", b"x UID"]
    for logged_in in (False, True):
        p, t = mail.imap(logged_in)
        data = b"".join(junk[i % len(junk)] + b" %d\r\n" % i for i in range(3000))
        p.dataReceived(data)
        mail.pump()
        assert t.value().count(b" BAD ") + t.value().count(b" NO ") >= 3000
        assert not t.disconnecting
    assert not failures
    assert "imap.server_error" not in mail.errors.counts


RAW_UTF8 = (
    "From: Jörg <j@x.org>\r\nSubject: grüße\r\nMIME-Version: 1.0\r\n"
    "Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n\r\nhé\r\n--XX\r\n"
    'Content-Type: application/octet-stream; name="grüße.bin"\r\n\r\nabc\r\n--XX--\r\n'
).encode()


@pytest.mark.parametrize("query", [b"ENVELOPE", b"BODYSTRUCTURE", b"BODY", b"ENVELOPE BODY[1]"])
def test_imap_fetch_raw_utf8_headers(
    mail: Mail, failures: list[dict[str, Any]], query: bytes
) -> None:
    """ENVELOPE/BODYSTRUCTURE of a message with raw 8-bit headers: the UTF-8 text as a
    literal (as Dovecot sends it), the session goes on (stock: UnicodeEncodeError,
    connection dropped at every sync)."""
    result_of(mail.manager.store([NewMessage(ALICE, INBOX, RAW_UTF8)]))
    p, t = mail.imap()
    send(mail, p, t, b"s SELECT INBOX")
    out = send(mail, p, t, b"a FETCH 4 (" + query + b")")
    assert tagged(out) == b"OK FETCH completed"
    assert re.search(rb"\{\d+\}\r\n" + re.escape("grüße".encode()), out), out
    if query.startswith(b"ENVELOPE"):
        assert b'NIL "j" "x.org"' in out  # the address survives
    assert not t.disconnecting
    assert not failures and not mail.errors.counts


def test_imap_idle_sees_new_mail(mail: Mail, failures: list[dict[str, Any]]) -> None:
    """A session in IDLE is told of new mail at once (commands are serialised, news is not)."""
    p, t = mail.imap()
    send(mail, p, t, b"s SELECT INBOX", b"i IDLE")
    t.clear()
    result_of(mail.manager.store([NewMessage(ALICE, INBOX, PLAIN)]))
    mail.pump()
    assert b"* 4 EXISTS\r\n" in t.value()
    assert tagged(send(mail, p, t, b"DONE"), b"i").startswith(b"OK")
    assert not failures


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that records startTLS."""

    tls_started = False

    def startTLS(self, contextFactory: Any) -> None:
        self.tls_started = True


@pytest.mark.parametrize("first", [b"", b"z CAPABILITY\r\n"])
def test_imap_plaintext_after_starttls_dropped(mail: Mail, first: bytes) -> None:
    """Commands sent in the same packet as STARTTLS are discarded, never run inside TLS;
    what comes after the handshake is served in full."""
    p, t = mail.imap(logged_in=False, tls=object())
    p.dataReceived(first + b"a STARTTLS\r\nb CAPABILITY\r\nc LOGIN x y\r\n")
    mail.pump()
    assert t.tls_started
    tags = re.findall(rb"^(\w+) (?:OK|NO|BAD)", t.value(), re.M)
    assert tags == ([b"z"] if first else []) + [b"a"]
    t.clear()
    p.dataReceived(b"d NOOP\r\ne NOOP\r\n")
    mail.pump()
    assert re.findall(rb"^(\w+) OK", t.value(), re.M) == [b"d", b"e"]


# --- IMAP: pipelining and buffers ---------------------------------------------------------


def test_imap_pipeline_cap_pauses_reading(mail: Mail, failures: list[dict[str, Any]]) -> None:
    """Commands run one at a time; past max_queued parsed ones the server stops
    reading, and answers resume it."""
    p, t = mail.imap()
    session = p.runner.session
    real = session.status
    pending: list[Deferred[Any]] = []

    def slow(name: str) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        pending.append(d)
        return d.addCallback(lambda _: real(name))

    session.status = slow
    n = 100
    p.dataReceived(b"".join(b"s%d STATUS INBOX (MESSAGES)\r\n" % i for i in range(n)))
    assert len(pending) == 1  # the next command waits for this one's answer
    assert len(p.queue) <= p.factory.max_queued
    assert t.producerState == "paused"
    while pending:
        pending.pop().callback(None)
        mail.pump()
    assert t.producerState == "producing"
    assert re.findall(rb"^s(\d+) OK", t.value(), re.M) == [b"%d" % i for i in range(n)]
    assert not failures


def test_imap_output_backlog_pauses_reading(mail: Mail) -> None:
    """While the transport's write buffer is full (pauseProducing), no command runs."""
    p, t = mail.imap()
    assert t.producer is p._gate
    p._gate.pauseProducing()
    p.dataReceived(b"a NOOP\r\nb NOOP\r\n")
    assert b"NOOP" not in t.value()
    p._gate.resumeProducing()
    mail.pump()
    assert t.value().count(b"OK NOOP") == 2


# --- IMAP: sessions release what they hold -------------------------------------------------


def poller(mail: Mail) -> LoopingCall:
    """What the cluster does every 5 s: refresh every open mailbox."""

    def poll() -> None:
        for user, box in list(mail.registry.boxes):
            mail.registry.changed(user, box)

    loop = LoopingCall(poll)
    loop.clock = mail.clock
    loop.start(5.0, now=False)
    return loop


@pytest.mark.parametrize(
    "how", ["drop", "logout", "idle", "mid_select", "mid_fetch", "timeout", "twice"]
)
def test_imap_dropped_sessions_release_everything(
    mail: Mail, failures: list[dict[str, Any]], how: str
) -> None:
    """N sessions that SELECT then vanish (any state) leave no listener, timer or refresh."""
    loop = poller(mail)
    sessions = []
    for _ in range(20):
        p, t = mail.imap()
        if how == "mid_select":
            p.dataReceived(b"s SELECT INBOX\r\n")  # connection goes before it answers
        else:
            send(mail, p, t, b"s SELECT INBOX")
            assert tagged(t.value(), b"s").startswith(b"OK")
        if how == "idle":
            send(mail, p, t, b"i IDLE")
        elif how == "logout":
            send(mail, p, t, b"l LOGOUT")
        elif how == "twice":
            p.dataReceived(b"s1 SELECT INBOX\r\ns2 EXAMINE INBOX\r\n")
        elif how == "mid_fetch":  # output still being written when the client goes
            p.dataReceived(b"f FETCH 1:* (BODY.PEEK[])\r\nn NOOP\r\n")
        sessions.append((p, t))
    if how not in ("mid_select", "logout"):
        assert mail.registry.boxes
    if how == "timeout":
        mail.clock.advance(30 * 60 + 1)
    for p, _ in sessions:
        p.connectionLost(Failure(ConnectionError("gone")))
    mail.pump()
    assert not mail.registry.boxes
    assert mail.clock.getDelayedCalls() == [loop.call]  # no session timer left
    before = mail.manager.calls
    mail.clock.advance(60)  # twelve polls
    assert mail.manager.calls == before  # nothing re-read for the departed sessions
    loop.stop()
    assert not failures


def test_imap_live_session_still_refreshed(mail: Mail) -> None:
    """A session in IDLE keeps its mailbox polled (the cleanup is not over-eager); a
    selected session not idling is brought up to date by its next command instead,
    so the poll reads nothing for it."""
    loop = poller(mail)
    p, t = mail.imap()
    send(mail, p, t, b"s SELECT INBOX")
    before = mail.manager.calls
    mail.clock.advance(5)
    assert mail.manager.calls == before
    send(mail, p, t, b"i IDLE")
    before = mail.manager.calls
    mail.clock.advance(5)
    assert mail.manager.calls > before
    p.connectionLost(Failure(ConnectionError("gone")))
    loop.stop()


# --- LIST matching ---------------------------------------------------------------------------


def reference_match(pattern: str, name: str, delim: str) -> bool:
    """Brute force: try every way to split ``name`` over the pattern's wildcards."""
    if not pattern:
        return not name
    c = pattern[0]
    if c == "*":
        return any(reference_match(pattern[1:], name[i:], delim) for i in range(len(name) + 1))
    if c == "%":
        for i in range(len(name) + 1):
            if delim in name[:i]:
                break
            if reference_match(pattern[1:], name[i:], delim):
                return True
        return False
    return bool(name) and name[0] == c and reference_match(pattern[1:], name[1:], delim)


@settings(deadline=None)  # examples from the profile (fuzz: 1000)
@given(
    st.text(alphabet="ab/*%", max_size=8),
    st.text(alphabet="ab/", max_size=8),
)
def test_list_match_agrees_with_brute_force(pattern: str, name: str) -> None:
    """The linear matcher accepts exactly what exhaustive backtracking accepts."""
    assert list_match(pattern, name, "/") == reference_match(pattern, name, "/")


def test_list_match_pathological_pattern_linear_steps() -> None:
    """Many wildcards against a long name take at most 2(|p|+1)(|n|+1) steps
    (backtracking needed ~2^40 on the 40-character case)."""
    name = "a" * 40
    for pattern in ["*a" * 9 + "b", "%a" * 20 + "b", "*%" * 200 + "b", "*a*" * 30 + "X"]:
        ok, steps = list_match_steps(pattern, name, "/")
        assert not ok
        assert steps <= 2 * (len(pattern) + 1) * (len(name) + 1), (pattern, steps)
    ok, steps = list_match_steps("*" * 5000 + "a" * 1000, "a" * 1000, "/")
    assert ok and steps <= 2 * 1001 * 1002


def test_imap_list_pathological_pattern(mail: Mail, failures: list[dict[str, Any]]) -> None:
    """LIST with many wildcards against a long mailbox name answers (linear matcher)."""
    p, t = mail.imap()
    long_name = b"x" * 36
    send(mail, p, t, b"c CREATE " + long_name)
    out = send(mail, p, t, b'a LIST "" "' + b"*x" * 30 + b'y"')
    assert tagged(out) == b"OK LIST completed"
    assert b"* LIST" not in out
    out = send(mail, p, t, b'a LIST "" "' + b"*x" * 30 + b'*"')
    assert b'"/" "' + long_name + b'"' in out
    out = send(mail, p, t, b'a LIST "" "inbox"')
    assert b'"/" "INBOX"' in out
    assert not failures


# --- POP3 ---------------------------------------------------------------------------------


def pop3(m: Mail, logged_in: bool) -> tuple[MailPOP3, StringTransport]:
    p = MailPOP3(m.clock, errors=m.errors)
    t = StringTransport()
    p.makeConnection(t)
    if logged_in:
        mail = UserMail(ALICE, "n1", m.users, lambda n: m.manager, HomeOnly("n1"), SingleCopies())  # type: ignore[arg-type,return-value]
        p.mbox = Pop3Mailbox(mail, 1, result_of(mail.digests(INBOX)))
    t.clear()
    return p, t


PRE_LOGIN = [b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"FOO", b"USER a b", b"QUIT now",
             b"\xff\xfe", b"", b"APOP a b", b"RPOP x", b"CAPA x", b"TOP 1", b"PASS"]  # fmt: skip
AFTER_LOGIN = [b"STAT x", b"LIST 1 2", b"RETR", b"RETR 1 2", b"TOP 1", b"TOP x y", b"DELE",
               b"DELE 1 2", b"UIDL a b", b"LIST abc", b"RETR 99", b"NOOP 1", b"USER b",
               b"RSET x", b"LAST", b"STLS", b"AUTH PLAIN"]  # fmt: skip


@pytest.mark.parametrize("logged_in", [False, True])
def test_pop3_client_errors_answered_not_logged(
    mail: Mail, failures: list[dict[str, Any]], logged_in: bool
) -> None:
    """Each bad command (wrong state, unknown, wrong arguments) is one -ERR and a count."""
    lines = AFTER_LOGIN if logged_in else PRE_LOGIN
    p, t = pop3(mail, logged_in)
    for line in lines:
        t.clear()
        p.dataReceived(line + b"\r\n")
        assert t.value().startswith(b"-ERR"), (line, t.value())
    assert sum(mail.errors.counts.values()) == len(lines)
    assert "pop3.server_error" not in mail.errors.counts
    assert not failures
    t.clear()
    p.dataReceived(b"NOOP\r\n" if logged_in else b"CAPA\r\n")
    assert t.value().startswith(b"+OK")


def test_pop3_90k_prelogin_commands(mail: Mail, failures: list[dict[str, Any]]) -> None:
    """The attack: 90 KB of pre-login commands is 15,000 -ERR lines and counts, no traceback."""
    p, t = pop3(mail, False)
    data = b"STAT\r\n" * 15_000
    p.dataReceived(data)
    assert t.value().count(b"-ERR") == 15_000
    assert mail.errors.counts["pop3.not_authenticated"] == 15_000
    assert not failures


def test_pop3_pipeline_cap(mail: Mail, failures: list[dict[str, Any]]) -> None:
    """Commands queued behind a running RETR are capped: reading pauses, then resumes."""
    p, t = pop3(mail, True)
    box = p.mbox
    held: list[Deferred[bytes]] = []
    real = box.body_of

    def slow(index: int) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        held.append(d)
        real(index).addCallback(lambda _: None)
        return d

    box.body_of = slow  # type: ignore[method-assign]
    p.dataReceived(b"RETR 1\r\n" + b"NOOP\r\n" * 100)
    assert len(p.blocked) == p.MAX_PIPELINE
    assert t.producerState == "paused"
    held.pop().callback(PLAIN)
    assert t.producerState == "producing"
    assert t.value().count(b"+OK") == 101
    assert not failures


def test_pop3_dropped_mid_retr_leaves_no_timer(mail: Mail, failures: list[dict[str, Any]]) -> None:
    """A RETR that completes after the client left restores no idle timer, runs nothing queued."""
    p, t = pop3(mail, True)
    held: list[Deferred[bytes]] = []

    def slow(index: int) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        held.append(d)
        return d

    p.mbox.body_of = slow  # type: ignore[method-assign]
    p.dataReceived(b"RETR 1\r\nDELE 1\r\nQUIT\r\n")
    p.connectionLost(Failure(ConnectionError("gone")))
    held.pop().callback(PLAIN)
    assert mail.clock.getDelayedCalls() == []
    assert b"message deleted" not in t.value()
    assert not failures


def test_pop3_plaintext_after_stls_dropped(mail: Mail) -> None:
    """Commands sent in the same packet as STLS are discarded, never run inside TLS."""
    p = MailPOP3(mail.clock, context_factory=object(), errors=mail.errors)
    t = TLSStringTransport()
    p.makeConnection(t)
    t.clear()
    p.dataReceived(b"STLS\r\nUSER alice\r\nPASS x\r\n")
    assert t.tls_started
    assert t.value() == b"+OK Begin TLS negotiation\r\n"


# --- fuzzing the dispatch with hypothesis ---------------------------------------------------

_FUZZ_MAIL: dict[str, Mail] = {}


def fuzz_mail(factory: Any, key: str) -> Mail:
    """One mail stack per fuzz test, shared by its examples (setting one up costs ~0.2 s)."""
    if key not in _FUZZ_MAIL:
        _FUZZ_MAIL[key] = Mail(factory.mktemp(key))
    return _FUZZ_MAIL[key]


IMAP_TOKENS = [
    b"SELECT", b"EXAMINE", b"FETCH", b"UID", b"SEARCH", b"STORE", b"COPY", b"APPEND", b"LIST",
    b"LSUB", b"STATUS", b"CREATE", b"DELETE", b"RENAME", b"SUBSCRIBE", b"EXPUNGE", b"CLOSE",
    b"CHECK", b"NOOP", b"IDLE", b"NAMESPACE", b"CAPABILITY", b"LOGIN", b"AUTHENTICATE",
    b"INBOX", b"Missing", b"1", b"0", b"*", b"1:*", b"2:1", b"1,3", b"x", b"-1", b"99999999999",
    b"(", b")", b"[", b"]", b"<", b">", b".", b"BODY", b"BODY.PEEK", b"BODY[]", b"BODY[1]",
    b"BODY[TEXT]", b"BODY[HEADER.FIELDS", b"(FROM)", b"RFC822", b"ENVELOPE", b"BODYSTRUCTURE",
    b"FLAGS", b"+FLAGS", b"-FLAGS.SILENT", b"\\Seen", b"\\Deleted", b"OR", b"NOT", b"ALL",
    b"SEEN", b"BEFORE", b"SINCE", b"1-Jan-2020", b"LARGER", b"HEADER", b"KEYWORD", b"CHARSET",
    b"UTF-8", b'"', b'""', b'"a b"', b"{0}", b"{3}", b"%", b"&", b"&@@-", b"\xff", b"\x00",
    b"MESSAGES", b"UNSEEN", b"UIDNEXT",
]  # fmt: skip


@settings(deadline=None)  # the profile's count: 60 under CI, 1000 in `make test-slow`
@given(
    st.lists(
        st.lists(st.sampled_from(IMAP_TOKENS), min_size=1, max_size=8).map(b" ".join),
        min_size=1,
        max_size=6,
    ),
    st.booleans(),
    st.booleans(),
)
def test_imap_fuzzed_commands_never_traceback(
    tmp_path_factory: Any, commands: list[bytes], glued: bool, logged_in: bool
) -> None:
    """Random token sequences (pipelined or one by one, before login or with INBOX
    selected) get replies, never a traceback."""
    mail = fuzz_mail(tmp_path_factory, "imap")
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event or "failure" in event or event.get("isError"):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        p, t = mail.imap(logged_in)
        if logged_in:
            send(mail, p, t, b"s SELECT INBOX")
        lines = [b"f%d %s" % (i, c) for i, c in enumerate(commands)] + [b"z NOOP"]
        if glued:
            p.dataReceived(b"".join(line + b"\r\n" for line in lines))
            mail.pump()
        else:
            for line in lines:
                p.dataReceived(line + b"\r\n")
                mail.pump()
        # a literal or IDLE may still wait for more input: end them, then check
        p.dataReceived(b"DONE\r\n" + b"x" * 8 + b"\r\n")
        mail.pump()
        p.connectionLost(Failure(ConnectionError("done")))
        mail.pump()
        gc.collect(0)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not seen, [e.get("log_format") or e.get("why") for e in seen]
    assert "imap.server_error" not in mail.errors.counts, mail.errors.counts
    assert not mail.registry.boxes


POP3_TOKENS = [
    b"USER", b"PASS", b"STAT", b"LIST", b"UIDL", b"RETR", b"TOP", b"DELE", b"NOOP", b"RSET",
    b"LAST", b"QUIT", b"CAPA", b"AUTH", b"APOP", b"STLS", b"1", b"0", b"-1", b"x", b"99", b"",
    b"\xff", b"PLAIN", b"alice",
]  # fmt: skip


@settings(deadline=None)  # the profile's count: 60 under CI, 1000 in `make test-slow`
@given(
    st.lists(
        st.lists(
            st.sampled_from(POP3_TOKENS),
            min_size=1,
            max_size=4,
        ).map(b" ".join),
        min_size=1,
        max_size=10,
    ),
    st.booleans(),
)
def test_pop3_fuzzed_commands_never_traceback(
    tmp_path_factory: Any, commands: list[bytes], logged_in: bool
) -> None:
    """Random POP3 command lines, before and after login: replies, never a traceback."""
    mail = fuzz_mail(tmp_path_factory, "pop3")
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event or "failure" in event or event.get("isError"):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        p, _ = pop3(mail, logged_in)
        p.dataReceived(b"".join(c + b"\r\n" for c in commands))
        mail.pump()
        p.connectionLost(Failure(ConnectionError("done")))
        gc.collect(0)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not seen, [e.get("log_format") or e.get("why") for e in seen]
    assert "pop3.server_error" not in mail.errors.counts, mail.errors.counts


def test_server_error_tracebacks_rate_limited(failures: list[dict[str, Any]]) -> None:
    """A server error's traceback is logged once a minute per protocol and type; all counted."""
    now = [0.0]
    errors = ClientErrors(lambda: now[0])
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        boom = Failure()
    for _ in range(100):
        errors.server("imap", boom, "FETCH")
    errors.server("pop3", boom, "RETR")
    assert len(failures) == 2
    now[0] = 61.0
    errors.server("imap", boom, "FETCH")
    assert len(failures) == 3
    assert errors.status() == {"imap.server_error": 101, "pop3.server_error": 1}
    failures.clear()  # these were expected


@pytest.mark.parametrize(
    ("command", "method"),
    [(b"a LIST \"\" *\r\n", "list_mailboxes"), (b"a LSUB \"\" *\r\n", "list_mailboxes"),
     (b"a STATUS INBOX (MESSAGES)\r\n", "status"), (b"a COPY 1 INBOX\r\n", "copy")],
)  # fmt: skip
def test_imap_answer_after_the_client_left_is_dropped(
    mail: Mail, failures: list[dict[str, Any]], command: bytes, method: str
) -> None:
    """LIST/LSUB/STATUS/COPY whose backend call ends after the client left: no traceback."""
    p, t = mail.imap()
    if command.startswith(b"a COPY"):
        p.dataReceived(b"s SELECT INBOX\r\n")
        mail.pump()
        assert b"s OK" in t.value()
    account = p.runner.mailbox if method == "copy" else p.runner.session
    held: list[Deferred[Any]] = []
    real = getattr(account, method)

    def slow(*a: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        held.append(d)
        d.addCallback(lambda _: real(*a))
        return d

    setattr(account, method, slow)
    t.clear()
    p.dataReceived(command)
    assert held and t.value() == b""
    p.connectionLost(Failure(ConnectionError("gone")))
    held.pop().callback(None)
    mail.pump()
    assert t.value() == b""
    assert not failures


def test_imap_close_finishing_after_the_client_left(
    mail: Mail, failures: list[dict[str, Any]]
) -> None:
    """A CLOSE whose expunge ends after the client left answers nothing, logs nothing."""
    p, t = mail.imap()
    assert tagged(send(mail, p, t, b"s SELECT INBOX"), b"s").startswith(b"OK")
    held: list[Deferred[Any]] = []

    def slow(*a: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        held.append(d)
        return d

    p.runner.mailbox.expunge = slow
    t.clear()
    p.dataReceived(b"c CLOSE\r\n")
    assert held and t.value() == b""
    p.connectionLost(Failure(ConnectionError("gone")))
    held.pop().callback([])
    mail.pump()
    assert t.value() == b""
    assert not failures


class PausingTransport(FileDescriptor):
    """A FileDescriptor whose socket takes ``room`` bytes: the real buffer-full and
    drain logic (producer paused over 64 KiB, resumed when drained, then closed)."""

    room = 0

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        self.connected = 1
        self.sent = 0

    def writeSomeData(self, data: bytes) -> int:
        n = min(len(data), self.room)
        self.room -= n
        self.sent += n
        return n

    def getPeer(self) -> Any:
        return IPv4Address("TCP", "10.9.9.9", 9)

    def getHost(self) -> Any:
        return IPv4Address("TCP", "10.9.9.1", 110)

    def startReading(self) -> None:
        pass

    def stopReading(self) -> None:
        pass


@pytest.mark.parametrize("kind", ["pop3", "imap"])
def test_close_while_output_is_paused_really_closes(mail: Mail, kind: str) -> None:
    """loseConnection while the client was not reading: once the output drains the
    connection closes (it used to stay open forever, reading stopped: CLOSE-WAIT)."""
    reactor = MemoryReactorClock()
    proto: Any = MailPOP3(reactor) if kind == "pop3" else mail.factory().buildProtocol(None)
    producer = proto if kind == "pop3" else proto._gate
    transport = PausingTransport(reactor)
    proto.makeConnection(transport)
    assert transport.producer is producer
    transport.write(b"x" * (transport.bufferSize + 1))  # the client does not read
    assert transport.producerPaused and producer.paused
    if kind == "pop3":
        transport.loseConnection()  # e.g. QUIT, or too much input
    else:
        proto._close()  # how the IMAP shell closes (LOGOUT, BYE, the throttle)
    transport.room = 1 << 20  # the client reads again
    results = []
    while transport in reactor.getWriters() and len(results) < 5:  # as the reactor would
        results.append(transport.doWrite())
    assert results and isinstance(results[-1], ConnectionDone), results


def test_refresh_of_an_open_mailbox_with_a_holder_away_logs_no_traceback(
    mail: Mail, failures: list[dict[str, Any]]
) -> None:
    """An IDLE refresh failing because a node is out of reach is one warning, not a
    traceback (the fuzzer's overload run logged 'IMAP refresh failed' tracebacks);
    a real bug still is."""
    from yimaporc.cluster.rpc import PeerUnavailable

    p, t = mail.imap()
    send(mail, p, t, b"s SELECT INBOX", b"i IDLE")
    mail.manager.digests = lambda *a: fail(PeerUnavailable("n2 is not reachable"))
    mail.registry.changed(ALICE, INBOX)
    assert failures == []
    mail.manager.digests = lambda *a: fail(ZeroDivisionError())
    mail.registry.changed(ALICE, INBOX)
    assert len(failures) == 1
    failures.clear()
    p.connectionLost(Failure(ConnectionError("gone")))


def test_peer_unavailable_is_counted_without_a_traceback(failures: list[dict[str, Any]]) -> None:
    """A command failing because a cluster peer is out of reach is counted as
    ``<proto>.peer_unavailable``, never logged as a failure (issue 14)."""
    from yimaporc.cluster.rpc import PeerUnavailable

    errors = ClientErrors(lambda: 0.0)
    down = Failure(PeerUnavailable("10.0.0.3:7946: Connection refused"))
    for _ in range(3):
        errors.server("imap", down, "STATUS")
    errors.server("pop3", down, "TOP")
    assert failures == []
    assert errors.status() == {"imap.peer_unavailable": 3, "pop3.peer_unavailable": 1}
