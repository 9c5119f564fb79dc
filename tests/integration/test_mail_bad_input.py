"""Bad input over real sockets: each gets the protocol's error, nothing half-stored, node keeps serving."""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from yimaporc.porcupine.testing import RunningMail
from yimaporc.porcupine.values import INBOX

ALICE, PW = "alice@example.org", "pw-alice"
LIMIT = 64 * 1024


@pytest.fixture
def mail(tmp_path: Path) -> Iterator[RunningMail]:
    """A service with a 64 KiB SIZE limit and one user."""
    m = RunningMail(tmp_path / "data", max_message_size=LIMIT)
    m.add_user(ALICE, PW)
    yield m
    m.stop()


class Raw:
    """A line-oriented raw client."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.f = self.sock.makefile("rwb")

    def send(self, data: bytes) -> None:
        self.f.write(data)
        self.f.flush()

    def line(self) -> bytes:
        return self.f.readline()

    def reply(self) -> bytes:
        """One (possibly multi-line) SMTP reply, last line."""
        while True:
            line = self.f.readline()
            if line[3:4] != b"-":
                return line

    def close(self) -> None:
        self.sock.close()


def stored(m: RunningMail) -> int:
    return len(m.service.fragment_store.digests(ALICE, INBOX))


def works(m: RunningMail) -> None:
    """The node still accepts and stores a normal message."""
    before = stored(m)
    with smtplib.SMTP("127.0.0.1", m.port("smtp"), timeout=10) as s:
        s.sendmail("x@y.org", [ALICE], b"Subject: ok\r\n\r\nfine\r\n")
    assert stored(m) == before + 1


def test_smtp_malformed_commands(mail: RunningMail) -> None:
    """Unknown commands 500, bad syntax 501, wrong order 503; the session goes on."""
    c = Raw(mail.port("smtp"))
    assert c.line().startswith(b"220")
    for cmd, code in [
        (b"FOO bar", b"500"),
        (b"RCPT TO:<alice@example.org>", b"503"),
        (b"MAIL FROM:garbage<<", b"501"),
        (b"DATA", b"503"),
        (b"EHLO client", b"250"),
        (b"MAIL FROM:<a@b.org>", b"250"),
        (b"MAIL FROM:<a@b.org>", b"503"),
        (b"RCPT TO:<>", b"501"),
        (b"\xff\xfe\x00", b"500"),
        (b"NOOP", b"250"),
    ]:
        c.send(cmd + b"\r\n")
        assert c.reply()[:3] == code, cmd
    c.close()
    works(mail)


def test_smtp_oversized_command_and_line(mail: RunningMail) -> None:
    """A 3 KB command gets 500; a 100 KB line without CRLF closes the connection."""
    c = Raw(mail.port("smtp"))
    c.line()
    c.send(b"HELO " + b"a" * 3000 + b"\r\n")
    assert c.reply().startswith(b"500")
    c.send(b"NOOP\r\n")
    assert c.reply().startswith(b"250")
    c.send(b"x" * 100_000)
    assert c.reply().startswith(b"500")
    assert c.line() == b""
    c.close()
    works(mail)


def test_smtp_too_many_errors_closes(mail: RunningMail) -> None:
    """After 20 errors the server says 421 and closes."""
    c = Raw(mail.port("smtp"))
    c.line()
    c.send(b"BAD\r\n" * 25)
    replies = [c.reply() for _ in range(21)]
    assert replies[-1].startswith(b"421")
    assert c.line() == b""
    c.close()


def test_size_over_limit(mail: RunningMail) -> None:
    """MAIL FROM SIZE= over the limit is 552; a DATA over it is 552 and nothing is stored."""
    with smtplib.SMTP("127.0.0.1", mail.port("smtp"), timeout=10) as s:
        s.ehlo()
        assert s.has_extn("size") and int(s.esmtp_features["size"]) == LIMIT
        assert s.mail("a@b.org", [f"SIZE={LIMIT + 1}"])[0] == 552
        s.rset()
        big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 80
        assert s.mail("a@b.org")[0] == 250 and s.rcpt(ALICE)[0] == 250
        assert s.data(big)[0] == 552
        assert s.sendmail("a@b.org", [ALICE], b"Subject: small\r\n\r\nok\r\n") == {}
    assert stored(mail) == 1


def test_unknown_user_and_relay_refused(mail: RunningMail) -> None:
    """Unknown local user 550; another domain 550 (no open relay), nothing stored."""
    with smtplib.SMTP("127.0.0.1", mail.port("smtp"), timeout=10) as s:
        s.ehlo()
        s.mail("a@b.org")
        assert s.rcpt("nobody@example.org")[0] == 550
        assert s.rcpt("victim@gmail.com")[0] == 550
        assert s.rcpt("x@example.org.evil.com")[0] == 550
        assert s.rcpt("../etc@example.org")[0] == 550
    assert stored(mail) == 0
    assert mail.service.spool.pending() == []


def test_client_vanishes_mid_data(mail: RunningMail) -> None:
    """A client dropping mid-DATA leaves nothing stored, no tmp file, and the node serves on."""
    c = Raw(mail.port("smtp"))
    c.line()
    c.send(b"EHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    for _ in range(4):
        c.reply()
    c.send(b"Subject: partial\r\n\r\n" + b"half a message\r\n" * 200)
    c.close()
    works(mail)
    subjects = [b for b in mail.service.fragment_store.fetch(ALICE, INBOX, [1, 2]).values()]
    assert len(subjects) == 1 and b"partial" not in subjects[0]
    assert list(mail.service.fragment_store.tmp.iterdir()) == []


def test_pipelined_replies_in_order(mail: RunningMail) -> None:
    """A whole pipelined transaction in one write gets its replies in order."""
    c = Raw(mail.port("smtp"))
    c.line()
    c.send(
        b"EHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<ghost@example.org>\r\n"
        b"RCPT TO:<alice@example.org>\r\nDATA\r\nSubject: p\r\n\r\nbody\r\n.\r\n"
        b"MAIL FROM:<a@b.org>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\nSubject: q\r\n\r\n.\r\nQUIT\r\n"
    )
    codes = [c.reply()[:3] for _ in range(11)]
    assert codes == [b"250", b"250", b"550", b"250", b"354", b"250",
                     b"250", b"250", b"354", b"250", b"221"]  # fmt: skip
    c.close()
    assert stored(mail) == 2


def test_smtp_smuggling_over_a_socket(tmp_path: Path) -> None:
    """LF "." LF ends no DATA over a real connection: the would-be second transaction is
    text, the whole message refused 550 with nothing stored; a bare LF in a command is
    500 and a close."""
    m = RunningMail(tmp_path / "data", max_message_size=LIMIT, host="127.0.190.1")
    try:
        m.add_user(ALICE, PW)
        c = Raw(m.port("smtp"), m.host)
        c.line()
        c.send(
            b"EHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
            b"Subject: a\r\n\r\nhi\n.\nMAIL FROM:<ceo@example.org>\r\n"
            b"RCPT TO:<alice@example.org>\r\nDATA\r\nSubject: forged\r\n\r\nx\r\n.\r\n"
        )
        assert [c.reply()[:4] for _ in range(5)] == [b"250 ", b"250 ", b"250 ", b"354 ", b"550 "]
        assert stored(m) == 0
        c.send(b"NOOP\nQUIT\r\n")
        assert c.reply().startswith(b"500 5.5.2")
        assert c.line() == b""
        c.close()
        assert m.service.client_errors.status().get("smtp_bare_newlines") == 2
    finally:
        m.stop()


def test_pop3_bad_input(mail: RunningMail) -> None:
    """Wrong password, bad numbers and unknown commands get -ERR; a long line closes."""
    p = poplib.POP3("127.0.0.1", mail.port("pop3"), timeout=10)
    p.user(ALICE)
    with pytest.raises(poplib.error_proto):
        p.pass_("wrong")
    with pytest.raises(poplib.error_proto):
        p.stat()  # not logged in
    p.user(ALICE)
    p.pass_(PW)
    for call in (
        lambda: p.retr(1),
        lambda: p.dele(7),
        lambda: p.top(1, -1),
        lambda: p._shortcmd("XYZZY"),
    ):
        with pytest.raises(poplib.error_proto):
            call()
    p.quit()
    c = Raw(mail.port("pop3"))
    c.line()
    c.send(b"USER " + b"a" * 2000 + b"\r\n")
    assert c.line().startswith(b"-ERR")
    assert c.line() == b""
    c.close()


def test_imap_bad_input(mail: RunningMail) -> None:
    """Wrong password NO, garbage BAD, a huge APPEND NO [TOOBIG], an overlong line closes."""
    i = imaplib.IMAP4("127.0.0.1", mail.port("imap"), timeout=10)
    with pytest.raises(imaplib.IMAP4.error):
        i.login(ALICE, "wrong")
    i.login(ALICE, PW)
    assert i.select("NoSuchBox")[0] == "NO"
    i.select("INBOX", readonly=True)
    assert i.store("1", "+FLAGS", "(\\Seen)")[0] == "NO"
    i.select("INBOX")
    with pytest.raises(imaplib.IMAP4.error):
        i.fetch("1", "(FLAGS)")  # no message 1: BAD, as Dovecot answers
    with pytest.raises(imaplib.IMAP4.error):
        i.fetch("x:y", "(FLAGS)")
    with pytest.raises(imaplib.IMAP4.error):
        i.xatom("FROB")
    i.logout()
    c = Raw(mail.port("imap"))
    c.line()
    c.send(b"a LOGIN alice pw-alice\r\n")
    c.line()
    c.send(b"b APPEND INBOX {%d}\r\n" % (LIMIT + 1))
    assert c.line().startswith(b"b NO [TOOBIG]")  # RFC 7889, before any data is sent
    c.send(b"c NOOP " + b"x" * 70000 + b"\r\n")  # over the 64 KiB line limit
    replies = [c.line()]
    while replies[-1]:
        replies.append(c.line())
    assert replies[0].startswith((b"* BAD", b"c BAD")), replies
    assert any(r.startswith(b"* BYE") for r in replies), replies
    c.close()
    assert stored(mail) == 0
    works(mail)
