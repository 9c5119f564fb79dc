"""POP3: twisted.mail's ``POP3`` over a snapshot of the user's INBOX.

Changes to the stock protocol (26.10):

- RETR/TOP send the stored octets with correct dot-stuffing (stock adds a CR
  to every LF, so CRLF-stored mail became ``\\r\\r\\n``, and misses dots at
  chunk starts);
- STLS (absent from stock) when a certificate is configured; CAPA lists what
  is really offered (stock advertises ``PIPELINE`` and joke capabilities);
- DELE/LIST/UIDL of a bad number answer ``-ERR`` (stock raises);
- QUIT answers after the deletions are durable;
- failed logins answer ``-ERR [AUTH]``, throttled ones ``-ERR [SYS/TEMP]``
  (RFC 3206);
- 512-octet command lines (``-ERR`` and close), no APOP timestamp (passwords
  are scrypt hashes); idle timeouts on the injected clock.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.mail import pop3
from zope.interface import implementer

from .retrieval import UserMail
from .values import INBOX, Digest


def dot_stuff(body: bytes, max_lines: int | None = None) -> bytes:
    """The POP3 multi-line payload of ``body`` (CRLF lines, leading dots doubled)."""
    head, sep, rest = body.partition(b"\r\n\r\n")
    if max_lines is not None:
        text_lines = rest.split(b"\r\n")[:max_lines] if sep else []
        body = head + sep + b"\r\n".join(text_lines) if sep else body
    lines = body.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)


@implementer(pop3.IMailbox)
class Pop3Mailbox:
    """The INBOX as it was at login; deletions applied at QUIT (RFC 1939 UPDATE)."""

    def __init__(self, mail: UserMail, uidvalidity: int, digests: list[Digest]) -> None:
        self.mail = mail
        self.uidvalidity = uidvalidity
        self.digests = digests
        self.deleted: set[int] = set()

    def _check(self, index: int) -> Digest:
        if not 0 <= index < len(self.digests):
            raise ValueError("no such message")
        return self.digests[index]

    def listMessages(self, index: int | None = None) -> Any:
        if index is None:
            return [0 if i in self.deleted else d.size for i, d in enumerate(self.digests)]
        d = self._check(index)
        return 0 if index in self.deleted else d.size

    def getMessage(self, index: int) -> Deferred[io.BytesIO]:
        return self.body_of(index).addCallback(io.BytesIO)

    def body_of(self, index: int) -> Deferred[bytes]:
        d = self._check(index)
        return self.mail.fetch(INBOX, [d]).addCallback(lambda bodies: bodies[d.uid])

    def getUidl(self, index: int) -> bytes:
        d = self._check(index)
        return b"%d.%d" % (self.uidvalidity, d.uid)

    def deleteMessage(self, index: int) -> None:
        self._check(index)
        self.deleted.add(index)

    def undeleteMessages(self) -> None:
        self.deleted.clear()

    def sync(self) -> Deferred[object]:
        if not self.deleted:
            return succeed(None)
        doomed = [self.digests[i] for i in sorted(self.deleted)]
        self.deleted.clear()
        d: Deferred[Any] = self.mail.delete(INBOX, doomed)
        return d


class MailPOP3(pop3.POP3):
    """POP3 with the fixes in the module docstring."""

    MAX_LENGTH = 512
    AUTH_CMDS = [*pop3.POP3.AUTH_CMDS, b"STLS"]

    def __init__(self, clock: Any, context_factory: Any = None) -> None:
        self.clock = clock
        self.ctx = context_factory
        self.magic = b"yimaporc POP3 ready"

    @property
    def _t(self) -> Any:
        return self.transport

    def callLater(self, period: float, func: Callable[[], object]) -> Any:
        """TimeoutMixin's timer, on the injected clock."""
        return self.clock.callLater(period, func)

    def connectionMade(self) -> None:
        if hasattr(self._t, "setTcpNoDelay"):
            self._t.setTcpNoDelay(True)
        super().connectionMade()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.failResponse(b"line too long")
        self._t.loseConnection()

    def _ebMailbox(self, failure: Any) -> Any:
        """RFC 3206 codes: ``[AUTH]`` for bad credentials, ``[SYS/TEMP]`` when throttled."""
        from twisted.cred.error import LoginDenied, LoginFailed, UnauthorizedLogin

        from .throttle import LoginThrottled
        from .values import MailUnavailable

        if failure.check(LoginThrottled):
            self.failResponse(b"[SYS/TEMP] Too many failed logins, try again later")
        elif failure.check(MailUnavailable):
            self.failResponse(b"[SYS/TEMP] Part of the mailbox is out of reach, try again later")
        elif failure.check(UnauthorizedLogin, LoginDenied, LoginFailed):
            self.failResponse(b"[AUTH] Authentication failed")
        else:
            return failure  # not a login failure: stock's _ebUnexpected
        return None

    def _tls_active(self) -> bool:
        from twisted.internet.interfaces import ISSLTransport

        return ISSLTransport.providedBy(self.transport)

    def listCapabilities(self) -> list[bytes]:
        caps = [b"TOP", b"USER", b"UIDL", b"IMPLEMENTATION yimaporc"]
        if self.ctx is not None and not self._tls_active() and not self.mbox:
            caps.append(b"STLS")
        return caps

    def do_STLS(self) -> None:
        if self.ctx is None or self.mbox or self._tls_active():
            self.failResponse(b"STLS not available")
            return
        self.successResponse(b"Begin TLS negotiation")
        self._t.startTLS(self.ctx)

    def _mailbox(self) -> Pop3Mailbox:
        assert isinstance(self.mbox, Pop3Mailbox)
        return self.mbox

    def _number(self, i: bytes) -> int | None:
        try:
            n = int(i) - 1
            self._mailbox()._check(n)
        except ValueError:
            self.failResponse(b"no such message")
            return None
        return n

    def do_DELE(self, i: bytes) -> None:
        n = self._number(i)
        if n is None:
            return
        if n in self._mailbox().deleted:
            self.failResponse(b"message already deleted")
            return
        self._mailbox().deleteMessage(n)
        self.successResponse(b"message deleted")

    def _send(self, i: bytes, lines: int | None) -> Deferred[None] | None:
        n = self._number(i)
        if n is None:
            return None
        box = self._mailbox()
        if n in box.deleted:
            self.failResponse(b"message deleted")
            return None

        def send(body: bytes) -> None:
            self._highest = max(self._highest, n + 1)
            head = b"+OK %d octets\r\n" % len(body)
            self._t.write(head + dot_stuff(body, lines) + b".\r\n")

        def failed(f: Any) -> None:
            self.failResponse(b"cannot read message")

        d = box.body_of(n).addCallbacks(send, failed)
        return self._longOperation(d)  # type: ignore[no-any-return]

    def do_RETR(self, i: bytes) -> Any:
        return self._send(i, None)

    def do_TOP(self, i: bytes, size: bytes) -> Any:
        try:
            lines = int(size)
            if lines < 0:
                raise ValueError
        except ValueError:
            self.failResponse(b"bad line count")
            return None
        return self._send(i, lines)

    def do_QUIT(self) -> None:
        d = maybeDeferred(self.mbox.sync) if self.mbox else succeed(None)

        def bye(_: object) -> None:
            self.successResponse(b"bye")
            self._t.loseConnection()

        def failed(f: Any) -> None:
            self.failResponse(b"some deleted messages not removed")
            self._t.loseConnection()

        d.addCallbacks(bye, failed)
