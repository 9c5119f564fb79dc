"""SMTP details clients rely on: enhanced status codes, MAIL parameters, line ends, trace headers."""

from __future__ import annotations

import re
from typing import Any

from test_smtp_hostile import POLICY, AcceptAll, codes, replies, server
from twisted.mail import smtp
from zope.interface import implementer

from yimaporc.porcupine.delivery import SmtpDelivery, SmtpPolicy, with_return_path
from yimaporc.porcupine.interfaces import ISmtpSession

ENHANCED = re.compile(rb"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")


def test_every_reply_but_greeting_ehlo_and_354_carries_an_enhanced_code() -> None:
    """RFC 2034: EHLO lists ENHANCEDSTATUSCODES; MAIL 2.1.0, RCPT 2.1.5, the rest too."""
    p, t, stored, _ = server()
    p.dataReceived(b"EHLO client.example\r\n")
    assert b"250-ENHANCEDSTATUSCODES" in t.value() or b"250 ENHANCEDSTATUSCODES" in t.value()
    t.clear()
    p.dataReceived(
        b"MAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.org>\r\nDATA\r\nSubject: s\r\n\r\nx\r\n.\r\n"
        b"NOOP\r\nRSET\r\nVRFY u\r\nFOO\r\nMAIL FROM:<a@b.org> SIZE=999999\r\nRCPT TO:<x>\r\n"
        b"QUIT\r\n"
    )
    lines = replies(t)
    assert [line[:3] for line in lines] == [
        b"250", b"250", b"354", b"250", b"250", b"250", b"252", b"500", b"552", b"503", b"221",
    ]  # fmt: skip
    assert lines[0].startswith(b"250 2.1.0") and lines[1].startswith(b"250 2.1.5")
    assert [line for line in lines if not ENHANCED.match(line)] == [lines[2]]  # only the 354
    assert stored


def test_unknown_body_values_and_mail_parameters_are_refused() -> None:
    """BODY=7BIT/8BITMIME and SIZE are taken; BODY=BINARYMIME 501; an unknown parameter 555."""
    p, t, _, _ = server()
    p.dataReceived(b"EHLO c\r\n")
    t.clear()
    for line in (b"MAIL FROM:<a@b.org> BODY=BINARYMIME", b"MAIL FROM:<a@b.org> SMTPUTF8",
                 b"MAIL FROM:<a@b.org> BODY=8BITMIME SIZE=10", b"RSET",
                 b"MAIL FROM:<a@b.org> body=7bit"):  # fmt: skip
        p.dataReceived(line + b"\r\n")
    assert codes(t) == [b"501", b"555", b"250", b"250", b"250"]


def test_bare_lf_or_cr_in_the_body_refuses_the_message() -> None:
    """A body with bare LF or CR line ends inside CRLF lines is refused at the final dot
    (550 5.6.0, counted), nothing stored; the session goes on."""
    for bare in (b"Subject: s\nX-A: 1\r\n", b"Subject: s\r\n\r\nline two\rthree\r\n"):
        p, t, stored, counters = server()
        p.dataReceived(b"EHLO c\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n")
        p.dataReceived(bare + b"more\r\n.\r\nNOOP\r\n")
        assert codes(t)[-2:] == [b"550", b"250"] and stored == []
        assert replies(t)[-2].startswith(b"550 5.6.0 Bare <CR> or <LF>")
        assert counters["smtp_bare_newlines"] == 1


@implementer(ISmtpSession)
class _Proto:
    """A session over TLS or not, on the MX listener (its messages are not used here)."""

    def __init__(self, tls: bool) -> None:
        self.startedTLS = tls
        self.policy = SmtpPolicy("example.org", "n1.example.org", 1 << 20)

    def message_for(self, rcpt: Any) -> Any:
        raise AssertionError("no DATA in these tests")


def _user(address: str, tls: bool) -> Any:
    return smtp.User(address, None, _Proto(tls), None)


def test_received_names_the_protocol_and_the_single_recipient() -> None:
    """RFC 3848 ESMTP/ESMTPS/ESMTPSA and RFC 5321 4.4 'for <rcpt>' with one recipient only."""
    policy = SmtpPolicy("example.org", "n1.example.org", 1 << 20)
    plain = SmtpDelivery(None, policy, lambda: 0.0)  # type: ignore[arg-type]
    authed = SmtpDelivery(None, policy, lambda: 0.0, "alice@example.org")  # type: ignore[arg-type]
    helo = (b"client.example", b"192.0.2.7")
    one = plain.receivedHeader(helo, smtp.Address(b"a@b.org"), [_user("u@example.org", False)])
    assert b"with ESMTP\r\n\tfor <u@example.org>;" in one
    two = authed.receivedHeader(
        helo, smtp.Address(b"a@b.org"), [_user("u@example.org", True), _user("v@example.org", True)]
    )
    assert b"with ESMTPSA;" in two and b"for <" not in two
    assert b"from client.example ([192.0.2.7]) (authenticated as alice@example.org)" in two


