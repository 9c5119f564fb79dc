"""The outbound queue: retries with backoff, bounces (RFC 3464), routing, durable state."""

from __future__ import annotations

import email
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mailtest_helpers import SyncPool
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.mail import smtp
from twisted.names import dns
from twisted.names import error as dnsError
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from yimaporc.porcupine.outbound import (
    Entry,
    OutboundSender,
    Outcome,
    RetryPolicy,
    Routes,
    make_bounce,
    parse_hostport,
    settle,
)
from yimaporc.testing.pytest_plugin import LoggedFailures

T0 = 1_700_000_000.0


def entry(*rcpts: str, attempts: int = 0) -> Entry:
    """A queued message from alice@example.org."""
    return Entry("m1", "alice@example.org", rcpts, T0, attempts)


def test_settle_splits_delivered_failed_and_waiting() -> None:
    """2xx recipients are done, 5xx bounce, 4xx wait for the first backoff step."""
    e = entry("a@x.net", "b@x.net", "c@y.net")
    got = settle(
        e,
        {"a@x.net": Outcome(250, "ok"), "b@x.net": Outcome(550, "5.1.1 no"),
         "c@y.net": Outcome(451, "4.3.0 busy")},
        T0 + 10,
        RetryPolicy(),
    )  # fmt: skip
    assert got.delivered == ("a@x.net",)
    assert got.bounce == (("b@x.net", Outcome(550, "5.1.1 no")),)
    assert got.entry is not None and got.entry.recipients == ("c@y.net",)
    assert got.entry.attempts == 1 and got.entry.next_attempt == T0 + 10 + 60
    assert got.entry.last_error == "451 4.3.0 busy"


def test_backoff_grows_then_stays_and_expiry_bounces_with_4_4_7() -> None:
    """Delays follow the schedule, repeat its last step, and a message past expiry bounces."""
    policy = RetryPolicy(backoff=(60, 300, 900), expire=3600)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 9)] == [60, 300, 900, 900, 900]
    late = settle(
        entry("a@x.net", attempts=5), {"a@x.net": Outcome(421, "down")}, T0 + 3600, policy
    )
    assert late.entry is None
    ((rcpt, outcome),) = late.bounce
    assert rcpt == "a@x.net" and outcome.text.startswith("4.4.7 delivery time expired")


def test_bounce_is_a_delivery_status_notification() -> None:
    """The DSN is multipart/report with a delivery-status part per recipient and the headers."""
    e = entry("bob@x.net")
    original = b"Subject: hello\r\nFrom: alice@example.org\r\n\r\nsecret body\r\n"
    raw = make_bounce("n1.example.org", e, [("bob@x.net", Outcome(550, "5.1.1 no such user"))],
                      original, T0)  # fmt: skip
    msg = email.message_from_bytes(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == "<alice@example.org>" and msg["Auto-Submitted"] == "auto-replied"
    parts = [p.get_content_type() for p in msg.get_payload()]
    assert parts == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    whole = raw.decode()
    assert "Final-Recipient: rfc822; bob@x.net" in whole and "Status: 5.1.1" in whole
    assert "Action: failed" in whole and "Reporting-MTA: dns; n1.example.org" in whole
    assert "Subject: hello" in whole and "secret body" not in whole


def test_parse_hostport() -> None:
    """HOST:PORT, a bare host (port 25) and [v6]:PORT parse; junk is refused."""
    assert parse_hostport("mx.example.net:2525") == ("mx.example.net", 2525)
    assert parse_hostport("mx.example.net") == ("mx.example.net", 25)
    assert parse_hostport("[::1]:26") == ("::1", 26)
    for bad in ("", ":25", "h:0", "h:x", "h:99999"):
        with pytest.raises(ValueError):
            parse_hostport(bad)


# --- the shell, on a memory reactor, against an in-memory twisted.mail server --------


class Reactor(MemoryReactorClock):
    """A memory reactor whose thread hand-offs run at once."""

    def callFromThread(self, f: Callable[..., Any], *a: Any, **kw: Any) -> None:
        f(*a, **kw)


@implementer(smtp.IMessageDelivery)
class RemoteMX:
    """A remote MX: refuses the addresses in ``codes`` with their code, stores the rest."""

    def __init__(self, codes: dict[str, int] | None = None) -> None:
        self.codes = codes or {}
        self.got: list[tuple[str, bytes]] = []

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> bytes:
        return b"Received: by remote"

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: smtp.User) -> Callable[[], Any]:
        address = str(user.dest)
        if address in self.codes:
            raise smtp.SMTPBadRcpt(user, self.codes[address])
        mx = self

        @implementer(smtp.IMessage)
        class Message:
            lines: list[bytes] = []

            def lineReceived(self, line: bytes) -> None:
                self.lines.append(line)

            def eomReceived(self) -> Deferred[bytes]:
                mx.got.append((address, b"\n".join(self.lines)))
                return succeed(b"ok")

            def connectionLost(self) -> None:
                pass

        return Message


