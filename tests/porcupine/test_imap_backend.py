"""Porcupine's IMAP backend (``porcupine.imap_backend``): the backend contract over a real
``UserMail`` on one node, and the ``yimaporc.imap`` shell over it, all synchronous."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
from mailtest_helpers import ImmediateReactor, SyncPool, fast_hash, result_of
from twisted.internet.testing import StringTransport

from yimaporc.porcupine.imap_backend import PorcupineImapBackend
from yimaporc.porcupine.imap_server import PorcupineImapFactory
from yimaporc.porcupine.service import MailService
from yimaporc.porcupine.throttle import ThrottlePolicy
from yimaporc.porcupine.values import INBOX
from yimaporc.testing.certs import make_cert

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "imap"))
from test_imap_backend_contract import ImapBackendContract

MSG1 = b"From: Bob <bob@example.org>\r\nSubject: one\r\n\r\nhello world\r\n"
UTF8 = (
    "From: Jörg Müller <jorg@example.org>\r\nTo: alice@example.org\r\n"
    "Subject: Grüße aus Köln\r\n\r\nhallo\r\n"
).encode()


def make_service(tmp_path: Path, **kw: Any) -> MailService:
    """A MailService running synchronously, alice@example.org/pw created."""
    svc = MailService(
        ImmediateReactor(),
        node_id="n1",
        data_dir=tmp_path,
        domain="example.org",
        auth_throttle=ThrottlePolicy(delay=0.0, max_delay=0.0),
        **{"threadpool": SyncPool(), **kw},
    )
    svc.profiles._hash = fast_hash  # type: ignore[method-assign]
    result_of(svc.replicator.add("alice@example.org", "pw", 1))
    return svc


def deliver(svc: MailService, raw: bytes, user: str = "alice@example.org") -> None:
    result_of(svc.delivery.deliver([user], raw))


class TestPorcupineBackendContract(ImapBackendContract):
    """The Porcupine backend keeps the IImapBackend contract over a real UserMail."""

    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.n = 0

    def make(self) -> Any:
        self.n += 1
        svc = make_service(self.tmp / str(self.n))
        factory = svc.factories["imap"]
        assert isinstance(factory, PorcupineImapFactory)
        p = factory.buildProtocol(None)
        backend = p.runner.backend
        assert isinstance(backend, PorcupineImapBackend)
        backend.svc = svc  # type: ignore[attr-defined]
        # ``alice`` is alice@example.org (the node's domain)
        return backend

    def deliver(self, backend: Any, raw: bytes) -> None:
        deliver(backend.svc, raw)


class Client:
    """One connection to the service's IMAP factory over a StringTransport."""

    def __init__(self, svc: MailService, name: str = "imap") -> None:
        self.proto = svc.factories[name].buildProtocol(None)
        assert self.proto is not None
        self.t = StringTransport()
        self.proto.makeConnection(self.t)
        self.greeting = self.take()

    def take(self) -> bytes:
        out: bytes = self.t.value()
        self.t.clear()
        return out

    def run(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        return self.take()


def tagged(out: bytes) -> list[tuple[bytes, bytes]]:
    """(tag, status) of the tagged responses, in order."""
    return re.findall(rb"^([A-Za-z0-9]+) (OK|NO|BAD)", out, re.M)


def test_capabilities_and_special_use(tmp_path: Path) -> None:
    """CONDSTORE and QRESYNC advertised (the store keeps MODSEQs); a new user gets the
    five special-use mailboxes with their attributes."""
    svc = make_service(tmp_path)
    c = Client(svc)
    assert b"UIDPLUS" in c.greeting and b"CONDSTORE QRESYNC" in c.greeting
    assert b"AUTH=PLAIN" in c.greeting
    out = c.run(b'a LOGIN alice pw\r\nb LIST "" "*"\r\n')
    assert tagged(out) == [(b"a", b"OK"), (b"b", b"OK")]
    for name, attr in (("Sent", "Sent"), ("Drafts", "Drafts"), ("Trash", "Trash"),
                       ("Junk", "Junk"), ("Archive", "Archive")):  # fmt: skip
        assert re.search(rb"\* LIST \([^)]*\\" + attr.encode() + rb"[^)]*\) \"/\" \"?" + name.encode(), out)  # fmt: skip


class HoldingPool(SyncPool):
    """SyncPool that holds jobs while ``hold`` is set, counting them by function name."""

    def __init__(self) -> None:
        self.hold = False
        self.held: list[Any] = []
        self.names: list[str] = []

    def callInThreadWithCallback(self, on_result: Any, f: Any, *a: Any, **kw: Any) -> None:
        self.names.append(getattr(f, "__name__", ""))
        if self.hold:
            self.held.append((on_result, f, a, kw))
        else:
            super().callInThreadWithCallback(on_result, f, *a, **kw)

    def drain(self) -> None:
        """Run the held jobs a round at a time (jobs they start wait for the next round,
        as concurrent logins' jobs interleave on a real pool), until none is left."""
        while self.held:
            held, self.held = self.held, []
            for on_result, f, a, kw in held:
                super().callInThreadWithCallback(on_result, f, *a, **kw)
        self.hold = False


def test_concurrent_first_logins_create_the_special_use_mailboxes_once(
    tmp_path: Path,
) -> None:
    """Three connections of a new user logging in at once: the five special-use mailboxes
    are created once (five create jobs, no MailboxExists warning), every login is OK and
    sees them; a later login creates nothing."""
    pool = HoldingPool()
    svc = make_service(tmp_path, threadpool=pool)
    clients = [Client(svc) for _ in range(3)]
    pool.hold = True
    pool.names.clear()
    for i, c in enumerate(clients):
        c.proto.dataReceived(b"a%d LOGIN alice pw\r\n" % i)
    pool.drain()
    outs = [c.take() for c in clients]
    assert [tagged(o) for o in outs] == [[(b"a%d" % i, b"OK")] for i in range(3)]
    assert pool.names.count("create_mailbox") == 5
    listing = clients[2].run(b'b LIST "" "*"\r\n')
    assert all(n.encode() in listing for n in ("Sent", "Drafts", "Trash", "Junk", "Archive"))
    assert svc.registry.autocreating == {}
    pool.names.clear()
    assert tagged(Client(svc).run(b"c LOGIN alice pw\r\n")) == [(b"c", b"OK")]
    assert "create_mailbox" not in pool.names


def test_special_use_check_is_remembered_until_a_delete_or_the_ttl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a login found the special-use mailboxes, the next logins on the node do not
    read the mailbox tree for them; a DELETE through the node, or SPECIAL_USE_TTL seconds,
    makes the next login check (and re-create) again."""
    from yimaporc.porcupine import imap_backend
    from yimaporc.porcupine.retrieval import UserMail

    svc = make_service(tmp_path)
    reads: list[str] = []
    real = UserMail.mailboxes

    def counted(self: UserMail) -> Any:
        reads.append(self.address)
        return real(self)

    monkeypatch.setattr(UserMail, "mailboxes", counted)

    def login(tag: bytes, then: bytes = b"") -> bytes:
        return Client(svc).run(b"%s LOGIN alice pw\r\n%s" % (tag, then))

    assert tagged(login(b"a")) == [(b"a", b"OK")] and len(reads) == 1
    assert tagged(login(b"b")) == [(b"b", b"OK")] and len(reads) == 1
    out = login(b"c", b"d DELETE Sent\r\n")
    assert tagged(out) == [(b"c", b"OK"), (b"d", b"OK")]
    reads.clear()
    out = login(b"e", b'f LIST "" "Sent"\r\n')
    assert tagged(out) == [(b"e", b"OK"), (b"f", b"OK")] and b"Sent" in out and reads
    reads.clear()
    login(b"g")
    assert reads == []
    svc.reactor.advance(imap_backend.SPECIAL_USE_TTL)
    login(b"h")
    assert len(reads) == 1


def test_a_failing_special_use_check_holds_no_later_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If reading the tree for the special-use mailboxes raises, the login still
    answers OK (best effort, logged) and the user's next login is not left waiting."""
    from yimaporc.porcupine.retrieval import UserMail

    svc = make_service(tmp_path)
    real = UserMail.mailboxes
    calls: list[int] = []

    def broken_once(self: UserMail) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        return real(self)

    monkeypatch.setattr(UserMail, "mailboxes", broken_once)
    assert tagged(Client(svc).run(b"a LOGIN alice pw\r\n")) == [(b"a", b"OK")]
    assert svc.registry.autocreating == {}
    out = Client(svc).run(b'b LOGIN alice pw\r\nc LIST "" "Sent"\r\n')
    assert tagged(out) == [(b"b", b"OK"), (b"c", b"OK")] and b"Sent" in out


def test_login_failure_codes(tmp_path: Path) -> None:
    """A wrong password is NO [AUTHENTICATIONFAILED]; after the connection's failures
    the throttle answers NO [UNAVAILABLE]."""
    svc = make_service(tmp_path)
    svc.throttle.policy = ThrottlePolicy(delay=0.0, max_delay=0.0, pair_failures=1)
    c = Client(svc)
    assert b"a NO [AUTHENTICATIONFAILED]" in c.run(b"a LOGIN alice wrong\r\n")
    c2 = Client(svc)
    assert b"b NO [UNAVAILABLE]" in c2.run(b"b LOGIN alice wrong\r\n")


def test_append_crlf_uidplus_and_errors(tmp_path: Path) -> None:
    """APPEND stores CRLF (RFC822.SIZE matches the octets sent), answers APPENDUID with
    the real UID; COPY answers COPYUID; missing mailboxes give TRYCREATE/NONEXISTENT,
    an existing one ALREADYEXISTS."""
    svc = make_service(tmp_path)
    c = Client(svc)
    c.run(b"a LOGIN alice pw\r\n")
    msg = b"Subject: lf\n\nbody\n"
    out = c.run(b"b APPEND INBOX {%d+}\r\n%s\r\n" % (len(msg), msg))
    m = re.search(rb"b OK \[APPENDUID (\d+) (\d+)\]", out)
    assert m, out
    uid = int(m.group(2))
    out = c.run(b"c SELECT INBOX\r\nd UID FETCH %d (RFC822.SIZE BODY.PEEK[])\r\n" % uid)
    assert b"RFC822.SIZE 21" in out and b"Subject: lf\r\n\r\nbody\r\n" in out
    assert b"[UIDVALIDITY " + m.group(1) + b"]" in out
    out = c.run(b"e UID COPY %d Archive\r\n" % uid)
    assert re.search(rb"e OK \[COPYUID \d+ %d \d+\]" % uid, out), out
    out = c.run(b"f APPEND Nope {1+}\r\nx\r\ng COPY 1 Nope\r\nh SELECT Nope\r\ni CREATE Sent\r\n")
    assert b"f NO [TRYCREATE]" in out and b"g NO [TRYCREATE]" in out
    assert b"h NO [NONEXISTENT]" in out and b"i NO [ALREADYEXISTS]" in out


def test_fetch_envelope_of_raw_utf8_header(tmp_path: Path) -> None:
    """FETCH ENVELOPE of a message with a raw UTF-8 header answers (as a literal), and
    the connection stays usable (it used to drop it)."""
    svc = make_service(tmp_path)
    deliver(svc, UTF8)
    c = Client(svc)
    out = c.run(b"a LOGIN alice pw\r\nb SELECT INBOX\r\nc FETCH 1 (ENVELOPE BODYSTRUCTURE)\r\n")
    assert tagged(out)[-1] == (b"c", b"OK")
    assert "Grüße aus Köln".encode() in out
    assert tagged(c.run(b"d NOOP\r\n")) == [(b"d", b"OK")]


def test_two_sessions_see_each_others_changes(tmp_path: Path) -> None:
    """Flags and expunges of one session reach another on NOOP; during IDLE a flag
    change, an expunge and new mail are announced at once."""
    svc = make_service(tmp_path)
    deliver(svc, MSG1)
    deliver(svc, b"Subject: two\r\n\r\nx\r\n")
    one, two = Client(svc), Client(svc)
    for cl in (one, two):
        cl.run(b"a LOGIN alice pw\r\nb SELECT INBOX\r\n")
    one.run(b"c STORE 1 +FLAGS (\\Flagged)\r\n")
    assert b"* 1 FETCH (FLAGS (\\Flagged) UID 1)" in two.run(b"c NOOP\r\n")
    assert two.run(b"d IDLE\r\n").startswith(b"+ ")
    one.run(b"e STORE 2 +FLAGS (\\Deleted)\r\nf EXPUNGE\r\n")
    got = two.take()
    assert b"* 2 EXPUNGE" in got, got
    deliver(svc, b"Subject: new\r\n\r\nx\r\n")
    assert b"* 2 EXISTS" in two.take()
    assert tagged(two.run(b"DONE\r\n")) == [(b"d", b"OK")]
    assert svc.status()["imap_open_mailboxes"] == 2


def test_search_loads_what_it_needs(tmp_path: Path) -> None:
    """SEARCH runs the imap._search evaluator: OR/NOT/UID sets, body text, a literal
    term; an APPEND is searchable by the next command."""
    svc = make_service(tmp_path)
    deliver(svc, MSG1)
    c = Client(svc)
    c.run(b"a LOGIN alice pw\r\nb SELECT INBOX\r\n")
    msg = b"Subject: fresh\r\n\r\nneedle\r\n"
    c.run(b"c APPEND INBOX {%d+}\r\n%s\r\n" % (len(msg), msg))
    out = c.run(b"d SEARCH CHARSET UTF-8 BODY {6+}\r\nneedle\r\n")
    assert b"* SEARCH 2\r\n" in out
    out = c.run(b"e SEARCH OR SUBJECT one NOT UID 1:2\r\nf UID SEARCH TEXT hello\r\n")
    assert b"* SEARCH 1\r\n" in out and tagged(out) == [(b"e", b"OK"), (b"f", b"OK")]
    assert b"g BAD" in c.run(b"g SEARCH FROBNICATE\r\n")


def test_move_and_status(tmp_path: Path) -> None:
    """MOVE answers COPYUID and EXPUNGE; STATUS counts from the digests."""
    svc = make_service(tmp_path)
    deliver(svc, MSG1)
    c = Client(svc)
    out = c.run(b"a LOGIN alice pw\r\nb SELECT INBOX\r\nc MOVE 1 Trash\r\n")
    assert b"COPYUID" in out and b"* 1 EXPUNGE" in out
    out = c.run(b"d STATUS Trash (MESSAGES UNSEEN UIDNEXT)\r\n")
    assert b"* STATUS Trash (MESSAGES 1 UNSEEN 1 UIDNEXT 2)" in out
    mail = svc.retrieval.open("alice@example.org")
    assert result_of(mail.digests(INBOX)) == []


def test_starttls_required_with_a_certificate(tmp_path: Path) -> None:
    """With a certificate: LOGINDISABLED before STARTTLS, LOGIN answered PRIVACYREQUIRED;
    --allow-plaintext-auth offers AUTH=PLAIN at once."""
    cert, key = make_cert(tmp_path)
    svc = make_service(tmp_path / "a", tls_cert=cert, tls_key=key)
    c = Client(svc)
    assert b"LOGINDISABLED" in c.greeting and b"STARTTLS" in c.greeting
    assert b"a NO [PRIVACYREQUIRED]" in c.run(b"a LOGIN alice pw\r\n")
    svc2 = make_service(tmp_path / "b", tls_cert=cert, tls_key=key, allow_plaintext_auth=True)
    c2 = Client(svc2)
    assert b"AUTH=PLAIN" in c2.greeting
    assert tagged(c2.run(b"a LOGIN alice pw\r\n")) == [(b"a", b"OK")]


def test_authenticate_plain_with_and_without_initial_response(tmp_path: Path) -> None:
    """AUTHENTICATE PLAIN logs in through the portal with SASL-IR and after a '+';
    a wrong password is NO [AUTHENTICATIONFAILED]."""
    import base64

    svc = make_service(tmp_path)
    good = base64.b64encode(b"\x00alice\x00pw")
    bad = base64.b64encode(b"\x00alice\x00nope")
    c = Client(svc)
    assert b"a NO [AUTHENTICATIONFAILED]" in c.run(b"a AUTHENTICATE PLAIN " + bad + b"\r\n")
    assert tagged(c.run(b"b AUTHENTICATE PLAIN " + good + b"\r\n")) == [(b"b", b"OK")]
    c2 = Client(svc)
    assert c2.run(b"a AUTHENTICATE PLAIN\r\n").startswith(b"+")
    assert tagged(c2.run(good + b"\r\n")) == [(b"a", b"OK")]


def test_mail_out_of_reach_is_unavailable(tmp_path: Path) -> None:
    """A holder of the mailbox out of reach: SELECT and STATUS answer NO [UNAVAILABLE]
    (never a smaller mailbox), a selected session's NOOP keeps its view, and the
    session works again once the holder answers."""
    from twisted.internet.defer import fail

    from yimaporc.cluster.rpc import PeerUnavailable

    svc = make_service(tmp_path)
    deliver(svc, MSG1)
    c = Client(svc)
    c.run(b"a LOGIN alice pw\r\nb SELECT INBOX\r\n")
    real = svc.mailbox_manager.digests
    svc.mailbox_manager.digests = lambda *a: fail(PeerUnavailable("n2: timed out"))  # type: ignore[method-assign]
    out = c.run(b"c NOOP\r\nd STATUS INBOX (MESSAGES)\r\ne SELECT INBOX\r\n")
    assert tagged(out) == [(b"c", b"OK"), (b"d", b"NO"), (b"e", b"NO")], out
    assert b"EXPUNGE" not in out and b"d NO [UNAVAILABLE]" in out and b"e NO [UNAVAILABLE]" in out
    svc.mailbox_manager.digests = real  # type: ignore[method-assign]
    out = c.run(b"f SELECT INBOX\r\n")
    assert b"* 1 EXISTS" in out and tagged(out) == [(b"f", b"OK")]


def test_sessions_and_commands_counted(tmp_path: Path) -> None:
    """Sessions opened/closed and commands are reported to ClientErrors' activity hooks
    (the ``mail_sessions`` status figures) when it has them."""
    from collections import Counter

    from yimaporc.porcupine._guard import ClientErrors

    class Recording(ClientErrors):
        def __init__(self) -> None:
            super().__init__(lambda: 0.0)
            self.seen: Counter[str] = Counter()

        def opened(self, proto: str) -> None:
            self.seen[f"{proto}.opened"] += 1

        def closed(self, proto: str) -> None:
            self.seen[f"{proto}.closed"] += 1

        def command(self, proto: str) -> None:
            self.seen[f"{proto}.command"] += 1

    svc = make_service(tmp_path)
    shared = svc.factories["imap"].backend  # type: ignore[attr-defined]
    errors = Recording()
    factory = PorcupineImapFactory(shared, svc._portal_for, errors, svc.reactor)
    p = factory.buildProtocol(None)
    t = StringTransport()
    p.makeConnection(t)
    p.dataReceived(b"a LOGIN alice pw\r\nb NOOP\r\nc LOGOUT\r\n")
    p.connectionLost()
    p.connectionLost()  # twice: counted once
    assert errors.seen == {"imap.opened": 1, "imap.command": 3, "imap.closed": 1}


def test_multiappend_is_all_or_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logged_failures: Any
) -> None:
    """MULTIAPPEND is advertised; a store failing on the second of three messages leaves
    none stored (one transaction); without the fault all three are stored, answered with
    APPENDUID of three UIDs, and a selected session sees them arrive together."""
    import sqlite3

    from yimaporc.porcupine.fragments import FragmentStore

    svc = make_service(tmp_path)
    c, watcher = Client(svc), Client(svc)
    assert b"MULTIAPPEND" in c.greeting
    c.run(b"a LOGIN alice pw\r\n")
    watcher.run(b"w LOGIN alice pw\r\nx SELECT INBOX\r\n")
    msgs = [b"Subject: m%d\r\n\r\nbody %d\r\n" % (i, i) for i in range(3)]
    cmd = b"b APPEND INBOX" + b"".join(b" {%d+}\r\n%s" % (len(m), m) for m in msgs) + b"\r\n"
    real = FragmentStore._insert_message
    calls = []

    def flaky(self: FragmentStore, db: Any, m: Any, key: str) -> Any:
        calls.append(m)
        if len(calls) == 2:
            raise sqlite3.OperationalError("disk I/O error")
        return real(self, db, m, key)

    monkeypatch.setattr(FragmentStore, "_insert_message", flaky)
    out = c.run(cmd)
    assert b"b NO" in out and len(calls) == 2
    assert len(logged_failures.take(sqlite3.OperationalError)) == 1
    assert b"* STATUS INBOX (MESSAGES 0)" in c.run(b"c STATUS INBOX (MESSAGES)\r\n")
    monkeypatch.setattr(FragmentStore, "_insert_message", real)
    out = c.run(cmd.replace(b"b APPEND", b"d APPEND"))
    m = re.search(rb"d OK \[APPENDUID \d+ (\d+):(\d+)\]", out)
    assert m and int(m.group(2)) - int(m.group(1)) == 2, out
    out = watcher.run(b"y NOOP\r\n")
    assert b"* 3 EXISTS" in out and b"* 1 EXISTS" not in out and b"* 2 EXISTS" not in out
    out = c.run(b"e SELECT INBOX\r\nf FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n")
    assert [int(x) for x in re.findall(rb"Subject: m(\d)", out)] == [0, 1, 2]


