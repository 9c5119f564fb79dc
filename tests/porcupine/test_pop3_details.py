"""POP3 details clients rely on: RFC 1939 STAT/LIST/UIDL, SASL PLAIN, CAPA, no cleartext logins."""

from __future__ import annotations

import base64
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.mail import pop3

from yimaporc.porcupine._pop3 import MailPOP3, Pop3Mailbox
from yimaporc.porcupine.values import Digest


def digests(*sizes: int) -> list[Digest]:
    """Messages of these sizes, UIDs 10, 11, ..."""
    return [Digest(10 + k, f"k{k}", size, (), 0.0, "n1") for k, size in enumerate(sizes)]


class Portal:
    """Logs alice in with 'pw' (a mailbox of three messages); anything else fails."""

    def __init__(self) -> None:
        self.logins: list[tuple[bytes, bytes]] = []

    def login(self, creds: Any, mind: Any, *ifaces: Any) -> Deferred[Any]:
        self.logins.append((creds.username, creds.password))
        if (creds.username, creds.password) != (b"alice", b"pw"):
            return fail(UnauthorizedLogin())
        box = Pop3Mailbox(None, 7, digests(100, 200, 300))  # type: ignore[arg-type]
        return succeed((pop3.IMailbox, box, lambda: None))


def session(tls_configured: bool = False, allow_plaintext: bool = False) -> tuple[MailPOP3, StringTransport, Portal]:  # fmt: skip
    """A POP3 server on a memory transport (greeting already read)."""
    p = MailPOP3(Clock(), object() if tls_configured else None, allow_plaintext=allow_plaintext)
    portal = Portal()
    p.portal = portal  # type: ignore[assignment]
    t = StringTransport()
    p.makeConnection(t)
    t.clear()
    return p, t, portal


def talk(p: MailPOP3, t: StringTransport, *lines: bytes) -> list[bytes]:
    """Send ``lines``; the reply lines."""
    t.clear()
    for line in lines:
        p.dataReceived(line + b"\r\n")
    return [x for x in t.value().split(b"\r\n") if x]


def test_stat_list_uidl_leave_out_deleted_and_uidl_n_names_the_message() -> None:
    """After DELE 2: STAT 2 400, LIST/UIDL list 1 and 3 only; UIDL 3 is '+OK 3 7.12'."""
    p, t, _ = session()
    talk(p, t, b"USER alice", b"PASS pw")
    assert talk(p, t, b"STAT") == [b"+OK 3 600"]
    assert talk(p, t, b"DELE 2") == [b"+OK message deleted"]
    assert talk(p, t, b"STAT") == [b"+OK 2 400"]
    assert talk(p, t, b"LIST") == [b"+OK ", b"1 100", b"3 300", b"."]
    assert talk(p, t, b"UIDL") == [b"+OK ", b"1 7.10", b"3 7.12", b"."]
    assert talk(p, t, b"UIDL 3") == [b"+OK 3 7.12"]
    assert talk(p, t, b"LIST 1") == [b"+OK 1 100"]
    assert talk(p, t, b"UIDL 2")[0].startswith(b"-ERR")
    assert talk(p, t, b"LIST 2")[0].startswith(b"-ERR")
    assert talk(p, t, b"RSET", b"STAT")[-1] == b"+OK 3 600"


def test_capa_lists_sasl_resp_codes_and_pipelining() -> None:
    """CAPA: SASL PLAIN, RESP-CODES, AUTH-RESP-CODE, PIPELINING, USER, UIDL, TOP."""
    p, t, _ = session()
    caps = talk(p, t, b"CAPA")
    for cap in (b"SASL PLAIN", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING", b"USER",
                b"UIDL", b"TOP"):  # fmt: skip
        assert cap in caps, caps


def plain(user: bytes, password: bytes, authzid: bytes = b"") -> bytes:
    return base64.b64encode(authzid + b"\0" + user + b"\0" + password)


def test_auth_plain_with_and_without_an_initial_response() -> None:
    """AUTH PLAIN <b64> logs in; AUTH PLAIN, '+ ', <b64> too; bad password -ERR [AUTH]."""
    p, t, portal = session()
    assert talk(p, t, b"AUTH") == [b"+OK ", b"PLAIN", b"."]
    assert talk(p, t, b"AUTH PLAIN " + plain(b"alice", b"nope"))[0].startswith(b"-ERR [AUTH]")
    assert talk(p, t, b"AUTH PLAIN " + plain(b"alice", b"pw"))[0].startswith(b"+OK")
    assert talk(p, t, b"STAT") == [b"+OK 3 600"]
    p2, t2, _ = session()
    assert talk(p2, t2, b"AUTH PLAIN") == [b"+ "]
    assert talk(p2, t2, plain(b"alice", b"pw"))[0].startswith(b"+OK")
    p3, t3, _ = session()
    assert talk(p3, t3, b"AUTH PLAIN", b"*")[0].startswith(b"+ ")
    assert talk(p3, t3, b"AUTH PLAIN !!!notbase64")[0].startswith(b"-ERR")
    assert talk(p3, t3, b"AUTH PLAIN " + plain(b"alice", b"pw", b"bob"))[0].startswith(b"-ERR")
    assert (b"alice", b"nope") in portal.logins


def test_cleartext_logins_refused_when_a_certificate_is_configured() -> None:
    """With TLS on offer and no STLS yet: no USER/SASL in CAPA, USER/PASS/AUTH -ERR [AUTH];
    --allow-plaintext-auth lets them through."""
    p, t, portal = session(tls_configured=True)
    caps = talk(p, t, b"CAPA")
    assert b"STLS" in caps and b"USER" not in caps and b"SASL PLAIN" not in caps
    for line in (b"USER alice", b"PASS pw", b"AUTH PLAIN " + plain(b"alice", b"pw")):
        assert talk(p, t, line)[0].startswith(b"-ERR [AUTH] Plaintext login disabled")
    assert portal.logins == []
    p2, t2, _ = session(tls_configured=True, allow_plaintext=True)
    assert talk(p2, t2, b"USER alice", b"PASS pw")[-1].startswith(b"+OK")


def test_last_is_refused_so_keep_mode_clients_use_uidl() -> None:
    """LAST (RFC 1460, dropped by RFC 1939) is -ERR, also after a DELE: fetchmail's default
    keep mode asks LAST first and, told "+OK 0", fetched every kept message again on every
    poll; on -ERR it tracks messages by UIDL, as with Dovecot."""
    p, t, _ = session()
    talk(p, t, b"USER alice", b"PASS pw")
    assert talk(p, t, b"LAST")[0].startswith(b"-ERR")
    talk(p, t, b"DELE 2")
    assert talk(p, t, b"LAST")[0].startswith(b"-ERR")
    assert p.errors.counts["pop3.unknown_command"] == 2, p.errors.counts
    assert talk(p, t, b"STAT") == [b"+OK 2 400"]