def spool(root: Path, ident: str, sender: str, rcpts: list[str], body: bytes) -> None:
    """A message as OutboundSpool writes it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{ident}.eml").write_bytes(body)
    (root / f"{ident}.json").write_text(json.dumps({"from": sender, "to": rcpts}))


def sender_for(
    tmp_path: Path, routes: Routes, resolver: Any = None
) -> tuple[Reactor, OutboundSender, list[tuple[str, bytes]]]:
    """A started sender over ``tmp_path/outbound``; the list collects its bounces."""
    reactor = Reactor()
    reactor.advance(T0)
    bounces: list[tuple[str, bytes]] = []

    def bounce(sender: bytes, rcpt: str, body: bytes) -> Deferred[Any]:
        bounces.append((rcpt, body))
        return succeed(None)

    s = OutboundSender(reactor, SyncPool(), tmp_path / "outbound", "n1.example.org", bounce,
                       routes, resolver)  # type: ignore[arg-type]  # fmt: skip
    s.startService()
    return reactor, s, bounces


def serve(reactor: Reactor, mx: RemoteMX, expect: tuple[str, int]) -> None:
    """Answer the sender's newest connection with ``mx`` over an in-memory transport."""
    host, port, factory, _timeout, _bind = reactor.tcpClients.pop()
    assert (host, port) == expect
    server = smtp.ESMTP()
    server.delivery = mx
    client = factory.buildProtocol(None)
    here, there = IPv4Address("TCP", "10.0.0.1", 40000), IPv4Address("TCP", host, port)
    pump = iosim.connect(
        server, iosim.FakeTransport(server, True, there, here),
        client, iosim.FakeTransport(client, False, here, there),
    )  # fmt: skip
    pump.flush()
    assert server.transport.disconnected or client.transport.disconnecting


def test_delivers_through_the_transport_route_and_empties_the_spool(tmp_path: Path) -> None:
    """A spooled message goes to its domain's --transport host; delivered, its files go."""
    spool(
        tmp_path / "outbound",
        "m1",
        "alice@example.org",
        ["bob@remote.test"],
        b"Subject: hi\r\n\r\nhello\r\n",
    )
    reactor, s, bounces = sender_for(tmp_path, Routes({"remote.test": ("10.9.9.9", 2525)}))
    mx = RemoteMX()
    serve(reactor, mx, ("10.9.9.9", 2525))
    assert [a for a, _ in mx.got] == ["bob@remote.test"] and b"hello" in mx.got[0][1]
    assert b"\r" not in mx.got[0][1]  # line ends are the wire's CRLF, not CR CR LF
    assert s.entries == {} and not list((tmp_path / "outbound").glob("m1.*"))
    assert s.status()["delivered"] == 1 and bounces == []


