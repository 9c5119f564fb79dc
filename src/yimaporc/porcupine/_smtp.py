"""ESMTP: twisted.mail's ``ESMTP`` with the limits and replies a real MTA needs.

Changes to the stock protocol (26.10):

- EHLO advertises SIZE <limit>, PIPELINING and 8BITMIME (stock: none of them),
  and AUTH PLAIN LOGIN only once TLS is up (a certificate must be configured);
- ``MAIL FROM:<..> SIZE=n`` over the limit gets 552 at once, and a DATA that
  grows past it gets 552 at the end with nothing stored;
- pipelining is honoured: a command whose answer waits for a Deferred (RCPT
  looks the user up, the final dot waits for the durable store) holds the
  commands behind it, so replies come in order (stock would run DATA before
  the RCPT answer and reply 503);
- one message body is kept per transaction however many recipients it has,
  and stored once per recipient through the delivery proxy;
- NOOP, VRFY (252) and HELP exist; non-ASCII command words get 500 (stock
  raises and drops the connection);
- storage failures answer 451 (try again later), not the stock permanent 550;
- HELO/EHLO arguments must be printable ASCII without spaces, and MAIL/RCPT
  arguments free of control characters (CR, LF, NUL, ...): otherwise 501
  and the ``smtp_bad_arguments`` counter (stock copies the HELO text into
  the stored ``Received:`` line, so ``EHLO x\rX-Forged: 1`` forged a header);
- a bare CR or LF (SMTP smuggling's ``<LF>.<LF>`` and kin): lines split on CRLF
  only, so DATA ends only at CRLF.CRLF; message text with a bare one is read to
  there and refused (550 5.6.0, nothing stored), a command line with one is 500
  and a close; both counted (``smtp_bare_newlines``); stock stored it as sent;
- a malformed AUTH response is 501 (stock raises and drops the connection),
  AUTH failures are 535 5.7.8, throttled logins 454 4.7.0;
- bounded: 2,048-octet command lines (500), 64 KiB lines in DATA or the
  connection closes, 100 recipients (452), 20 errors (421 and close), a
  pipeline backlog of 200 commands or 64 KiB (421 and close); idle timeouts
  on the injected clock;
- the message text is taken in bulk: once DATA's first line has gone through
  the stock code (its header/body rule), each chunk of complete lines is
  un-dot-stuffed and stored with a few C-speed passes over the chunk instead
  of a Python call chain per line (:meth:`MailESMTP.dataReceived`); a chunk
  with anything unusual (bare CR or LF, an over-long line, the size limit
  reached) goes line by line through the stock code.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime, ISSLTransport
from twisted.logger import Logger
from twisted.mail import imap4, smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from ..cluster.rpc import PeerUnavailable
from ._guard import ClientErrors
from .delivery import Recipient, SmtpPolicy
from .interfaces import ISmtpDelivery, ISmtpSession
from .replication.shell import ReplicationStopped
from .throttle import LoginThrottled

log = Logger()

_SIZE = re.compile(rb"(?:^|\s)SIZE=(\d+)", re.I)
#: A HELO/EHLO argument: a domain or address literal, printable ASCII, no spaces.
_HELO_ARG = re.compile(rb"[\x21-\x7e]{1,255}")
#: Control characters (C0 and DEL) have no place in a MAIL or RCPT argument.
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
#: ``RCPT TO:<local>`` without a domain (RFC 5321's ``<Postmaster>``, or a user typing
#: just a name): qualified with the node's mail domain, as Postfix's myorigin does.
_UNQUALIFIED = re.compile(
    rb"(?P<head>\s*TO:\s*<)(?P<local>[^<>@\s\"\\]+)(?P<tail>>.*)", re.I | re.S
)
_ENHANCED = re.compile(rb"^[245]\.\d{1,3}\.\d{1,3}( |$)")
# RFC 2034/3463 codes for replies that carry none, by (code, command); then by code.
_DEFAULT_ENHANCED = {
    (250, b"MAIL"): b"2.1.0",
    (250, b"RCPT"): b"2.1.5",
    (251, None): b"2.1.5",
    (252, None): b"2.5.2",
    (221, None): b"2.0.0",
    (235, None): b"2.7.0",
    (250, None): b"2.0.0",
    (421, None): b"4.7.0",
    (450, None): b"4.2.0",
    (451, None): b"4.3.0",
    (452, None): b"4.3.1",
    (454, None): b"4.7.0",
    (500, None): b"5.5.2",
    (501, None): b"5.5.4",
    (502, None): b"5.5.1",
    (503, None): b"5.5.1",
    (504, None): b"5.5.4",
    (530, None): b"5.7.0",
    (535, None): b"5.7.8",
    (550, b"RCPT"): b"5.1.1",
    (551, None): b"5.1.6",
    (552, None): b"5.3.4",
    (553, None): b"5.1.3",
    (554, None): b"5.0.0",
    (555, None): b"5.5.4",
}
# MAIL FROM parameters understood (RFC 1870 SIZE, RFC 6152 BODY, RFC 4954 AUTH).
_BODY_VALUES = {b"7BIT", b"8BITMIME"}

Deliver = Callable[[bytes, list[Recipient], bytes], "Deferred[object]"]


class Transaction:
    """One DATA: a single body buffer shared by every recipient's message."""

    def __init__(self, sender: bytes, max_size: int, deliver: Deliver) -> None:
        self.sender = sender
        self.max_size = max_size
        self.deliver = deliver
        self.recipients: list[Recipient] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.writer: object | None = None
        self.waiters: list[Deferred[object]] = []
        self.started = False
        self.aborted = False

    def message(self, rcpt: Recipient) -> _RecipientMessage:
        """The IMessage twisted.mail feeds for one recipient."""
        self.recipients.append(rcpt)
        m = _RecipientMessage(self)
        if self.writer is None:
            self.writer = m
        return m

    def line(self, who: object, line: bytes) -> None:
        if who is not self.writer or self.aborted:
            return
        self.size += len(line) + 2
        if self.size > self.max_size:
            self.abort()
            # bytes: stock sends ``datafailed.resp`` as it is at the final dot
            raise smtp.SMTPServerError(552, b"5.3.4 Message size exceeds fixed limit")
        if b"\n" in line or b"\r" in line:
            # Only the Received: line (folded) gets here with them: client text with a
            # bare CR or LF is refused (MailESMTP._bare_data). CRLF line ends (RFC 5322).
            line = line.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        self.chunks.append(line)

    def lines(self, text: bytes) -> None:
        """Complete lines (``text`` ends with CRLF), already un-dot-stuffed, without
        bare CR or LF, within the size limit: what :meth:`line` keeps of each, once."""
        if self.aborted:
            return
        self.size += len(text)
        self.chunks.append(text[:-2])

    def eom(self) -> Deferred[object]:
        d: Deferred[object] = Deferred()
        self.waiters.append(d)
        if not self.started:
            self.started = True
            body = b"\r\n".join(self.chunks) + b"\r\n"
            self.chunks = []
            maybeDeferred(self.deliver, self.sender, self.recipients, body).addBoth(self._done)
        return d

    def _done(self, result: object) -> None:
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def abort(self) -> None:
        self.aborted = True
        self.chunks = []


