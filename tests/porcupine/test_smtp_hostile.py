"""SMTP against hostile clients: header injection, malformed AUTH, pipelining floods, fuzz."""

from __future__ import annotations

import base64
from collections import Counter
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.mail import imap4, smtp
from zope.interface import implementer

from yimaporc.porcupine._smtp import MailESMTP
from yimaporc.porcupine.delivery import Recipient, SmtpPolicy
from yimaporc.porcupine.interfaces import ISmtpDelivery
from yimaporc.porcupine.throttle import LoginThrottled

POLICY = SmtpPolicy("example.org", "n1.example.org", max_message_size=4000)


@implementer(ISmtpDelivery)
class AcceptAll:
    """An IMessageDelivery that accepts every sender and recipient at once."""

    authenticated_as: str | None = None

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.pending: list[Deferred[Any]] = []
        self.helos: list[bytes] = []

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> bytes:
        self.helos.append(helo[0])
        return b"Received: from " + helo[0]

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: smtp.User) -> Any:
        rcpt = Recipient(str(user.dest), False)

        def factory() -> Any:
            return user.protocol.message_for(rcpt)

        if self.hold:
            d: Deferred[Any] = Deferred()
            self.pending.append(d)
            return d
        return factory


class FakePortal:
    """Answers logins with a prepared outcome."""

    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome
        self.logins: list[Any] = []

    def login(self, creds: Any, mind: Any, *ifaces: Any) -> Deferred[Any]:
        self.logins.append(creds)
        if isinstance(self.outcome, Exception):
            return fail(self.outcome)
        return succeed(self.outcome)


def server(
    delivery: Any = None, tls: bool = False, portal: Any = None
) -> tuple[MailESMTP, StringTransport, list[bytes], Counter[str]]:
    stored: list[bytes] = []
    counters: Counter[str] = Counter()

    def deliver(sender: bytes, rcpts: list[Recipient], body: bytes) -> Deferred[object]:
        stored.append(body)
        return succeed(None)

    chal = {b"PLAIN": imap4.PLAINCredentials, b"LOGIN": imap4.LOGINCredentials}
    p = MailESMTP(Clock(), POLICY, deliver, chal, counters=counters)
    p.delivery = delivery or AcceptAll()
    if portal is not None:
        p.portal = portal
    t = StringTransport()
    p.makeConnection(t)
    if tls:
        p.startedTLS = True
    t.clear()
    return p, t, stored, counters


def replies(t: StringTransport) -> list[bytes]:
    return [line for line in t.value().split(b"\r\n") if line and line[3:4] == b" "]


def codes(t: StringTransport) -> list[bytes]:
    return [line[:3] for line in replies(t)]


def test_ehlo_with_cr_is_refused_and_forges_nothing() -> None:
    """EHLO carrying CR (the header-injection vector) is 500 and a close, counted; no
    Received from it; a new session's clean EHLO is used."""
    delivery = AcceptAll()
    p, t, stored, counters = server(delivery)
    p.dataReceived(b"EHLO evil\rX-Injected: yes\r\n")
    assert codes(t) == [b"500"] and t.disconnecting
    assert counters["smtp_bare_newlines"] == 1
    p, t, stored, counters = server(delivery)
    p.dataReceived(
        b"EHLO good.example\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n"
        b"Subject: s\r\n\r\nbody\r\n.\r\n"
    )
    assert codes(t) == [b"250", b"250", b"250", b"354", b"250"]
    assert delivery.helos == [b"good.example"]
    assert stored and b"X-Injected" not in stored[0]


def test_helo_arguments_must_be_printable_ascii_without_spaces() -> None:
    """Controls, NUL, DEL, 8-bit, inner spaces and empty HELO/EHLO get 501; valid ones 250."""
    bad = [
        b"HELO a\x00b",
        b"EHLO a\x7fb",
        b"EHLO caf\xc3\xa9.example",
        b"EHLO a b",
        b"EHLO",
        b"HELO \t",
        b"EHLO " + b"a" * 256,
    ]
    p, t, _, counters = server()
    for line in bad:
        p.dataReceived(line + b"\r\n")
    assert codes(t) == [b"501"] * len(bad)
    assert counters["smtp_bad_arguments"] == len(bad)
    t.clear()
    p.dataReceived(b"HELO [127.0.0.1]\r\nEHLO mx.example.org \r\n")
    assert codes(t) == [b"250", b"250"]