def test_searchres_over_the_porcupine_search(tmp_path: Path) -> None:
    """SEARCHRES is advertised; $ saved by SEARCH RETURN (SAVE) reaches Porcupine's search
    evaluator as UIDs (SEARCH $, NOT $) and FETCH $ names the same messages."""
    svc = make_service(tmp_path)
    for i in range(4):
        deliver(svc, b"Subject: %s\r\n\r\nx\r\n" % (b"hit" if i % 2 else b"miss"))
    c = Client(svc)
    assert b"SEARCHRES" in c.greeting
    c.run(b"a LOGIN alice pw\r\nb SELECT INBOX\r\n")
    assert c.run(b"c SEARCH RETURN (SAVE) SUBJECT hit\r\n") == b"c OK SEARCH completed\r\n"
    out = c.run(
        b"d SEARCH $\r\ne SEARCH NOT $\r\nf FETCH $ (BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n"
    )
    assert b"* SEARCH 2 4\r\nd OK" in out and b"* SEARCH 1 3\r\ne OK" in out
    assert out.count(b"Subject: hit") == 2 and b"miss" not in out


def test_utf8_accept_names_over_porcupine(tmp_path: Path) -> None:
    """After ENABLE UTF8=ACCEPT a Unicode CREATE is stored in modified UTF-7 (what a
    session without it lists), listed and selected back in Unicode."""
    svc = make_service(tmp_path)
    c, plain = Client(svc), Client(svc)
    assert b"UTF8=ACCEPT" in c.greeting
    c.run(b"a LOGIN alice pw\r\nb ENABLE UTF8=ACCEPT\r\n")
    plain.run(b"p LOGIN alice pw\r\n")
    name = "Büro".encode()
    assert b"c OK" in c.run(b'c CREATE "%s"\r\n' % name)
    assert b'"B&APw-ro"' in plain.run(b'q LIST "" "B*"\r\n')
    out = c.run(b'd LIST "" "B*"\r\ne SELECT "%s"\r\n' % name)
    assert b"{5}\r\n" + name in out and b"e OK" in out


