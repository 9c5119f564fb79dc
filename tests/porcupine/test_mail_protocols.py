"""Protocol pieces without sockets: ESMTP ordering and limits, POP3 dot-stuffing (IMAP's pieces: tests/imap)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.mail import smtp
from zope.interface import implementer

from yimaporc.porcupine._pop3 import dot_stuff
from yimaporc.porcupine._smtp import MailESMTP
from yimaporc.porcupine.delivery import Recipient, SmtpPolicy
from yimaporc.porcupine.interfaces import ISmtpDelivery

POLICY = SmtpPolicy("example.org", "n1.example.org", max_message_size=2000)


@implementer(ISmtpDelivery)
class SlowDelivery:
    """validateTo answers only when the test fires it."""

    authenticated_as: str | None = None

    def __init__(self) -> None:
        self.pending: list[tuple[Deferred[Any], smtp.User]] = []

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> bytes:
        return b"Received: test"

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: smtp.User) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((d, user))
        return d

    def accept_all(self) -> None:
        pending, self.pending = self.pending, []
        for d, user in pending:
            rcpt = Recipient(str(user.dest), False)
            d.callback(lambda u=user, r=rcpt: u.protocol.message_for(r))


def server(delivery: Any, stored: list[bytes]) -> tuple[MailESMTP, StringTransport, Clock]:
    clock = Clock()

    def deliver(sender: bytes, rcpts: list[Recipient], body: bytes) -> Deferred[object]:
        stored.append(body)
        return succeed(None)

    p = MailESMTP(clock, POLICY, deliver)
    p.delivery = delivery
    t = StringTransport(peerAddress=None)
    p.makeConnection(t)
    t.clear()
    return p, t, clock


def codes(t: StringTransport) -> list[bytes]:
    return [line[:3] for line in t.value().split(b"\r\n") if line and line[3:4] == b" "]


def test_pipelined_commands_wait_for_slow_rcpt() -> None:
    """DATA pipelined behind an unanswered RCPT waits; replies come in order."""
    delivery, stored = SlowDelivery(), []
    p, t, _ = server(delivery, stored)
    p.dataReceived(b"EHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n")
    assert codes(t) == [b"250", b"250"]
    delivery.accept_all()
    assert codes(t) == [b"250", b"250", b"250", b"354"]
    p.dataReceived(b"Subject: s\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert codes(t)[-2:] == [b"250", b"221"]
    assert stored == [b"Received: test\r\nSubject: s\r\n\r\nbody\r\n"]


def test_size_limit_during_data() -> None:
    """A body past the limit is dropped and answered 552 at the final dot."""
    delivery, stored = SlowDelivery(), []
    p, t, _ = server(delivery, stored)
    p.dataReceived(b"EHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.org>\r\n")
    delivery.accept_all()
    p.dataReceived(
        b"DATA\r\n" + b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n" + b"z" * 900 + b"\r\n.\r\n"
    )
    assert codes(t)[-1] == b"552" and stored == []


def test_ehlo_lists_extensions_without_auth_in_clear() -> None:
    """EHLO offers SIZE, PIPELINING and 8BITMIME, and no AUTH without TLS."""
    p, t, _ = server(SlowDelivery(), [])
    p.dataReceived(b"EHLO x\r\n")
    text = t.value()
    assert b"SIZE 2000" in text and b"PIPELINING" in text and b"8BITMIME" in text
    assert b"AUTH" not in text


def test_idle_timeout_uses_injected_clock() -> None:
    """An idle session gets 421 and is closed when the injected clock passes the timeout."""
    p, t, clock = server(SlowDelivery(), [])
    clock.advance(p.timeout + 1)
    assert codes(t) == [b"421"] and t.disconnecting


def test_too_many_recipients() -> None:
    """RCPT beyond max_recipients gets 452."""
    delivery = SlowDelivery()
    p, t, _ = server(delivery, [])
    p.dataReceived(b"EHLO x\r\nMAIL FROM:<a@b.org>\r\n")
    for _ in range(POLICY.max_recipients + 1):
        p.dataReceived(b"RCPT TO:<u@example.org>\r\n")
        delivery.accept_all()
    assert codes(t)[-1] == b"452"


def test_dot_stuffing() -> None:
    """Leading dots are doubled, CRLF kept, TOP keeps headers plus N body lines."""
    body = b"A: 1\r\n\r\n.one\r\ntwo\r\n..three\r\n"
    assert dot_stuff(body) == b"A: 1\r\n\r\n..one\r\ntwo\r\n...three\r\n"
    assert dot_stuff(body, 1) == b"A: 1\r\n\r\n..one\r\n"
    assert dot_stuff(body, 0) == b"A: 1\r\n\r\n"