def test_return_path_is_the_envelope_sender() -> None:
    """Final delivery adds Return-Path: <sender> (empty for bounces) above everything."""
    assert with_return_path(b"a@b.org", b"Received: x\r\n\r\nbody") == (
        b"Return-Path: <a@b.org>\r\nReceived: x\r\n\r\nbody"
    )
    assert with_return_path(b"", b"x").startswith(b"Return-Path: <>\r\n")


def test_peer_unavailable_is_a_counted_451_without_a_traceback() -> None:
    """A delivery failing because a cluster peer is out of reach (an expected condition
    under faults) answers 451 4.4.0, counts it and logs no failure (issue 14)."""
    from collections import Counter

    from twisted.internet.defer import fail
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.mail import imap4

    from yimaporc.cluster.rpc import PeerUnavailable
    from yimaporc.porcupine._smtp import MailESMTP
    from yimaporc.porcupine.replication.shell import ReplicationStopped

    for err in (PeerUnavailable("10.0.0.4:7946: timed out"), ReplicationStopped("stopped")):
        counters: Counter[str] = Counter()
        chal = {b"PLAIN": imap4.PLAINCredentials}
        p = MailESMTP(Clock(), POLICY, lambda s, r, b, e=err: fail(e), chal, counters=counters)
        p.delivery = AcceptAll()
        t = StringTransport()
        p.makeConnection(t)
        p.dataReceived(b"EHLO c\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n")
        p.dataReceived(b"Subject: s\r\n\r\nx\r\n.\r\n")
        assert replies(t)[-1].startswith(b"451 4.4.0")
        assert counters["smtp_peer_unavailable"] == 1


def test_rcpt_while_the_user_manager_is_unreachable_is_a_counted_451() -> None:
    """RCPT TO whose profile lookup fails with PeerUnavailable answers 451 4.4.0, counts
    it and logs no failure (twisted.mail logged it as "Unhandled Error"; issue 14)."""
    from twisted.internet.defer import fail

    from yimaporc.cluster.rpc import PeerUnavailable
    from yimaporc.porcupine.delivery import DeliveryProxy

    def users(address: str) -> Any:
        class Down:
            def profile(self, address: str) -> Any:
                return fail(PeerUnavailable("10.0.0.3:7946: Connection refused"))

        return Down()

    proxy = DeliveryProxy("n1", users, lambda n: None, lambda: ["n1"], lambda: 0.0)  # type: ignore[arg-type,return-value]
    p, t, stored, _ = server(SmtpDelivery(proxy, POLICY, lambda: 0.0))
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.org>\r\n")
    assert replies(t)[-1].startswith(b"451 4.4.0")
    assert proxy.lookups_unavailable == 1 and stored == []


def test_unqualified_recipients_get_the_mail_domain_not_the_host_name() -> None:
    """RCPT TO:<alice> and RFC 5321's RCPT TO:<Postmaster> name users of the node's mail
    domain (alice@example.org), as Postfix's myorigin does; twisted qualified them with
    the host name (alice@n1.example.org: relaying denied on the MX, and a submission
    queued it outbound to a domain that does not exist, to bounce)."""
    seen: list[str] = []

    class Recording(AcceptAll):
        def validateTo(self, user: smtp.User) -> Any:
            seen.append(str(user.dest))
            return super().validateTo(user)

    p, t, _, _ = server(Recording())
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<a@b.org>\r\n")
    t.clear()
    for rcpt in (b"<alice>", b"<Postmaster>", b"<bob@other.org>", b"<carol@n1.example.org>"):
        p.dataReceived(b"RCPT TO:" + rcpt + b"\r\n")
    assert codes(t) == [b"250"] * 4
    assert seen == [
        "alice@example.org",
        "Postmaster@example.org",
        "bob@other.org",
        "carol@n1.example.org",
    ]


def test_rcpt_parameters_are_refused_as_mail_parameters_are() -> None:
    """RCPT TO:<u@example.org> NOTIFY=NEVER (DSN is not offered) is 555 like an unknown
    MAIL parameter (RFC 5321 4.1.1.11), not silently accepted: the client would count on
    a delivery notice that never comes; without parameters RCPT goes on."""
    p, t, _, counters = server()
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<a@b.org>\r\n")
    t.clear()
    for line in (b"RCPT TO:<u@example.org> NOTIFY=NEVER", b"RCPT TO:<u@example.org> ORCPT=rfc822;u@x",
                 b"RCPT TO:<u@example.org>"):  # fmt: skip
        p.dataReceived(line + b"\r\n")
    assert codes(t) == [b"555", b"555", b"250"]
    assert counters["smtp_bad_arguments"] == 2