def test_binary_append_keeps_octets_plain_append_gets_crlf(tmp_path: Path) -> None:
    """BINARY is advertised: a ``~{n}`` literal8 APPEND is stored octet for octet (NUL,
    bare LF and CR kept; RFC822.SIZE is its length), a plain literal with bare LF line
    ends is stored with CRLF ones (what a client reads is what sizes count)."""
    svc = make_service(tmp_path)
    c = Client(svc)
    assert b" BINARY " in c.greeting
    raw = b"Subject: bin\r\nContent-Transfer-Encoding: binary\r\n\r\n\x00\x01\nx\ry\r\n"
    lf = b"Subject: lf\n\nline\n"
    out = c.run(
        b"a LOGIN alice pw\r\nb APPEND INBOX ~{%d}\r\n%s\r\nc APPEND INBOX {%d+}\r\n%s\r\n"
        % (len(raw), raw, len(lf), lf)
    )
    assert [s for _, s in tagged(out)] == [b"OK", b"OK", b"OK"], out
    out = c.run(b"d SELECT INBOX\r\ne FETCH 1:2 (RFC822.SIZE BODY.PEEK[])\r\n")
    assert b"RFC822.SIZE %d BODY[] {%d}\r\n%s)" % (len(raw), len(raw), raw) in out
    crlf = lf.replace(b"\n", b"\r\n")
    assert b"RFC822.SIZE %d BODY[] {%d}\r\n%s)" % (len(crlf), len(crlf), crlf) in out
    out = c.run(b"f FETCH 1 (BINARY.PEEK[1])\r\n")
    assert b"~{8}\r\n\x00\x01\nx\ry\r\n" in out, out


