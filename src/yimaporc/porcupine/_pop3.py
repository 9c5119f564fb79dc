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
- STAT, LIST and UIDL leave out messages marked deleted, ``UIDL n`` answers
  ``+OK n uid`` (stock: count and list deleted ones, ``+OK uid``);
- SASL ``AUTH PLAIN`` (RFC 5034, with or without an initial response); CAPA
  lists SASL, RESP-CODES, AUTH-RESP-CODE and PIPELINING;
- with a certificate configured, USER/PASS/AUTH before STLS are refused
  (``-ERR [AUTH]``) unless plaintext logins are allowed;
- no LAST (stock: ``+OK 0`` always, which made fetchmail's keep mode fetch every
  message again on each poll; ``-ERR`` makes it use UIDL);
- 512-octet command lines (``-ERR`` and close), no APOP timestamp (passwords
  are scrypt hashes); idle timeouts on the injected clock;
- hostile input (issue 13): commands are checked (known, allowed in this
  state, right number of arguments) before stock code runs, so a client's
  mistake is ``-ERR`` and a count in :class:`~._guard.ClientErrors`, never a
  logged traceback (stock logged one per pre-login command); at most
  :attr:`MailPOP3.MAX_PIPELINE` commands wait behind a running one before the
  server stops reading (:class:`~._guard.GatedLines`).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.mail import pop3
from twisted.python.failure import Failure
from zope.interface import implementer

from ..cluster.rpc import PeerUnavailable
from ._guard import ClientErrors, GatedLines
from .retrieval import UserMail
from .values import INBOX, Digest


def dot_stuff(body: bytes, max_lines: int | None = None) -> bytes:
    """The POP3 multi-line payload of ``body`` (CRLF lines, leading dots doubled)."""
    if max_lines is None:
        return _stuff_whole(body)
    head, sep, rest = body.partition(b"\r\n\r\n")
    if max_lines is not None:
        text_lines = rest.split(b"\r\n")[:max_lines] if sep else []
        body = head + sep + b"\r\n".join(text_lines) if sep else body
    lines = body.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)


def _stuff_whole(body: bytes) -> bytes:
    """:func:`dot_stuff` of a whole message in C-speed passes: the body itself (no
    copy) when no line starts with a dot and it ends with CRLF, as stored mail does."""
    if not body:
        return b""
    if b"\r\n." in body:
        body = body.replace(b"\r\n.", b"\r\n..")
    if body[:1] == b".":
        body = b"." + body
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body


@implementer(pop3.IMailbox)
class Pop3Mailbox:
    """The INBOX as it was at login; deletions applied at QUIT (RFC 1939 UPDATE).

    Read-ahead: a RETR/TOP of a message not read ahead fetches it together with the
    next messages not marked deleted, up to :attr:`READ_AHEAD_BYTES` and
    :attr:`READ_AHEAD_MESSAGES`, in one :meth:`UserMail.fetch` (one thread-pool job
    or RPC per node holding them instead of one per command); the others wait in
    the session, each handed out once.  A client reading its mail in order (what
    every POP3 client does) costs one fetch per window."""

    #: Bytes of messages (their sizes in the listing) a read-ahead window may hold.
    READ_AHEAD_BYTES = 256 * 1024
    #: Messages a read-ahead window may hold.
    READ_AHEAD_MESSAGES = 16

    def __init__(self, mail: UserMail, uidvalidity: int, digests: list[Digest]) -> None:
        self.mail = mail
        self.uidvalidity = uidvalidity
        self.digests = digests
        self.deleted: set[int] = set()
        #: Bodies fetched ahead, by 0-based index (each popped when sent).
        self.ahead: dict[int, bytes] = {}
        #: Fetches made (tests count them).
        self.fetches = 0

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
        body = self.ahead.pop(index, None)
        if body is not None:
            return succeed(body)
        window = self._window(index)
        self.fetches += 1

        def got(bodies: dict[int, bytes]) -> bytes:
            for i in window[1:]:
                b = bodies.get(self.digests[i].uid)
                if b is not None and i not in self.deleted:
                    self.ahead[i] = b
            return bodies[d.uid]

        return self.mail.fetch(INBOX, [self.digests[i] for i in window]).addCallback(got)

    def _window(self, index: int) -> list[int]:
        """``index`` and the following messages to fetch with it (not deleted, not
        fetched ahead already, within the window's bounds)."""
        out = [index]
        size = self.digests[index].size
        for i in range(index + 1, len(self.digests)):
            if len(out) >= self.READ_AHEAD_MESSAGES:
                break
            if i in self.deleted or i in self.ahead:
                continue
            size += self.digests[i].size
            if size > self.READ_AHEAD_BYTES:
                break
            out.append(i)
        return out

    def getUidl(self, index: int) -> bytes:
        d = self._check(index)
        return b"%d.%d" % (self.uidvalidity, d.uid)

    def deleteMessage(self, index: int) -> None:
        self._check(index)
        self.deleted.add(index)
        self.ahead.pop(index, None)

    def undeleteMessages(self) -> None:
        self.deleted.clear()

    def sync(self) -> Deferred[object]:
        if not self.deleted:
            return succeed(None)
        doomed = [self.digests[i] for i in sorted(self.deleted)]
        self.deleted.clear()
        d: Deferred[Any] = self.mail.delete(INBOX, doomed)
        return d