def test_mail_and_rcpt_with_control_characters_are_501() -> None:
    """MAIL/RCPT arguments with ESC, NUL, tab or DEL get 501 and are counted; clean ones
    pass (CR and LF: test_bare_newlines_in_commands_are_500_and_close)."""
    p, t, _, counters = server()
    p.dataReceived(b"EHLO x\r\n")
    t.clear()
    p.dataReceived(b"MAIL FROM:<a@b.org>\x1bX: y\r\n")
    p.dataReceived(b"MAIL FROM:<a\x00@b.org>\r\n")
    p.dataReceived(b"MAIL FROM:<a@b.org>\r\n")
    p.dataReceived(b"RCPT TO:<u@example.org>\x7f\r\n")
    p.dataReceived(b"RCPT TO:<u@exa\tmple.org>\r\n")
    p.dataReceived(b"RCPT TO:<u@example.org>\r\n")
    assert codes(t) == [b"501", b"501", b"250", b"501", b"501", b"250"]
    assert counters["smtp_bad_arguments"] == 4


HEAD = b"EHLO c\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n"
SMUGGLED = (
    b"MAIL FROM:<ceo@example.org>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
    b"Subject: forged\r\n\r\nforged\r\n.\r\n"
)
# SMTP smuggling (2023): ends of DATA some receivers accepted besides CRLF.CRLF.
SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\n..\n"]


def _feed(p: MailESMTP, wire: bytes, step: int) -> None:
    for at in range(0, len(wire), step or len(wire)):
        p.dataReceived(wire[at : at + (step or len(wire))])


def test_smtp_smuggling_ends_no_data_and_the_message_is_refused() -> None:
    """DATA ends only at CRLF.CRLF: after the smuggling sequences the would-be second
    transaction is message text, and the bare CR/LF refuses the whole message (550 5.6.0,
    counted), nothing stored, in any TCP cut; the session goes on in step."""
    for seq in SMUGGLING:
        for step in (0, 1, 7):
            p, t, stored, counters = server()
            wire = HEAD + b"Subject: a\r\n\r\nhello" + seq + SMUGGLED
            _feed(p, wire + HEAD[8:] + b"Subject: ok\r\n\r\nfine\r\n.\r\nQUIT\r\n", step)
            refused, good = [b"250", b"250", b"250", b"354", b"550"], [b"250", b"250", b"354"]
            assert codes(t) == [*refused, *good, b"250", b"221"], (seq, step)
            assert counters["smtp_bare_newlines"] == 1
            assert len(stored) == 1 and b"forged" not in stored[0] and b"fine" in stored[0]


def test_a_clean_dot_line_in_the_text_still_needs_its_stuffing() -> None:
    """The client's '..' line is stored as '.', and only CRLF.CRLF ends the text."""
    p, t, stored, counters = server()
    p.dataReceived(HEAD + b"Subject: a\r\n\r\nhello\r\n..\r\n" + SMUGGLED[:-3])
    assert codes(t) == [b"250", b"250", b"250", b"354"] and not stored
    p.dataReceived(b".\r\n")
    assert codes(t)[-1] == b"250" and counters["smtp_bare_newlines"] == 0
    assert b"\r\nhello\r\n.\r\nMAIL FROM:<ceo@example.org>\r\n" in stored[0]


def test_bare_newlines_in_commands_are_500_and_close() -> None:
    """A command line with a bare LF or CR (the client frames lines otherwise than we do)
    is 500 5.5.2 and a close, counted; nothing after it runs."""
    for wire in (
        b"MAIL FROM:<a@b.org>\nRCPT TO:<u@example.org>\r\n",
        b"MAIL FROM:<a@b.org>\n\r\n",
        b"NOOP\nRSET\r\n",
        b"RSET\rMAIL FROM:<x@y.org>\r\n",
        b"DATA\nSubject: x\r\n",
        b"QUIT\n\r\n",
    ):
        p, t, stored, counters = server()
        p.dataReceived(b"EHLO c\r\n" + wire + b"NOOP\r\n")
        assert codes(t) == [b"250", b"500"] and t.disconnecting, wire
        assert replies(t)[-1].startswith(b"500 5.5.2 Bare <CR> or <LF>")
        assert counters["smtp_bare_newlines"] == 1 and not stored
    # in a transaction, and in a pipeline held behind a RCPT whose answer waits
    delivery = AcceptAll(hold=True)
    p, t, stored, counters = server(delivery)
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.org>\r\n")
    p.dataReceived(b"RCPT TO:<v@example.org>\nDATA\r\nNOOP\r\n")
    assert codes(t) == [b"250", b"250"]
    delivery.pending[0].callback(lambda: p.message_for(Recipient("u@example.org", False)))
    assert codes(t) == [b"250", b"250", b"250", b"500"] and t.disconnecting