@implementer(smtp.IMessage)
class _RecipientMessage:
    def __init__(self, txn: Transaction) -> None:
        self.txn = txn

    def lineReceived(self, line: bytes) -> None:
        self.txn.line(self, line)

    def eomReceived(self) -> Deferred[object]:
        return self.txn.eom()

    def connectionLost(self) -> None:
        self.txn.abort()


@implementer(ISmtpSession)
class MailESMTP(smtp.ESMTP):
    """ESMTP with the limits and fixes in the module docstring."""

    MAX_LENGTH = 65536
    MAX_COMMAND = 2048
    MAX_ERRORS = 20
    MAX_BACKLOG = 200
    MAX_BACKLOG_BYTES = 64 * 1024

    def __init__(
        self,
        clock: IReactorTime,
        policy: SmtpPolicy,
        deliver: Deliver,
        chal: Any = None,
        contextFactory: Any = None,
        counters: Counter[str] | None = None,
        stats: ClientErrors | None = None,
        on_stored: Callable[[float], object] | None = None,
    ) -> None:
        super().__init__(chal, contextFactory)
        #: Sessions and commands (``smtp`` or ``submission``), and the seconds from a
        #: message's final dot to its 250 (durable): hooks for /metrics.
        self.stats = stats
        self.on_stored = on_stored
        self._proto = "submission" if policy.submission else "smtp"
        self._dot_at: float | None = None
        self._opened = False
        self.clock = clock
        self.policy = policy
        self.deliver = deliver
        self.counters: Counter[str] = Counter() if counters is None else counters
        self.host = policy.hostname.encode("ascii", "replace")
        self._held: list[bytes] | None = None
        self._held_bytes = 0
        self._replied = False
        self._errors = 0
        self._txn: Transaction | None = None
        self._command = b""  # the current command word (for enhanced status codes)
        #: DATA's first line went through the stock code (its header/body rule): the
        #: rest of the message text may be taken in bulk.
        self._data_begun = False
        #: Chunks of message text taken in bulk, and lines that went one by one (tests).
        self.bulk_chunks = 0

    @property
    def _t(self) -> Any:
        return self.transport

    def callLater(self, period: float, func: Callable[[], object]) -> Any:
        """TimeoutMixin's timer, on the injected clock."""
        return self.clock.callLater(period, func)

    def connectionMade(self) -> None:
        if hasattr(self._t, "setTcpNoDelay"):
            self._t.setTcpNoDelay(True)
        if ISSLTransport.providedBy(self._t):
            self.startedTLS = True  # implicit TLS (465): AUTH at once, no STARTTLS
        if self.stats is not None:
            self.stats.opened(self._proto)
            self._opened = True
        super().connectionMade()

    # --- EHLO ---------------------------------------------------------------------

    def extensions(self) -> dict[bytes, Any]:
        ext: dict[bytes, Any] = super().extensions()
        ext.pop(b"AUTH", None)
        if self.startedTLS and self.challengers and not self.authenticated:
            ext[b"AUTH"] = list(self.challengers)
        ext[b"SIZE"] = [b"%d" % self.policy.max_message_size]
        ext[b"PIPELINING"] = None
        ext[b"8BITMIME"] = None
        ext[b"ENHANCEDSTATUSCODES"] = None
        return ext

    def ext_AUTH(self, rest: bytes) -> None:
        if not self.startedTLS or not self.challengers:
            self.sendCode(538, b"5.7.11 Encryption required for requested authentication")
            return
        if not rest.split():  # stock raises IndexError
            self.counters["smtp_bad_arguments"] += 1
            self.sendCode(501, b"5.5.4 AUTH needs a mechanism")
            return
        super().ext_AUTH(rest)

    def state_AUTH(self, response: bytes | None) -> None:
        """A SASL step; a malformed response is 501, not a dropped connection."""
        try:
            super().state_AUTH(response)
        except (imap4.IllegalClientResponse, UnicodeDecodeError, ValueError):
            self.challenger = None
            self.mode = smtp.COMMAND
            self.counters["smtp_bad_arguments"] += 1
            self.sendCode(501, b"5.5.2 Malformed authentication response")

    def _ebAuthenticated(self, reason: Failure) -> None:
        """535 for bad credentials, 454 when throttled or the check failed here."""
        self.challenger = None
        if reason.check(LoginThrottled):
            self.sendCode(454, b"4.7.0 Too many failed logins, try again later")
        elif reason.check(UnauthorizedLogin):
            self.sendCode(535, b"5.7.8 Authentication credentials invalid")
        else:
            log.failure("SMTP AUTH check failed", reason)
            self.sendCode(454, b"4.7.0 Temporary authentication failure")

    # --- ordered replies for pipelined commands -------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self._held is not None:
            if self._t.disconnecting:
                return
            self._held_bytes += len(line) + 2
            if len(self._held) >= self.MAX_BACKLOG or self._held_bytes > self.MAX_BACKLOG_BYTES:
                self.counters["smtp_backlog_overflows"] += 1
                self._held = []
                self.sendCode(421, b"4.7.0 Too many pipelined commands, closing")
                self._t.loseConnection()
                return
            self._held.append(line)
            return
        in_data = self.mode == smtp.DATA
        if b"\n" in line or b"\r" in line:  # lines split on CRLF only: this one is bare
            if not in_data:
                self._bare_command()
                return
            if not self.datafailed:
                self._bare_data()
        if not in_data and len(line) > self.MAX_COMMAND:
            self.sendCode(500, b"5.5.2 Line too long")
            return
        expects_reply = not in_data or line == b"."
        if not in_data:
            self._command = line.split(b" ", 1)[0].upper()[:16]
            if self.stats is not None:
                self.stats.command(self._proto)
        elif line == b".":
            self._dot_at = self.clock.seconds()
        self._replied = False
        super().lineReceived(line)
        if in_data and self.mode == smtp.DATA:
            self._data_begun = True
        if expects_reply and not self._replied and not self._t.disconnecting:
            self._held = []

    def _bare_command(self) -> None:
        """A command line with a bare CR or LF: the client frames lines otherwise than
        we do (what it sends next may be meant as other commands), so 500 and close,
        as Postfix's ``smtpd_forbid_bare_newline = yes``."""
        self.counters["smtp_bare_newlines"] += 1
        self._command = b""
        self.sendCode(500, b"5.5.2 Bare <CR> or <LF> received, closing")
        self._t.loseConnection()

    def _bare_data(self) -> None:
        """Message text with a bare CR or LF (smuggling's ``<LF>.<LF>`` and kin, or a
        broken client): the rest is read to CRLF.CRLF, as always, then the message
        is refused with nothing stored (stock sends ``datafailed`` at the dot)."""
        self.counters["smtp_bare_newlines"] += 1
        if self._txn is not None:
            self._txn.abort()
        self.datafailed = smtp.SMTPServerError(
            550, b"5.6.0 Bare <CR> or <LF> in message text; lines must end with CRLF"
        )

    # --- message text in bulk -----------------------------------------------------------

    def _bulk_ready(self) -> bool:
        return (
            self.mode == smtp.DATA
            and self._held is None
            and self._txn is not None
            and not self.datafailed
            and not self._t.disconnecting
        )

    def dataReceived(self, data: bytes) -> None:
        """Message text in bulk (module docstring); everything else as stock lines."""
        if not self._bulk_ready():
            super().dataReceived(data)
            return
        buf = self._buffer + data
        self._buffer = b""
        while not self._data_begun and self._bulk_ready():
            end = buf.find(b"\r\n")
            if end < 0:
                break
            line, buf = buf[:end], buf[end + 2 :]
            if len(line) > self.MAX_LENGTH:
                self.lineLengthExceeded(line)
                return
            self.lineReceived(line)
        if self._data_begun and self._bulk_ready():
            buf = self._bulk(buf)
        if buf:
            super().dataReceived(buf)  # the final dot and what follows, or a partial line

    def _bulk(self, buf: bytes) -> bytes:
        """Store the complete lines of ``buf`` before the final dot; the rest is returned
        (a partial line, or the dot line and what follows it)."""
        if buf.startswith(b".\r\n"):
            return buf
        end = buf.find(b"\r\n.\r\n")
        if end >= 0:
            end += 2
        else:
            end = buf.rfind(b"\r\n") + 2
            if end < 2:
                return buf
        text, rest = buf[:end], buf[end:]
        txn = self._txn
        assert txn is not None
        lines = text.count(b"\r\n")
        plain = text.count(b"\r") == lines and text.count(b"\n") == lines
        if plain and len(text) > self.MAX_LENGTH:
            plain = max(map(len, text.split(b"\r\n"))) <= self.MAX_LENGTH
        if plain:
            text = (b"\r\n" + text).replace(b"\r\n.", b"\r\n")[2:]
            plain = txn.size + len(text) <= txn.max_size
        if not plain:
            super().dataReceived(buf[:end])  # line by line, the stock way
            return rest
        self.resetTimeout()
        self.bulk_chunks += 1
        txn.lines(text)
        return rest

    def sendCode(self, code: int, message: bytes = b"") -> None:
        super().sendCode(code, self._enhanced(code, message))
        self._replied = True
        if code >= 500 and code != 552:
            self._errors += 1
            if self._errors >= self.MAX_ERRORS and code != 421:
                super().sendCode(421, b"4.7.0 Too many errors, closing")
                self._t.loseConnection()
                return
        if self._held is not None:
            self._resume()

    def _enhanced(self, code: int, message: bytes) -> bytes:
        """``message`` with an RFC 3463 code on every line (RFC 2034 ENHANCEDSTATUSCODES):
        not on the greeting, the HELO/EHLO answer or intermediate (3xx) replies."""
        if code < 200 or 300 <= code < 400 or code == 220 or self._command in (b"HELO", b"EHLO"):
            return message
        lines = message.splitlines() or [b""]
        if all(_ENHANCED.match(line) for line in lines):
            return message
        relaying = code == 550 and b"Relaying" in message
        extra = b"5.7.1" if relaying else _DEFAULT_ENHANCED.get((code, self._command))
        extra = extra or _DEFAULT_ENHANCED.get((code, None)) or b"%d.0.0" % (code // 100)
        return b"\n".join(
            line if _ENHANCED.match(line) else extra + (b" " + line if line else b"")
            for line in lines
        )

    def _resume(self) -> None:
        held, self._held = self._held or [], None
        self._held_bytes = sum(len(line) + 2 for line in held)
        while held and self._held is None and not self._t.disconnecting:
            self.lineReceived(held.pop(0))
        if self._held is not None:
            self._held[0:0] = held

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._txn is not None:
            self._txn.abort()
        self.sendCode(500, b"5.5.2 Line too long, closing")
        self._t.loseConnection()

    def lookupMethod(self, command: bytes) -> Any:
        """Commands that are not ASCII are unknown (stock raises UnicodeDecodeError)."""
        try:
            command.decode("ascii")
        except UnicodeDecodeError:
            return None
        return super().lookupMethod(command)

    def _bad_argument(self, what: bytes) -> None:
        self.counters["smtp_bad_arguments"] += 1
        self.sendCode(501, b"5.5.4 Invalid characters in " + what + b" argument")

    def do_HELO(self, rest: bytes) -> None:
        """HELO, refusing arguments that could forge trace headers."""
        rest = rest.rstrip(b" \t")
        if not _HELO_ARG.fullmatch(rest):
            self._bad_argument(b"HELO")
            return
        super().do_HELO(rest)

    def do_EHLO(self, rest: bytes) -> None:
        """EHLO, refusing arguments that could forge trace headers."""
        rest = rest.rstrip(b" \t")
        if not _HELO_ARG.fullmatch(rest):
            self._bad_argument(b"EHLO")
            return
        super().do_EHLO(rest)

    def do_NOOP(self, rest: bytes) -> None:
        """NOOP (RFC 5321 4.1.1.9; missing from stock)."""
        self.sendCode(250, b"2.0.0 OK")

    def do_VRFY(self, rest: bytes) -> None:
        """VRFY: never tells who exists."""
        self.sendCode(252, b"2.5.2 Cannot VRFY user, but will accept message")

    def do_HELP(self, rest: bytes) -> None:
        """HELP."""
        self.sendCode(214, b"2.0.0 See RFC 5321")

    # --- MAIL / RCPT / DATA ---------------------------------------------------------

    def do_MAIL(self, rest: bytes) -> None:
        if _CONTROL.search(rest):
            self._bad_argument(b"MAIL")
            return
        if self.policy.submission and not self._may_submit(rest):
            return
        if not self._known_mail_params(rest):
            return
        m = _SIZE.search(rest)
        if m and int(m.group(1)) > self.policy.max_message_size:
            self.sendCode(552, b"5.3.4 Message size exceeds fixed limit")
            return
        super().do_MAIL(rest)

    def _known_mail_params(self, rest: bytes) -> bool:
        """555 for MAIL parameters we do not implement (RFC 5321 4.1.1.11), 501 for bad BODY."""
        m = self.mail_re.match(rest)
        opts = (m.group("opts") or b"") if m is not None else b""
        for opt in opts.split():
            key, _, value = opt.partition(b"=")
            key = key.upper()
            if key == b"BODY" and value.upper() not in _BODY_VALUES:
                self.sendCode(501, b"5.5.4 BODY must be 7BIT or 8BITMIME")
                return False
            if key not in (b"BODY", b"SIZE", b"AUTH"):
                self.sendCode(555, b"5.5.4 Unsupported MAIL parameter " + key[:32])
                return False
        return True

    def _may_submit(self, rest: bytes) -> bool:
        """Submission (RFC 6409): AUTH first, then only the user's own address as sender."""
        if not self.authenticated:
            self.sendCode(530, b"5.7.0 Authentication required")
            return False
        m = self.mail_re.match(rest)
        delivery: ISmtpDelivery | None = self.delivery
        owner = delivery.authenticated_as if delivery is not None else None
        if m is None or owner is None:
            return True  # stock answers the syntax error
        try:
            path = str(smtp.Address(m.group("path"), self.host)).lower()
        except smtp.AddressError:
            return True  # stock answers 553
        if path != owner.lower():
            self.sendCode(553, b"5.7.1 Sender address not owned by the authenticated user")
            return False
        return True

    def do_RCPT(self, rest: bytes) -> None:
        if _CONTROL.search(rest):
            self._bad_argument(b"RCPT")
            return
        if len(self._to) >= self.policy.max_recipients:
            self.sendCode(452, b"4.5.3 Too many recipients")
            return
        m = self.rcpt_re.match(rest)
        if m is not None and (m.group("opts") or b"").strip():
            # No RCPT extension is offered (no DSN): RFC 5321 4.1.1.11.
            key = m.group("opts").split()[0].partition(b"=")[0].upper()
            self.counters["smtp_bad_arguments"] += 1
            self.sendCode(555, b"5.5.4 Unsupported RCPT parameter " + key[:32])
            return
        bare = _UNQUALIFIED.fullmatch(rest)
        if bare is not None:  # (twisted would add the host name: alice@n1.example.org)
            domain = self.policy.domain.encode("ascii", "replace")
            rest = bare["head"] + bare["local"] + b"@" + domain + bare["tail"]
        super().do_RCPT(rest)

    def do_DATA(self, rest: bytes) -> None:
        sender = bytes(self._from) if self._from is not None else b""
        self._txn = Transaction(sender, self.policy.max_message_size, self.deliver)
        self._data_begun = False
        super().do_DATA(rest)

    def message_for(self, rcpt: Recipient) -> _RecipientMessage:
        """Called through the factory SmtpDelivery.validateTo returned."""
        assert self._txn is not None
        return self._txn.message(rcpt)

    def _messageHandled(self, resultList: list[tuple[bool, Any]]) -> None:
        self._txn = None
        failures = [r for ok, r in resultList if not ok]
        if not failures:
            if self.on_stored is not None and self._dot_at is not None:
                self.on_stored(self.clock.seconds() - self._dot_at)
            self.sendCode(250, b"2.0.0 Ok: stored")
            return
        f = failures[0]
        if isinstance(f, Failure) and f.check(smtp.SMTPServerError):
            err: Any = f.value
            resp = err.resp if isinstance(err.resp, bytes) else str(err.resp).encode("utf-8")
            self.sendCode(err.code, resp)
            return
        if isinstance(f, Failure) and f.check(PeerUnavailable, ReplicationStopped):
            # An expected condition under faults (a peer down, cut off or stopping):
            # a counter and a warning (the node's log observer rate-limits it), no
            # traceback; the client retries later.
            self.counters["smtp_peer_unavailable"] += 1
            log.warn("SMTP delivery deferred: {e}", e=f.getErrorMessage())
            self.sendCode(451, b"4.4.0 Cluster peer unavailable, try again later")
            return
        log.failure("SMTP delivery failed", f)
        self.sendCode(451, b"4.3.0 Local error in processing, try again later")

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._opened and self.stats is not None:
            self._opened = False
            self.stats.closed(self._proto)
        if self._txn is not None:
            self._txn.abort()
            self._txn = None
        super().connectionLost(reason)