#: Arguments each command takes: (least, most); None: any number (PASS).
_ARITY: dict[bytes, tuple[int, int | None]] = {
    b"CAPA": (0, 0), b"USER": (1, 1), b"PASS": (1, None), b"AUTH": (0, 2), b"QUIT": (0, 0),
    b"STLS": (0, 0), b"STAT": (0, 0), b"LIST": (0, 1), b"UIDL": (0, 1), b"RETR": (1, 1),
    b"TOP": (2, 2), b"DELE": (1, 1), b"NOOP": (0, 0), b"RSET": (0, 0),
}  # fmt: skip
# No LAST (RFC 1460, dropped by RFC 1939; Dovecot has none): stock answered "+OK 0"
# whatever was read before, so fetchmail's default keep mode, which asks LAST before
# UIDL, fetched every kept message again on every poll.  Unknown, it is -ERR and
# fetchmail tracks messages by UIDL.


class MailPOP3(GatedLines, pop3.POP3):
    """POP3 with the fixes in the module docstring."""

    MAX_LENGTH = 512
    #: Commands held behind a running one before the server stops reading.
    MAX_PIPELINE = 16
    AUTH_CMDS = [b"CAPA", b"USER", b"PASS", b"AUTH", b"QUIT", b"STLS"]

    def __init__(
        self,
        clock: IReactorTime,
        context_factory: Any = None,
        errors: ClientErrors | None = None,
        allow_plaintext: bool = False,
    ) -> None:
        self.clock = clock
        self.ctx = context_factory
        #: USER/PASS and AUTH without TLS, when a certificate is configured.
        self.allow_plaintext = allow_plaintext
        self.magic = b"yimaporc POP3 ready"
        self.errors = errors if errors is not None else ClientErrors(clock.seconds)

    @property
    def _t(self) -> Any:
        return self.transport

    def callLater(self, period: float, func: Callable[[], object]) -> Any:
        """TimeoutMixin's timer, on the injected clock."""
        return self.clock.callLater(period, func)

    _gone = False

    def setTimeout(self, period: float | None) -> Any:
        """No idle timer once the connection is gone (a RETR finishing after the
        client left restored it)."""
        return super().setTimeout(None if self._gone else period)

    def connectionMade(self) -> None:
        if hasattr(self._t, "setTcpNoDelay"):
            self._t.setTcpNoDelay(True)
        self._gate_start()
        self.errors.opened("pop3")
        super().connectionMade()

    def connectionLost(self, reason: Any = None) -> None:
        """Drop the INBOX snapshot and queued commands."""
        if not self._gone:
            self.errors.closed("pop3")
        self._gone = True
        super().connectionLost(reason)
        self.blocked = None  # type: ignore[assignment]
        self.mbox = None
        self._inbuf = bytearray()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.errors.client("pop3", "line_too_long")
        self.failResponse(b"line too long")
        self._t.loseConnection()

    def _ebMailbox(self, failure: Failure) -> Any:
        """RFC 3206 codes: ``[AUTH]`` for bad credentials, ``[SYS/TEMP]`` when throttled
        or the mail is out of reach."""
        from twisted.cred.error import LoginDenied, LoginFailed, UnauthorizedLogin

        from .throttle import LoginThrottled
        from .values import MailUnavailable

        if failure.check(LoginThrottled):
            self.failResponse(b"[SYS/TEMP] Too many failed logins, try again later")
        elif failure.check(MailUnavailable):
            self.failResponse(b"[SYS/TEMP] Part of the mailbox is out of reach, try again later")
        elif failure.check(PeerUnavailable):
            # The user's home node (or its disk: StorageFull) does not answer: a count
            # and a warning, as for commands; stock answered "Server error" with a
            # logged traceback.
            self.errors.server("pop3", failure, "login")
            self.failResponse(b"[SYS/TEMP] The mailbox is out of reach, try again later")
        elif failure.check(UnauthorizedLogin, LoginDenied, LoginFailed):
            self.failResponse(b"[AUTH] Authentication failed")
        else:
            return failure  # not a login failure: stock's _ebUnexpected
        return None

    def _too_much_input(self) -> None:
        self.errors.client("pop3", "too_much_input")
        self.failResponse(b"too many commands waiting")
        self._t.loseConnection()

    # --- dispatch: checked before stock code can raise ---------------------------------

    def _refuse(self, kind: str, message: bytes) -> None:
        self.errors.client("pop3", kind)
        self.failResponse(message)

    def lineReceived(self, line: bytes) -> None:
        super().lineReceived(line)
        if self.blocked is not None and len(self.blocked) >= self.MAX_PIPELINE:
            self._hold("pipeline")

    def state_COMMAND(self, line: bytes) -> None:
        """Check the command, then dispatch it (stock: a logged traceback per mistake)."""
        command, _, rest = line.partition(b" ")
        command = command.upper()
        self.errors.command("pop3")
        if command not in _ARITY or not hasattr(self, "do_" + command.decode("ascii")):
            self._refuse("unknown_command", b"unknown command")
            return
        if command == b"PASS":
            args: list[bytes] = [rest] if rest else []
        else:
            args = rest.split() if rest.strip() else []
        least, most = _ARITY[command]
        if len(args) < least or (most is not None and len(args) > most):
            self._refuse("bad_arguments", b"wrong number of arguments")
            return
        if self.blocked is not None:
            self.blocked.append((command, tuple(args)))
            return
        self._run(command, args)

    def _run(self, command: bytes, args: Any) -> None:
        if not self.mbox and command not in self.AUTH_CMDS:
            self._refuse("not_authenticated", b"log in first")
            return
        if self.mbox and command in (b"USER", b"PASS", b"AUTH"):
            self._refuse("bad_state", b"already logged in")
            return
        try:
            self.processCommand(command, *args)
        except Exception:
            self.errors.server("pop3", Failure(), command.decode("ascii"))
            self.failResponse(b"server error")

    def state_AUTH(self, line: bytes) -> None:
        """A SASL response; a client's garbage is -ERR without a traceback."""
        try:
            super().state_AUTH(line)
        except Exception:
            self.state = "COMMAND"
            self._refuse("bad_auth_response", b"invalid AUTH response")

    def _unblock(self, _: object) -> None:
        commands, self.blocked = self.blocked, None  # type: ignore[assignment]
        while commands and self.blocked is None:
            command, args = commands.pop(0)
            self._run(command, args)
        if self.blocked is not None and commands:
            self.blocked.extend(commands)
        if self.blocked is None or len(self.blocked) < self.MAX_PIPELINE:
            self._release("pipeline")

    def _tls_active(self) -> bool:
        from twisted.internet.interfaces import ISSLTransport

        return ISSLTransport.providedBy(self.transport)

    def _cleartext_refused(self) -> bool:
        """True when a password may not be sent now: a certificate is configured,
        this connection is not under TLS, and plaintext logins are not allowed."""
        return self.ctx is not None and not self._tls_active() and not self.allow_plaintext

    def listCapabilities(self) -> list[bytes]:
        caps = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        if not self.mbox and not self._cleartext_refused():
            caps += [b"USER", b"SASL PLAIN"]
        if self.ctx is not None and not self._tls_active() and not self.mbox:
            caps.append(b"STLS")
        return [*caps, b"IMPLEMENTATION yimaporc"]

    def _may_send_password(self) -> bool:
        if self._cleartext_refused():
            self._refuse("cleartext_login", b"[AUTH] Plaintext login disabled, use STLS first")
            return False
        return True

    def do_USER(self, user: bytes) -> None:
        if self._may_send_password():
            super().do_USER(user)

    def do_PASS(self, password: bytes, *words: bytes) -> None:
        if self._may_send_password():
            super().do_PASS(password, *words)

    def do_AUTH(self, mechanism: bytes | None = None, initial: bytes | None = None) -> None:
        """SASL (RFC 5034), PLAIN only; with or without an initial response."""
        if mechanism is None:
            self.successResponse(b"")
            self._t.write(b"PLAIN\r\n.\r\n")
            return
        if mechanism.upper() != b"PLAIN":
            self._refuse("bad_arguments", b"unsupported SASL mechanism")
            return
        if not self._may_send_password():
            return
        if initial is None:
            self.state = "AUTH_PLAIN"
            self._t.write(b"+ \r\n")
            return
        self._plain(initial)

    def state_AUTH_PLAIN(self, line: bytes) -> None:
        """The continuation of ``AUTH PLAIN`` without an initial response."""
        self.state = "COMMAND"
        if line.strip() == b"*":
            self._refuse("auth_cancelled", b"AUTH cancelled")
            return
        self._plain(line.strip())

    def _plain(self, response: bytes) -> None:
        import base64
        import binascii

        try:
            parts = base64.b64decode(response, validate=True).split(b"\0")
        except (binascii.Error, ValueError):
            parts = []
        if len(parts) != 3 or not parts[1]:
            self._refuse("bad_auth_response", b"invalid AUTH response")
            return
        authzid, user, password = parts
        if authzid and authzid != user:
            self._refuse("bad_auth_response", b"[AUTH] authorization identity not allowed")
            return
        d = maybeDeferred(self.authenticateUserPASS, user, password)
        d.addCallbacks(self._cbMailbox, self._ebMailbox, callbackArgs=(user,))
        d.addErrback(self._ebUnexpected)

    def do_STLS(self) -> None:
        if self.ctx is None or self.mbox or self._tls_active():
            self._refuse("refused", b"STLS not available")
            return
        self.successResponse(b"Begin TLS negotiation")
        self._t.startTLS(self.ctx)
        self._drop_buffered()  # plaintext sent after STLS never runs inside TLS

    def _mailbox(self) -> Pop3Mailbox:
        assert isinstance(self.mbox, Pop3Mailbox)
        return self.mbox

    def _number(self, i: bytes) -> int | None:
        try:
            n = int(i) - 1
            self._mailbox()._check(n)
        except ValueError:
            self._refuse("no_such_message", b"no such message")
            return None
        return n

    def _live(self, i: bytes) -> int | None:
        """The 0-based index of message ``i`` if it exists and is not marked deleted."""
        n = self._number(i)
        if n is not None and n in self._mailbox().deleted:
            self._refuse("no_such_message", b"message deleted")
            return None
        return n

    def _listing(self, line: Callable[[int], bytes]) -> None:
        """A multi-line listing of the messages not marked deleted (RFC 1939)."""
        box = self._mailbox()
        rows = b"".join(line(n) + b"\r\n" for n in range(len(box.digests)) if n not in box.deleted)
        self.successResponse(b"")
        self._t.write(rows + b".\r\n")

    def do_STAT(self) -> None:
        """``+OK count octets`` of the messages not marked deleted (RFC 1939 5)."""
        box = self._mailbox()
        live = [d.size for n, d in enumerate(box.digests) if n not in box.deleted]
        self.successResponse(b"%d %d" % (len(live), sum(live)))

    def do_LIST(self, i: bytes | None = None) -> None:
        box = self._mailbox()
        if i is None:
            self._listing(lambda n: b"%d %d" % (n + 1, box.digests[n].size))
        elif (n := self._live(i)) is not None:
            self.successResponse(b"%d %d" % (n + 1, box.digests[n].size))

    def do_UIDL(self, i: bytes | None = None) -> None:
        box = self._mailbox()
        if i is None:
            self._listing(lambda n: b"%d %s" % (n + 1, box.getUidl(n)))
        elif (n := self._live(i)) is not None:
            self.successResponse(b"%d %s" % (n + 1, box.getUidl(n)))

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
            # three pieces, no joined copy of the message here (the transport buffers them)
            self._t.writeSequence([head, dot_stuff(body, lines), b".\r\n"])

        def failed(f: Failure) -> None:
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
            self._refuse("bad_arguments", b"bad line count")
            return None
        return self._send(i, lines)

    def do_QUIT(self) -> None:
        d = maybeDeferred(self.mbox.sync) if self.mbox else succeed(None)

        def bye(_: object) -> None:
            self.successResponse(b"bye")
            self._t.loseConnection()

        def failed(f: Failure) -> None:
            self.failResponse(b"some deleted messages not removed")
            self._t.loseConnection()

        d.addCallbacks(bye, failed)