def test_temporary_failure_is_retried_after_backoff_and_survives_a_restart(tmp_path: Path) -> None:
    """451 keeps the message with its attempt count on disk; a new sender retries it on time."""
    spool(tmp_path / "outbound", "m1", "alice@example.org", ["bob@remote.test"], b"x\r\n")
    routes = Routes({"remote.test": ("10.9.9.9", 25)})
    reactor, s, _ = sender_for(tmp_path, routes)
    serve(reactor, RemoteMX({"bob@remote.test": 451}), ("10.9.9.9", 25))
    saved = json.loads((tmp_path / "outbound" / "m1.json").read_text())
    assert saved["attempts"] == 1 and saved["next_attempt"] == T0 + 60
    assert s.status()["length"] == 1 and s.status()["deferred"] == 1
    s.stopService()
    # "Restart": a fresh sender reads the state and waits until the retry is due.
    reactor2, s2, bounces = sender_for(tmp_path, routes)
    assert reactor2.tcpClients == []
    reactor2.advance(59)
    assert reactor2.tcpClients == []
    reactor2.advance(1)
    mx = RemoteMX()
    serve(reactor2, mx, ("10.9.9.9", 25))
    assert [a for a, _ in mx.got] == ["bob@remote.test"] and s2.entries == {} and bounces == []


def test_permanent_failure_bounces_to_the_sender_once(tmp_path: Path) -> None:
    """550 from the remote: a DSN to the sender, the message leaves the queue."""
    spool(tmp_path / "outbound", "m1", "alice@example.org", ["nobody@remote.test", "bob@remote.test"],
          b"Subject: hi\r\n\r\nx\r\n")  # fmt: skip
    reactor, s, bounces = sender_for(tmp_path, Routes({"remote.test": ("10.9.9.9", 25)}))
    mx = RemoteMX({"nobody@remote.test": 550})
    serve(reactor, mx, ("10.9.9.9", 25))
    assert [a for a, _ in mx.got] == ["bob@remote.test"]
    ((to, dsn),) = bounces
    assert to == "alice@example.org" and b"Final-Recipient: rfc822; nobody@remote.test" in dsn
    assert s.entries == {} and s.status()["bounced"] == 1


def test_null_sender_is_never_bounced(tmp_path: Path) -> None:
    """A bounce that bounces (MAIL FROM:<>) is dropped, never answered with another bounce."""
    spool(tmp_path / "outbound", "m1", "", ["nobody@remote.test"], b"x\r\n")
    reactor, s, bounces = sender_for(tmp_path, Routes({"remote.test": ("10.9.9.9", 25)}))
    serve(reactor, RemoteMX({"nobody@remote.test": 550}), ("10.9.9.9", 25))
    assert bounces == [] and s.entries == {}


class FakeResolver:
    """MX answers from a table; missing domains are NXDOMAIN."""

    def __init__(self, table: dict[str, list[tuple[int, str]]]) -> None:
        self.table = table

    def lookupMailExchange(self, name: str) -> Deferred[Any]:
        if name not in self.table:
            return fail(dnsError.DNSNameError(name))
        answers = [
            dns.RRHeader(name, dns.MX, payload=dns.Record_MX(pref, host))
            for pref, host in self.table[name]
        ]
        return succeed((answers, [], []))


def test_mx_order_is_followed_and_nxdomain_bounces(tmp_path: Path) -> None:
    """The lowest-preference MX is tried first, the next when it refuses to connect;
    a domain that does not exist bounces at once."""
    spool(
        tmp_path / "outbound",
        "m1",
        "alice@example.org",
        ["bob@far.test", "x@nowhere.test"],
        b"x\r\n",
    )
    resolver = FakeResolver({"far.test": [(20, "mx2.far.test"), (10, "mx1.far.test")]})
    reactor, s, bounces = sender_for(tmp_path, Routes(), resolver)
    host, port, factory, _, _ = reactor.tcpClients.pop()
    assert (host, port) == ("mx1.far.test", 25)
    from twisted.internet.error import ConnectionRefusedError

    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    mx = RemoteMX()
    serve(reactor, mx, ("mx2.far.test", 25))
    assert [a for a, _ in mx.got] == ["bob@far.test"]
    assert s.entries == {}, s.entries
    ((_, dsn),) = bounces
    assert b"x@nowhere.test" in dsn and b"5.1.2" in dsn