def test_copy_and_append_wait_while_the_mailbox_look_up_is_out_of_reach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user's manager paused: the look-up before COPY/APPEND fails (a read, safe
    to redo, even after a timeout); both commands are tried again every RESERVE_RETRY
    s instead of NO [UNAVAILABLE] (mbsync takes a NO to APPEND as final), and answer
    once the look-up works; the waits are counted."""
    from twisted.internet.defer import fail
    from twisted.internet.task import Clock

    from yimaporc.cluster.rpc import PeerMaybeDone
    from yimaporc.porcupine.retrieval import UserMail
    from yimaporc.porcupine.retrieval._usermail import RESERVE_RETRY

    clock = Clock()
    real_init, real_boxes = UserMail.__init__, UserMail.mailboxes
    out_of_reach = [0]

    def init(self: UserMail, *a: Any, **kw: Any) -> None:
        real_init(self, *a, **kw)
        self.clock = clock

    def boxes(self: UserMail) -> Any:
        if out_of_reach[0]:
            out_of_reach[0] -= 1
            return fail(PeerMaybeDone("n2: no answer in 10 s"))
        return real_boxes(self)

    monkeypatch.setattr(UserMail, "__init__", init)
    monkeypatch.setattr(UserMail, "mailboxes", boxes)
    svc = make_service(tmp_path)
    deliver(svc, MSG1)
    c = Client(svc)
    c.run(b"a LOGIN alice pw\r\nb CREATE Archive\r\nc SELECT INBOX\r\n")
    out_of_reach[0] = 2
    assert tagged(c.run(b"d COPY 1 Archive\r\n")) == []
    clock.advance(RESERVE_RETRY)
    assert tagged(c.take()) == []
    clock.advance(RESERVE_RETRY)
    out = c.take()
    assert tagged(out) == [(b"d", b"OK")] and b"COPYUID" in out, out
    out_of_reach[0] = 1
    assert tagged(c.run(b"e APPEND Archive {11}\r\n")) == []
    assert tagged(c.run(b"hello world\r\n")) == []
    clock.advance(RESERVE_RETRY)
    out = c.take()
    assert tagged(out) == [(b"e", b"OK")] and b"APPENDUID" in out, out
    assert svc.retrieval.counts["append_waits"] == 3
    out = c.run(b"f STATUS Archive (MESSAGES)\r\n")
    assert b"MESSAGES 2" in out