def test_pipelined_backlog_is_capped_in_bytes() -> None:
    """Commands piled behind an unanswered RCPT beyond 64 KiB get 421 and a close."""
    delivery = AcceptAll(hold=True)
    p, t, _, counters = server(delivery)
    p.dataReceived(b"EHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.org>\r\n")
    p.dataReceived(b"NOOP " + b"x" * 1000 + b"\r\n")
    assert not t.disconnecting
    p.dataReceived((b"NOOP " + b"x" * 1000 + b"\r\n") * 70)
    assert codes(t)[-1] == b"421" and t.disconnecting
    assert counters["smtp_backlog_overflows"] == 1


def test_pipelined_backlog_is_capped_in_commands() -> None:
    """More than MAX_BACKLOG short commands behind a pending reply get 421 and a close."""
    delivery = AcceptAll(hold=True)
    p, t, _, _ = server(delivery)
    p.dataReceived(b"EHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.org>\r\n")
    p.dataReceived(b"NOOP\r\n" * MailESMTP.MAX_BACKLOG)
    assert not t.disconnecting
    p.dataReceived(b"NOOP\r\n")
    assert codes(t)[-1] == b"421" and t.disconnecting


def test_malformed_auth_plain_is_501_not_a_traceback() -> None:
    """AUTH PLAIN with a response lacking NUL separators is 501; the session goes on."""
    p, t, _, counters = server(tls=True, portal=FakePortal(UnauthorizedLogin()))
    with capturedLogs() as events:
        p.dataReceived(b"EHLO x\r\n")
        p.dataReceived(b"AUTH PLAIN " + base64.b64encode(b"no-separators") + b"\r\n")
        p.dataReceived(b"AUTH PLAIN\r\n" + base64.b64encode(b"a\x00b") + b"\r\n")
        p.dataReceived(b"NOOP\r\n")
    assert codes(t)[-4:] == [b"501", b"334", b"501", b"250"]
    assert not [e for e in events if "log_failure" in e]
    assert counters["smtp_bad_arguments"] == 2


def test_auth_failures_and_throttling_have_enhanced_codes() -> None:
    """Wrong credentials: 535 5.7.8; a throttled attempt: 454 4.7.0."""
    creds = base64.b64encode(b"\x00alice\x00wrong")
    p, t, _, _ = server(tls=True, portal=FakePortal(UnauthorizedLogin()))
    p.dataReceived(b"EHLO x\r\nAUTH PLAIN " + creds + b"\r\n")
    assert replies(t)[-1].startswith(b"535 5.7.8")
    p, t, _, _ = server(tls=True, portal=FakePortal(LoginThrottled("pair", 300)))
    p.dataReceived(b"EHLO x\r\nAUTH PLAIN " + creds + b"\r\n")
    assert replies(t)[-1].startswith(b"454 4.7.0")


_WORDS = [
    b"HELO", b"EHLO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP", b"VRFY",
    b"HELP", b"QUIT", b"AUTH", b"AUTH PLAIN", b"AUTH LOGIN", b"STARTTLS", b"BDAT", b".",
]  # fmt: skip
_ARG = st.binary(max_size=40).map(lambda b: b.replace(b"\r\n", b""))
_LINE = st.tuples(st.sampled_from(_WORDS), _ARG).map(lambda wa: wa[0] + wa[1])


@given(st.lists(_LINE, max_size=30), st.booleans())
def test_fuzzed_sessions_never_raise_or_log_tracebacks(lines: list[bytes], tls: bool) -> None:
    """Random command sequences get SMTP replies: no exception escapes, no failure is logged."""
    p, t, _, _ = server(tls=tls, portal=FakePortal(UnauthorizedLogin()))
    with capturedLogs() as events:
        for line in lines:
            if t.disconnecting:
                break
            p.dataReceived(line + b"\r\n")
    assert not [e for e in events if "log_failure" in e]
    for line in t.value().split(b"\r\n"):
        assert line == b"" or line[:3].isdigit()