def test_messages_for_one_mx_share_connections(tmp_path: Path) -> None:
    """Five queued messages for one MX go over two connections (the per-destination
    limit), each taking the next message after RSET, not one connection per message."""
    for k in range(5):
        spool(tmp_path / "outbound", f"m{k}", "alice@example.org", [f"u{k}@remote.test"], b"x\r\n")
    reactor, s, bounces = sender_for(tmp_path, Routes({"remote.test": ("10.9.9.9", 25)}))
    assert len(reactor.tcpClients) == 2
    mx = RemoteMX()
    serve(reactor, mx, ("10.9.9.9", 25))
    serve(reactor, mx, ("10.9.9.9", 25))
    assert sorted(a for a, _ in mx.got) == [f"u{k}@remote.test" for k in range(5)]
    assert s.entries == {} and bounces == [] and s.status()["connects"] == 2
    assert reactor.tcpClients == []


def test_smarthost_gets_auth_plain_with_the_configured_credentials(tmp_path: Path) -> None:
    """With --smarthost and credentials the client authenticates (AUTH PLAIN) before MAIL."""
    from twisted.cred import checkers, portal
    from twisted.mail import imap4

    spool(tmp_path / "outbound", "m1", "alice@example.org", ["bob@far.test"], b"x\r\n")
    routes = Routes({}, ("10.8.8.8", 587), (b"relayuser", b"relaypw"))
    reactor, s, bounces = sender_for(tmp_path, routes)
    host, port, factory, _, _ = reactor.tcpClients.pop()
    assert (host, port) == ("10.8.8.8", 587)
    mx = RemoteMX()

    class Realm:
        def requestAvatar(self, avatar_id: Any, mind: Any, *ifaces: Any) -> Any:
            return smtp.IMessageDelivery, mx, lambda: None

    server = smtp.ESMTP({b"PLAIN": imap4.PLAINCredentials})
    server.portal = portal.Portal(  # type: ignore[assignment]
        Realm(), [checkers.InMemoryUsernamePasswordDatabaseDontUse(relayuser=b"relaypw")]
    )
    client = factory.buildProtocol(None)
    here, there = IPv4Address("TCP", "10.0.0.1", 40000), IPv4Address("TCP", host, port)
    iosim.connect(
        server, iosim.FakeTransport(server, True, there, here),
        client, iosim.FakeTransport(client, False, here, there),
    )  # fmt: skip
    assert server.authenticated
    assert [a for a, _ in mx.got] == ["bob@far.test"] and s.entries == {} and bounces == []


def test_smarthost_options_fail_fast(tmp_path: Path) -> None:
    """--smarthost-auth-file gives USER:PASSWORD; without --smarthost or a colon: UsageError."""
    from twisted.python import usage

    from yimaporc.tap.porcupine import Options

    base = ["--node-id", "n", "--data-dir", str(tmp_path), "--domain", "example.org",
            "--cluster", "tcp:7946:interface=127.0.111.99"]  # fmt: skip
    auth = tmp_path / "relay.auth"
    auth.write_text("relayuser:s3cr:et\n")
    o = Options()
    o.parseOptions(
        [*base, "--smarthost", "relay.example.net:587", "--smarthost-auth-file", str(auth)]
    )
    assert o.routes.smarthost == ("relay.example.net", 587)
    assert o.routes.smarthost_auth == (b"relayuser", b"s3cr:et")
    for extra in (["--smarthost-auth-file", str(auth)], ["--smarthost", "relay:587:x"]):
        with pytest.raises(usage.UsageError):
            Options().parseOptions([*base, *extra])
    auth.write_text("no colon here\n")
    with pytest.raises(usage.UsageError, match="USER:PASSWORD"):
        Options().parseOptions([*base, "--smarthost", "r:587", "--smarthost-auth-file", str(auth)])


