"""STARTTLS / STLS with a configured certificate; AUTH only under TLS; relaying only when authenticated."""

from __future__ import annotations

import imaplib
import poplib
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from yimaporc.porcupine.outbound import Routes
from yimaporc.porcupine.testing import RunningMail
from yimaporc.testing.certs import client_context, make_cert

ALICE, PW = "alice@example.org", "pw-alice"


@pytest.fixture
def mail(tmp_path: Path) -> Iterator[RunningMail]:
    """A service with a certificate and partner.net as a relay domain."""
    cert, key = make_cert(tmp_path)
    # partner.net's MX is a closed local port: relayed mail stays queued, retried.
    routes = Routes({"partner.net": ("127.0.0.1", 9)})
    m = RunningMail(
        tmp_path / "data", tls_cert=cert, tls_key=key, relay_domains=("partner.net",), routes=routes
    )
    m.add_user(ALICE, PW)
    yield m
    m.stop()


def test_smtp_starttls_then_auth_then_relay(mail: RunningMail) -> None:
    """AUTH appears only after STARTTLS; wrong password 535; authenticated relay is spooled."""
    with smtplib.SMTP("127.0.0.1", mail.port("smtp"), timeout=10) as s:
        s.ehlo()
        assert s.has_extn("starttls") and not s.has_extn("auth")
        assert s.docmd("AUTH", "PLAIN AGFsaWNlAHB3")[0] == 538
        assert s.mail("a@b.org")[0] == 250
        assert s.rcpt("bob@partner.net")[0] == 550  # not authenticated: no relay
        s.rset()
        s.starttls(context=client_context())
        s.ehlo()
        assert set(s.esmtp_features["auth"].split()) == {"LOGIN", "PLAIN"}
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login(ALICE, "wrong")
    with smtplib.SMTP("127.0.0.1", mail.port("smtp"), timeout=10) as s:
        s.starttls(context=client_context())
        s.login("alice", PW)
        assert s.sendmail(ALICE, ["bob@partner.net", ALICE], b"Subject: r\r\n\r\nx\r\n") == {}
        s.mail(ALICE)
        assert s.rcpt("eve@gmail.com")[0] == 550  # relaying only to the configured domains
    assert len(mail.service.spool.pending()) == 1  # queued (the remote refuses connections)
    assert len(mail.service.fragment_store.digests(ALICE, "INBOX")) == 1


def test_smtp_auth_login_mechanism(mail: RunningMail) -> None:
    """AUTH LOGIN works under TLS too."""
    with smtplib.SMTP("127.0.0.1", mail.port("smtp"), timeout=10) as s:
        s.starttls(context=client_context())
        s.ehlo()
        s.user, s.password = ALICE, PW
        assert s.auth("LOGIN", s.auth_login)[0] == 235


def test_pop3_stls(mail: RunningMail) -> None:
    """CAPA offers STLS; after it the login works over TLS."""
    p = poplib.POP3("127.0.0.1", mail.port("pop3"), timeout=10)
    assert "STLS" in p.capa()
    p.stls(context=client_context())
    p.user(ALICE)
    p.pass_(PW)
    assert p.stat() == (0, 0)
    p.quit()


def test_imap_starttls(mail: RunningMail) -> None:
    """Before STARTTLS neither LOGIN nor AUTHENTICATE is allowed; after it LOGIN works."""
    i = imaplib.IMAP4("127.0.0.1", mail.port("imap"), timeout=10)
    assert "STARTTLS" in i.capabilities and "LOGINDISABLED" in i.capabilities
    assert not any(c.startswith("AUTH=") for c in i.capabilities)
    with pytest.raises(imaplib.IMAP4.error):
        i.login(ALICE, PW)
    with pytest.raises(imaplib.IMAP4.error):
        i.authenticate("PLAIN", lambda _: f"\0{ALICE}\0{PW}".encode())
    i.starttls(ssl_context=client_context())
    assert i.login(ALICE, PW)[0] == "OK"
    i.logout()