def test_a_local_error_backs_off_instead_of_retrying_in_a_loop(
    tmp_path: Path, logged_failures: LoggedFailures
) -> None:
    """A bounce that cannot be delivered (a local error) leaves the message queued with the
    next attempt a backoff step away, not retried at every wake-up."""
    spool(tmp_path / "outbound", "m1", "alice@example.org", ["nobody@remote.test"], b"x\r\n")
    reactor = Reactor()
    reactor.advance(T0)

    def bounce(sender: bytes, rcpt: str, body: bytes) -> Deferred[Any]:
        return fail(RuntimeError("the local store is down"))

    s = OutboundSender(reactor, SyncPool(), tmp_path / "outbound", "n1.example.org", bounce,  # type: ignore[arg-type]
                       Routes({"remote.test": ("10.9.9.9", 25)}))  # fmt: skip
    s.startService()
    serve(reactor, RemoteMX({"nobody@remote.test": 550}), ("10.9.9.9", 25))
    entry = s.entries["m1"]
    assert entry.attempts == 1 and entry.next_attempt == T0 + 60
    assert "local error" in entry.last_error and reactor.tcpClients == []
    reactor.advance(59)
    assert reactor.tcpClients == []
    reactor.advance(1)
    assert len(reactor.tcpClients) == 1
    assert logged_failures.take(RuntimeError)  # "outbound: attempt for m1 failed"


def test_a_message_file_removed_by_hand_is_dropped_from_the_queue(tmp_path: Path) -> None:
    """An envelope without its .eml (deleted by an operator) leaves the queue, no loop."""
    spool(tmp_path / "outbound", "m1", "alice@example.org", ["bob@remote.test"], b"x\r\n")
    (tmp_path / "outbound" / "m1.eml").unlink()
    reactor, s, _ = sender_for(tmp_path, Routes({"remote.test": ("10.9.9.9", 25)}))
    assert s.entries == {} and reactor.tcpClients == []
    assert not (tmp_path / "outbound" / "m1.json").exists()


def test_a_dot_line_at_a_chunk_start_is_stuffed_and_smuggles_nothing(tmp_path: Path) -> None:
    """A "." line where the client's 16 KiB send chunks meet is still dot-stuffed (stock
    stuffed each chunk alone: the remote took it as the end of DATA and the rest as
    commands, an SMTP smuggling route), and a bare CR goes out as CRLF."""
    head = b"Subject: hi\r\n\r\n"
    filler = b"x" * (16384 - len(head.replace(b"\r\n", b"\n")) - 1) + b"\r\n"
    smuggled = b"MAIL FROM:<ceo@example.org>\r\nRCPT TO:<bob@remote.test>\r\nDATA\r\nforged\r\n"
    body = head + filler + b".\r\n" + smuggled + b".\r\nlast\rline\r\n"
    spool(tmp_path / "outbound", "m1", "alice@example.org", ["bob@remote.test"], body)
    reactor, s, bounces = sender_for(tmp_path, Routes({"remote.test": ("10.9.9.9", 2525)}))
    mx = RemoteMX()
    serve(reactor, mx, ("10.9.9.9", 2525))
    assert len(mx.got) == 1  # one message, not a second one made of the smuggled lines
    got = mx.got[0][1]
    assert b"\n.\nMAIL FROM:<ceo@example.org>\n" in got and b"\nforged\n.\nlast\nline" in got
    assert s.status()["delivered"] == 1 and bounces == []
