"""IMAP4rev1: twisted.mail's ``IMAP4Server`` in front of a user's :class:`UserMail`.

Changes to the stock server (26.10), each needed by a real client:

- CREATE/DELETE/RENAME/(UN)SUBSCRIBE wait for the account's Deferred (stock
  treats the returned Deferred as success and drops its failure);
- FETCH loads bodies only when the query needs them, sets ``\\Seen`` for
  non-PEEK body fetches, serves BODY[HEADER...] from the exact header octets
  (stock rebuilds them from a dict: duplicates lost, no blank line), and
  answers partial fetches with ``<origin>`` and exactly the octets promised;
- SEARCH: terms decoded to str (stock compares bytes with str headers) and
  bodies loaded only for terms that need them;
- APPEND without flags works, literals are bounded by the message size limit;
- with a certificate, AUTHENTICATE also waits for STARTTLS (stock only
  disables LOGIN); STORE on an EXAMINEd mailbox is NO, not BAD;
- failed logins answer ``NO [AUTHENTICATIONFAILED]``, throttled ones
  ``NO [UNAVAILABLE]`` (RFC 5530);
- an over-long line gets ``* BAD`` and a close; idle timeouts use the
  injected clock.

Hostile input (issue 13): every client mistake stock twisted.mail turned into a
logged traceback is answered ``BAD``/``NO`` and counted in
:class:`~._guard.ClientErrors` (argument parsers and handlers are wrapped at
:meth:`MailImapServer.lookupCommand`; SEARCH runs our own loop; APPEND/COPY to
a missing mailbox answer ``NO [TRYCREATE]``; a bad FETCH section is empty);
at most :attr:`MailImapServer.MAX_PIPELINE` commands wait for answers before
the server stops reading (:class:`~._guard.GatedLines`); a FETCH holds later
commands until it completes; everything a session holds (its listener on the
selected mailbox, a SEARCH in progress) is released when the connection goes,
whatever state it was in; LIST patterns match in linear time.
"""

from __future__ import annotations

import copy
import email.header
import email.utils
import io
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.python.failure import Failure
from zope.interface import implementer

from ..cluster.rpc import PeerUnavailable
from ._guard import ClientErrors, GatedLines, list_match
from ._mime import MimePart
from .retrieval import UserMail
from .values import DELIMITER, INBOX, Digest, MailboxInfo, MailError, NoSuchMailbox

log = Logger()

PERMANENT_FLAGS = ["\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft"]

_BODY_SEARCH = {
    "HEADER", "FROM", "TO", "CC", "BCC", "SUBJECT", "BODY", "TEXT",
    "SENTBEFORE", "SENTON", "SENTSINCE",
}  # fmt: skip


@implementer(imap4.IMessage, imap4.IMessageFile)
class ImapMessage(MimePart):
    """A message of the selected mailbox (body loaded, or just its digest)."""

    def __init__(self, digest: Digest, mailbox: str, raw: bytes | None) -> None:
        super().__init__(raw if raw is not None else b"")
        self.digest = digest
        self.mailbox = mailbox
        self.loaded = raw is not None

    def getUID(self) -> int:
        """The IMAP UID."""
        return self.digest.uid

    def getFlags(self) -> list[str]:
        """Current flags."""
        return list(self.digest.flags)

    def getInternalDate(self) -> str:
        """INTERNALDATE as an RFC 2822 date."""
        return email.utils.formatdate(self.digest.internal_date)

    def getSize(self) -> int:
        """RFC822.SIZE (from the digest when the body is not loaded)."""
        return self.digest.size

    def open(self) -> io.BytesIO:
        """IMessageFile: the whole message."""
        return io.BytesIO(self.raw)


class _Listing:
    """What LIST shows of a mailbox: its name attributes."""

    def __init__(self, attributes: list[str]) -> None:
        self.attributes = attributes

    def getFlags(self) -> list[str]:
        return self.attributes

    def getHierarchicalDelimiter(self) -> str:
        return DELIMITER


def parse_append_date(date: Any) -> float:
    """``17-Jul-1996 02:44:25 -0700`` (APPEND date-time) -> POSIX time; 0 if absent."""
    if not date:
        return 0.0
    text = date.decode("ascii", "replace") if isinstance(date, bytes) else str(date)
    try:
        return datetime.strptime(text.strip(), "%d-%b-%Y %H:%M:%S %z").timestamp()
    except ValueError:
        return 0.0


@implementer(imap4.IMailbox, imap4.IMessageCopier)
class ImapMailbox:
    """A selected (or examined) mailbox: digests in memory, kept in step with the store."""

    def __init__(
        self,
        account: ImapAccount,
        info: MailboxInfo,
        digests: list[Digest],
        writeable: bool,
    ) -> None:
        self.account = account
        self.mail = account.mail
        self.name = info.name
        self.uidvalidity = info.uidvalidity
        self.uidnext = info.uidnext
        self.digests = digests
        self.writeable = writeable
        self.listeners: list[Any] = []
        # Set by the server just before it calls fetch(): does the query need bodies?
        self.want_bodies = True
        self.mark_seen = False

    # --- counters the server reads synchronously --------------------------------

    def getFlags(self) -> list[str]:
        return PERMANENT_FLAGS

    def getHierarchicalDelimiter(self) -> str:
        return DELIMITER

    def getUIDValidity(self) -> int:
        return self.uidvalidity

    def getUIDNext(self) -> int:
        return self.uidnext

    def getUID(self, message: int) -> int:
        return self.digests[message - 1].uid

    def getMessageCount(self) -> int:
        return len(self.digests)

    def getRecentCount(self) -> int:
        return 0

    def getUnseenCount(self) -> int:
        return sum(1 for d in self.digests if "\\Seen" not in d.flags)

    def isWriteable(self) -> bool:
        return self.writeable

    def destroy(self) -> None:
        self.digests = []

    def requestStatus(self, names: Iterable[str]) -> dict[str, int]:
        return imap4.statusRequestHelper(self, names)  # type: ignore[no-any-return]

    def addListener(self, listener: Any) -> None:
        self.listeners.append(listener)
        self.account.registry.open(self)

    def removeListener(self, listener: Any) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)
        if not self.listeners:
            self.account.registry.close(self)

    # --- keeping in step ----------------------------------------------------

    def arrived(self) -> Deferred[None]:
        """New mail may be here: append digests above our last UID, tell listeners."""
        top = self.digests[-1].uid if self.digests else 0

        def got(digests: list[Digest]) -> None:
            new = [d for d in digests if d.uid > top]
            if new:
                self.digests.extend(new)
                self.uidnext = max(self.uidnext, new[-1].uid + 1)
                for listener in list(self.listeners):
                    listener.newMessages(len(self.digests), None)

        return self.mail.digests(self.name).addCallback(got)

    def _replace(self, updated: dict[int, tuple[str, ...]]) -> None:
        self.digests = [
            d if d.uid not in updated else _with_flags(d, updated[d.uid]) for d in self.digests
        ]

    # --- message sets ----------------------------------------------------------

    def _pick(self, messages: Any, uid: bool) -> list[tuple[int, Digest]]:
        if not self.digests:
            return []
        if uid:
            messages.last = self.digests[-1].uid
            by_uid = {d.uid: i for i, d in enumerate(self.digests)}
            picked = {by_uid[u] for u in _expand(messages, self.digests[-1].uid) if u in by_uid}
        else:
            messages.last = len(self.digests)
            n = len(self.digests)
            picked = {s - 1 for s in _expand(messages, n) if 1 <= s <= n}
        return [(i + 1, self.digests[i]) for i in sorted(picked)]

    # --- IMailbox operations -------------------------------------------------------

    def fetch(self, messages: Any, uid: bool) -> Deferred[list[tuple[int, ImapMessage]]]:
        """Messages with bodies when the query needs them (the server tells us first)."""
        picked = self._pick(messages, uid)
        want, seen = self.want_bodies, self.mark_seen and self.writeable
        self.want_bodies, self.mark_seen = True, False
        d: Deferred[Any] = succeed(None)
        unseen = [dg for _, dg in picked if "\\Seen" not in dg.flags]
        if seen and unseen:
            d = self.mail.set_flags(self.name, unseen, ["\\Seen"], 1)
            d.addCallback(self._replace)
        if not want:
            return d.addCallback(
                lambda _: [(n, ImapMessage(self._current(dg), self.name, None)) for n, dg in picked]
            )

        def load(_: object) -> Deferred[dict[int, bytes]]:
            return self.mail.fetch(self.name, [dg for _, dg in picked])

        def build(bodies: dict[int, bytes]) -> list[tuple[int, ImapMessage]]:
            return [
                (n, ImapMessage(self._current(dg), self.name, bodies[dg.uid]))
                for n, dg in picked
                if dg.uid in bodies
            ]

        return d.addCallback(load).addCallback(build)

    def _current(self, digest: Digest) -> Digest:
        for d in self.digests:
            if d.uid == digest.uid:
                return d
        return digest

    def store(
        self, messages: Any, flags: Iterable[Any], mode: int, uid: bool
    ) -> Deferred[dict[int, list[str]]]:
        """STORE flags; the new flags by sequence number."""
        if not self.writeable:
            raise imap4.ReadOnlyMailbox()
        names = [f.decode() if isinstance(f, bytes) else str(f) for f in flags]
        picked = self._pick(messages, uid)
        seq_of = {dg.uid: n for n, dg in picked}

        def done(updated: dict[int, tuple[str, ...]]) -> dict[int, list[str]]:
            self._replace(updated)
            return {seq_of[u]: list(f) for u, f in updated.items()}

        if not picked:
            return succeed({})
        return self.mail.set_flags(self.name, [dg for _, dg in picked], names, mode).addCallback(
            done
        )

    def expunge(self) -> Deferred[list[int]]:
        """Remove \\Deleted messages; their sequence numbers, highest first."""
        if not self.writeable:
            raise imap4.ReadOnlyMailbox()
        doomed = [(i + 1, d) for i, d in enumerate(self.digests) if "\\Deleted" in d.flags]
        if not doomed:
            return succeed([])

        def done(removed: list[int]) -> list[int]:
            gone = set(removed)
            seqs = [n for n, d in doomed if d.uid in gone]
            self.digests = [d for d in self.digests if d.uid not in gone]
            return sorted(seqs, reverse=True)

        return self.mail.delete(self.name, [d for _, d in doomed]).addCallback(done)

    def addMessage(
        self, message: Any, flags: Iterable[Any] = (), date: Any = None
    ) -> Deferred[int]:
        """APPEND: read the spooled literal off the reactor thread, store, refresh."""
        names = [f.decode() if isinstance(f, bytes) else str(f) for f in (flags or ())]
        when = parse_append_date(date)
        d: Deferred[Any] = self.account.read_file(message)
        d.addCallback(lambda body: self.mail.append(self.name, body, names, when))

        def stored(digest: Digest) -> Deferred[int]:
            return self.arrived().addCallback(lambda _: digest.uid)

        return d.addCallback(stored)

    def copy(self, message: ImapMessage) -> Deferred[int]:
        """COPY (called on the destination): a metadata copy within the fragment."""
        d = self.mail.copy(message.mailbox, [message.digest], self.name)
        return d.addCallback(lambda digests: digests[0].uid if digests else 0)


def _ascii_tree(item: Any) -> Any:
    """The body structure with every non-ASCII string RFC 2047-encoded."""
    if isinstance(item, (list, tuple)):
        return [_ascii_tree(i) for i in item]
    if isinstance(item, str) and not item.isascii():
        return email.header.Header(item, "utf-8").encode()
    return item


def _structure(msg: Any, extended: bool) -> bytes:
    tree = imap4.getBodyStructure(msg, extended)
    try:
        return imap4.collapseNestedLists([tree])  # type: ignore[no-any-return]
    except UnicodeError:
        return imap4.collapseNestedLists([_ascii_tree(tree)])  # type: ignore[no-any-return]


_ADDRESS_HEADERS = {"from", "sender", "reply-to", "to", "cc", "bcc"}


class _Rfc2047Headers:
    """A message whose non-ASCII header values read as RFC 2047 encoded words."""

    def __init__(self, msg: Any) -> None:
        self.msg = msg

    def getHeaders(self, negate: bool, *names: Any) -> dict[str, str]:
        out = {}
        for k, v in self.msg.getHeaders(negate, *names).items():
            if isinstance(v, str) and not v.isascii():
                if k.lower() in _ADDRESS_HEADERS:
                    pairs = email.utils.getaddresses([v])
                    v = ", ".join(email.utils.formataddr(p, "utf-8") for p in pairs)
                else:
                    v = email.header.Header(v, "utf-8").encode()
            out[k] = v
        return out


def _with_flags(d: Digest, flags: tuple[str, ...]) -> Digest:
    return Digest(d.uid, d.key, d.size, flags, d.internal_date, d.node)


def _expand(messages: Any, last: int) -> Iterable[int]:
    """The numbers of a MessageSet, clamped to ``last`` (avoids iterating huge ranges)."""
    for start, end in messages.ranges:
        lo = last if start is None else start
        hi = last if end is None else end
        lo, hi = min(lo, hi), max(lo, hi)
        yield from range(max(lo, 1), min(hi, last) + 1)


class MailboxRegistry:
    """Open mailboxes per (user, name), told when mail arrives (IDLE and NOOP see it)."""

    def __init__(self) -> None:
        self.boxes: dict[tuple[str, str], set[ImapMailbox]] = {}

    def open(self, box: ImapMailbox) -> None:
        self.boxes.setdefault((box.mail.address, box.name), set()).add(box)

    def close(self, box: ImapMailbox) -> None:
        key = (box.mail.address, box.name)
        self.boxes.get(key, set()).discard(box)
        if not self.boxes.get(key):
            self.boxes.pop(key, None)

    def changed(self, user: str, mailbox: str) -> None:
        for box in list(self.boxes.get((user, mailbox), ())):
            box.arrived().addErrback(_refresh_failed)


def _refresh_failed(f: Failure) -> None:
    """A holder of the mailbox out of reach is expected (the next change or NOOP tries
    again): one warning line, no traceback; anything else is a bug and logged whole."""
    if f.check(PeerUnavailable, MailError):
        log.warn("IMAP refresh of an open mailbox failed: {error}", error=f.getErrorMessage())
    else:
        log.failure("IMAP refresh failed", f)


@implementer(imap4.IAccount, imap4.INamespacePresenter)
class ImapAccount:
    """A logged-in user's mailboxes."""

    def __init__(
        self,
        mail: UserMail,
        registry: MailboxRegistry,
        read_file: Callable[[Any], Deferred[bytes]],
    ) -> None:
        self.mail = mail
        self.registry = registry
        self.read_file = read_file
        self._subscribed: set[str] = set()

    def getPersonalNamespaces(self) -> list[list[str]]:
        return [["", DELIMITER]]

    def getUserNamespaces(self) -> None:
        return None

    def getSharedNamespaces(self) -> None:
        return None

    def getOtherNamespaces(self) -> None:
        return None

    def addMailbox(self, name: str, mbox: Any = None) -> Deferred[bool]:
        return self.create(name)

    def create(self, pathspec: str) -> Deferred[bool]:
        return self.mail.create(pathspec).addCallback(lambda _: True)

    def select(self, name: str, rw: bool = True) -> Deferred[ImapMailbox | None]:
        def found(infos: list[MailboxInfo]) -> Deferred[ImapMailbox | None] | None:
            wanted = INBOX if name.upper() == INBOX else name
            info = next((i for i in infos if i.name == wanted), None)
            if info is None:
                return None
            # complete: NO [UNAVAILABLE] rather than a mailbox lacking mail out of reach
            return self.mail.digests(info.name, complete=True).addCallback(
                lambda digests: ImapMailbox(self, info, digests, bool(rw))
            )

        return self.mail.mailboxes().addCallback(found)

    def delete(self, name: str) -> Deferred[None]:
        return self.mail.delete_mailbox(name)

    def rename(self, oldname: str, newname: str) -> Deferred[None]:
        return self.mail.rename(oldname, newname)

    def isSubscribed(self, name: str) -> bool:
        return name in self._subscribed

    def subscribe(self, name: str) -> Deferred[None]:
        return self.mail.subscribe(name, True)

    def unsubscribe(self, name: str) -> Deferred[None]:
        return self.mail.subscribe(name, False)

    def listMailboxes(self, ref: str, wildcard: str) -> Deferred[list[tuple[str, _Listing]]]:
        pattern = (ref or "") + (wildcard or "")
        # INBOX is case-insensitive (RFC 3501 5.1): so is the pattern's INBOX prefix.
        inbox_pattern = INBOX + pattern[5:] if pattern[:5].upper() == INBOX else pattern

        def matches(name: str) -> bool:
            if name == INBOX or name.startswith(INBOX + DELIMITER):
                return list_match(inbox_pattern, name, DELIMITER)
            return list_match(pattern, name, DELIMITER)

        def got(infos: list[MailboxInfo]) -> list[tuple[str, _Listing]]:
            self._subscribed = {i.name for i in infos if i.subscribed}
            names = [i.name for i in infos]
            out = []
            for name in names:
                if matches(name):
                    kids = any(n.startswith(name + DELIMITER) for n in names)
                    out.append((name, _Listing(["\\HasChildren" if kids else "\\HasNoChildren"])))
            return out

        return self.mail.mailboxes().addCallback(got)


def _flat(query: Any) -> Iterable[str]:
    if isinstance(query, (list, tuple)):
        for q in query:
            yield from _flat(q)
    else:
        yield query.decode("utf-8", "replace") if isinstance(query, bytes) else str(query)


def _as_text(query: Any) -> Any:
    if isinstance(query, bytes):
        return query.decode("utf-8", "replace")
    if isinstance(query, list):
        return [_as_text(q) for q in query]
    return query


#: Errors a client causes with its input: answered, counted, never logged.
_CLIENT_BAD = (imap4.IllegalClientResponse, imap4.IllegalQueryError, imap4.IllegalIdentifierError)
_CLIENT_NO = (
    imap4.IllegalOperation,
    imap4.IllegalMailboxEncoding,
    imap4.MailboxException,
    MailError,
)

_STATUS_ITEMS = {b"MESSAGES", b"RECENT", b"UIDNEXT", b"UIDVALIDITY", b"UNSEEN"}

#: Which arguments (after the tag) of a command are mailbox names.
_MAILBOX_ARGS: dict[str, tuple[int, ...]] = {
    "SELECT": (0,), "EXAMINE": (0,), "CREATE": (0,), "DELETE": (0,), "RENAME": (0, 1),
    "SUBSCRIBE": (0,), "UNSUBSCRIBE": (0,), "LIST": (0, 1), "LSUB": (0, 1),
    "STATUS": (0,), "APPEND": (0,), "COPY": (1,),
}  # fmt: skip


def _mailbox_ok(name: Any) -> bool:
    """Does ``name`` decode as modified UTF-7 (twisted logs a traceback if not)?"""
    if not isinstance(name, bytes):
        return True
    try:
        name.decode("imap4-utf-7")
    except Exception:
        return False
    return True


def _text_of(e: BaseException | None) -> bytes:
    return str(e).encode("ascii", "replace")[:200]


def _guard_parser(parse: Callable[..., Any]) -> Callable[..., Any]:
    """An argument parser whose unexpected exceptions (twisted's parsers raise
    ValueError, IndexError, TypeError... on some input) are syntax errors."""

    def as_syntax(f: Failure) -> Failure:
        if f.check(*_CLIENT_BAD, *_CLIENT_NO):
            return f
        name = f.type.__name__ if f.type is not None else "?"
        return Failure(imap4.IllegalClientResponse(f"bad argument ({name})"))

    def guarded(server: Any, line: bytes) -> Any:
        try:
            result = parse(server, line)
        except (*_CLIENT_BAD, *_CLIENT_NO):
            raise
        except Exception as e:
            raise imap4.IllegalClientResponse(f"bad argument ({type(e).__name__})") from None
        if isinstance(result, Deferred):
            result.addErrback(as_syntax)
        return result

    return guarded


class MailImapServer(GatedLines, imap4.IMAP4Server):  # type: ignore[override]
    """IMAP4Server with the fixes listed in the module docstring."""

    MAX_LENGTH = 16384
    #: Commands received and not yet answered before the server stops reading.
    MAX_PIPELINE = 32
    #: Messages a SEARCH examines per reactor turn.
    SEARCH_BATCH = 200

    def __init__(
        self,
        clock: Any,
        max_literal: int,
        chal: Any = None,
        contextFactory: Any = None,
        errors: ClientErrors | None = None,
        allow_plaintext: bool = False,
    ) -> None:
        super().__init__(chal, contextFactory, scheduler=self._iterate)
        self.clock = clock
        #: LOGIN/AUTHENTICATE before STARTTLS although a certificate is configured.
        self.allow_plaintext = allow_plaintext
        self.max_literal = max_literal
        self.errors = errors if errors is not None else ClientErrors(clock.seconds)
        self._in_command = False
        self._resume_call: Any = None
        self._gone = False
        self._search_call: Any = None

    @property
    def _t(self) -> Any:
        return self.transport

    @property
    def _acct(self) -> Any:
        return self.account

    def _iterate(self, steps: Any) -> Deferred[Any]:
        """Stock ``iterateInReactor`` (FETCH output, one step per turn) on our clock."""
        d: Deferred[Any] = Deferred()

        def go(last: object) -> None:
            try:
                r = next(steps)
            except StopIteration:
                d.callback(last)
            except BaseException:
                d.errback()
            else:
                if isinstance(r, Deferred):
                    r.addCallback(go)
                else:
                    self.clock.callLater(0, go, r)

        go(None)
        return d

    def callLater(self, period: float, func: Callable[[], object]) -> Any:
        """TimeoutMixin's timer, on the injected clock."""
        return self.clock.callLater(period, func)

    def setTimeout(self, period: float | None) -> Any:
        """No idle timer once the connection is gone (a FETCH finishing after the
        client left restored its timer: the session lived 30 more minutes)."""
        return super().setTimeout(None if self._gone else period)

    def connectionMade(self) -> None:
        if hasattr(self._t, "setTcpNoDelay"):
            self._t.setTcpNoDelay(True)
        from twisted.internet.interfaces import ISSLTransport

        if ISSLTransport.providedBy(self._t):
            self.startedTLS = True  # implicit TLS (993): LOGIN at once, no STARTTLS
        self._gate_start()
        self.errors.opened("imap")
        super().connectionMade()

    def connectionLost(self, reason: Any = None) -> None:
        """Release everything the session holds, whatever state it was in."""
        if not self._gone:
            self.errors.closed("imap")
        self._gone = True
        super().connectionLost(reason)
        box, self.mbox = self.mbox, None
        if box is not None:
            box.removeListener(self)
        for call in (self._search_call, self._resume_call):
            if call is not None and call.active():
                call.cancel()
        self._search_call = self._resume_call = None
        self.blocked = None  # type: ignore[assignment]
        self._queuedAsync = []
        self._pendingLiteral = None
        self.account = None
        self.state = "logout"
        self._inbuf = bytearray()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.errors.client("imap", "line_too_long")
        self.sendLine(b"* BAD line too long")
        self._t.loseConnection()

    def _too_much_input(self) -> None:
        self.errors.client("imap", "too_much_input")
        self.sendLine(b"* BYE too many commands waiting")
        self._t.loseConnection()

    # --- dispatch: every client mistake is a reply and a count ----------------------

    def _pending(self) -> int:
        return int(self._in_command) + len(self.blocked or ())

    def lineReceived(self, line: bytes) -> None:
        if self._gone:
            return
        if self.blocked is not None and self.parseState == "command":
            # A command is running: the next waits (literals, AUTHENTICATE and IDLE
            # continuations are not commands and go on).
            self.blocked.append(line)
        else:
            self.resetTimeout()
            try:
                getattr(self, "parse_" + self.parseState)(line)
            except _CLIENT_BAD as e:
                self.errors.client("imap", "bad_syntax")
                self._command_done()
                self.sendUntaggedResponse(b"BAD " + _text_of(e))
            except Exception:
                self.errors.server("imap", Failure(), "a command")
                self._command_done()
                self.sendUntaggedResponse(b"BAD Server error")
        if len(self.blocked or ()) >= self.MAX_PIPELINE:
            self._hold("pipeline")

    def _command_done(self) -> None:
        """The running command was answered: the next runs on the next reactor turn
        (the handler may still be updating state after its tagged reply)."""
        if not self._in_command:
            return
        self._in_command = False
        if self._resume_call is None or not self._resume_call.active():
            self._resume_call = self.clock.callLater(0, self._next_command)

    def _next_command(self) -> None:
        self._resume_call = None
        if self._gone or self._in_command:
            return
        self._unblock()
        if len(self.blocked or ()) < self.MAX_PIPELINE:
            self._release("pipeline")

    def _unblock(self) -> None:
        """Run queued commands until one is running; after STARTTLS, drop the rest."""
        commands, self.blocked = self.blocked, None  # type: ignore[assignment]
        while commands and self.blocked is None:
            tls = self.startedTLS
            self.lineReceived(commands.pop(0))
            if self.startedTLS and not tls:
                commands = []
        if self.blocked is not None and commands:
            self.blocked.extend(commands)

    def parse_command(self, line: bytes) -> Any:
        parts = line.split(None, 2)
        self.errors.command("imap")
        if not parts:
            self.errors.client("imap", "bad_syntax")
            self.sendBadResponse(None, b"Null command")
            return None
        tag = parts[0]
        # Commands run one at a time, in order (RFC 3501 5.5 allows it; stock ran
        # a pipelined SELECT before the LOGIN it depends on had finished).
        self._in_command = True
        if self.blocked is None:
            self.blocked = []
        if len(parts) == 1:
            self.errors.client("imap", "bad_syntax")
            self.sendBadResponse(tag, b"Missing command")
            return None
        cmd, rest = parts[1], (parts[2] if len(parts) == 3 else None)
        if not (cmd.isascii() and cmd.isalpha()):
            self.errors.client("imap", "unknown_command")
            self.sendBadResponse(tag, b"Unsupported command")
            return None
        try:
            return self.dispatchCommand(tag, cmd.upper(), rest)
        except _CLIENT_BAD as e:
            self.errors.client("imap", "bad_syntax")
            self.sendBadResponse(tag, b"Illegal syntax: " + _text_of(e))
        except _CLIENT_NO as e:
            self.errors.client("imap", "refused")
            self.sendNegativeResponse(tag, _text_of(e))
        return None

    def sendUntaggedResponse(self, message: bytes, isAsync: Any = None) -> None:
        """Mailbox news waits for the running command's reply (sent at once when idle
        or between commands, and during IDLE)."""
        if isAsync and self._in_command and self.parseState != "idle":
            self._queuedAsync.append(message)
        else:
            self._respond(message, None, None)

    def do_STARTTLS(self, tag: bytes) -> None:
        started = self.startedTLS
        super().do_STARTTLS(tag)
        if self.startedTLS and not started:
            # Plaintext sent after STARTTLS must not run inside TLS (CVE-2011-0411).
            self.blocked = []
            self._drop_buffered()

    unauth_STARTTLS = (do_STARTTLS,)  # type: ignore[assignment]

    def _respond(self, state: bytes, tag: Any, message: Any) -> None:
        super()._respond(state, tag, message)
        if tag and state in (b"OK", b"NO", b"BAD"):
            self._command_done()

    def lookupCommand(self, cmd: bytes) -> Any:
        """The stock handler table entry with its parsers and handler guarded."""
        name = cmd.decode("ascii", "replace").upper()
        entry = getattr(self, f"{self.state}_{name}", None)
        if entry is None:
            self.errors.client("imap", "unknown_command")
            return None
        fn, *parsers = entry
        guarded = [_guard_parser(a) if callable(a) else a for a in parsers]
        return (self._guard_handler(fn, name), *guarded)

    def _guard_handler(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        positions = _MAILBOX_ARGS.get(name, ())

        def run(server: Any, tag: bytes, *args: Any, **kw: Any) -> Any:
            if any(i < len(args) and not _mailbox_ok(args[i]) for i in positions):
                self.errors.client("imap", "bad_mailbox_name")
                self.sendNegativeResponse(tag, b"Illegal mailbox name")
                return None
            try:
                return fn(server, tag, *args, **kw)
            except _CLIENT_BAD as e:
                self.errors.client("imap", "bad_syntax")
                self.sendBadResponse(tag, b"Illegal syntax: " + _text_of(e))
            except _CLIENT_NO as e:
                self.errors.client("imap", "refused")
                self.sendNegativeResponse(tag, _text_of(e))
            except Exception:
                self.errors.server("imap", Failure(), name)
                self.sendBadResponse(tag, b"Server error")
            return None

        return run

    def _answer_failure(self, failure: Failure, tag: bytes, what: str) -> None:
        """An errback's reply: BAD for syntax, NO for refusals, else a counted server error."""
        if failure.check(*_CLIENT_BAD):
            self.errors.client("imap", "bad_syntax")
            self.sendBadResponse(tag, b"Illegal syntax: " + _text_of(failure.value))
        elif failure.check(*_CLIENT_NO):
            self.errors.client("imap", "refused")
            self.sendNegativeResponse(tag, _text_of(failure.value))
        else:
            self.errors.server("imap", failure, what)
            self.sendNegativeResponse(tag, b"[SERVERBUG] " + what.encode() + b" failed")

    def _IMAP4Server__ebDispatch(self, failure: Failure, tag: bytes) -> None:
        self._answer_failure(failure, tag, "command")

    def _ebSelectWork(self, failure: Failure, cmdName: bytes, tag: bytes) -> None:
        self._answer_failure(failure, tag, cmdName.decode())

    def _cbSelectWork(self, mbox: Any, cmdName: bytes, tag: bytes) -> None:
        if self._gone:  # the client left while the mailbox was loading
            return
        old = self.mbox
        if old is not None and old is not mbox:  # pipelined SELECTs: one listener only
            old.removeListener(self)
            self.mbox = None
            self.state = "auth"
        super()._cbSelectWork(mbox, cmdName, tag)

    def _cbListWork(self, mailboxes: Any, tag: bytes, sub: Any, cmdName: bytes) -> None:
        if self._gone:  # the client left while the mailboxes were listed (account is None)
            return
        super()._cbListWork(mailboxes, tag, sub, cmdName)

    def _cbStatusGotMailbox(self, mbox: Any, tag: bytes, mailbox: Any, names: Any) -> None:
        if self._gone:
            return
        super()._cbStatusGotMailbox(mbox, tag, mailbox, names)

    def _IMAP4Server__cbClose(self, result: Any, tag: bytes) -> None:
        if self._gone:  # the client left while the mailbox was expunged (mbox is None)
            return
        super()._IMAP4Server__cbClose(result, tag)  # type: ignore[misc]

    def _ebListWork(self, failure: Failure, tag: bytes) -> None:
        self._answer_failure(failure, tag, "LIST")

    def _ebStatusGotMailbox(self, failure: Failure, tag: bytes) -> None:
        self._answer_failure(failure, tag, "STATUS")

    def _IMAP4Server__ebStatus(self, failure: Failure, tag: bytes, box: Any) -> None:
        self._answer_failure(failure, tag, "STATUS")

    def _ebAppendGotMailbox(self, failure: Failure, tag: bytes) -> None:
        self._answer_failure(failure, tag, "APPEND")

    def _IMAP4Server__ebAppend(self, failure: Failure, tag: bytes) -> None:
        if failure.check(NoSuchMailbox):
            self.errors.client("imap", "no_such_mailbox")
            self.sendNegativeResponse(tag, b"[TRYCREATE] No such mailbox")
            return
        self._answer_failure(failure, tag, "APPEND")

    def _IMAP4Server__ebExpunge(self, failure: Failure, tag: bytes) -> None:
        self._answer_failure(failure, tag, "EXPUNGE")

    def _IMAP4Server__ebStore(self, failure: Failure, tag: bytes) -> None:
        self._answer_failure(failure, tag, "STORE")

    def _IMAP4Server__ebCopy(self, failure: Failure, tag: bytes) -> None:
        self._answer_failure(failure, tag, "COPY")

    def _ebCopySelectedMailbox(self, failure: Failure, tag: bytes) -> None:
        self._answer_failure(failure, tag, "COPY")

    def _cbCopySelectedMailbox(self, mbox: Any, tag: bytes, messages: Any, mailbox: Any, uid: int) -> Any:  # fmt: skip
        if self._gone:  # the client left while the target was opened (self.mbox is None)
            return None
        if not mbox:
            self.errors.client("imap", "no_such_mailbox")
            self.sendNegativeResponse(tag, b"[TRYCREATE] No such mailbox")
            return None
        return super()._cbCopySelectedMailbox(mbox, tag, messages, mailbox, uid)

    def _IMAP4Server__ebSpewMessage(self, failure: Failure) -> None:
        # Part of a FETCH response may be written already: nothing to answer but a close.
        self.errors.server("imap", failure, "FETCH")
        self._t.loseConnection()

    def _IMAP4Server__ebFetch(self, failure: Failure, tag: bytes) -> None:
        old = self.__dict__.pop("_oldTimeout", None)
        self.setTimeout(old)
        self._answer_failure(failure, tag, "FETCH")

    def _fileLiteral(self, size: int) -> Any:
        if size > self.max_literal:
            raise imap4.IllegalClientResponse(
                f"Literal too long; at most {self.max_literal} octets"
            )
        return super()._fileLiteral(size)

    def _cbAppendGotMailbox(self, mbox: Any, tag: bytes, flags: Any, date: Any, message: Any) -> Any:  # fmt: skip
        if not mbox:  # stock answers with a str here: a TypeError and a traceback
            self.errors.client("imap", "no_such_mailbox")
            self.sendNegativeResponse(tag, b"[TRYCREATE] No such mailbox")
            return None
        return super()._cbAppendGotMailbox(mbox, tag, flags or [], date, message)

    # --- mailbox management that waits for the store ------------------------

    def _account_op(self, tag: bytes, call: Callable[[], Any], ok: bytes) -> None:
        def failed(f: Failure) -> None:
            if f.check(MailError, imap4.MailboxException):
                self.errors.client("imap", "refused")
                self.sendNegativeResponse(tag, str(f.value).encode("utf-8", "replace"))
            else:
                self.errors.server("imap", f, "mailbox operation")
                self.sendNegativeResponse(tag, b"[SERVERBUG] mailbox operation failed")

        maybeDeferred(call).addCallbacks(lambda _: self.sendPositiveResponse(tag, ok), failed)

    def do_CREATE(self, tag: bytes, name: Any) -> None:
        mbox = imap4._parseMbox(name)
        self._account_op(tag, lambda: self._acct.create(mbox), b"CREATE completed")

    def do_DELETE(self, tag: bytes, name: Any) -> None:
        mbox = imap4._parseMbox(name)
        self._account_op(tag, lambda: self._acct.delete(mbox), b"DELETE completed")

    def do_RENAME(self, tag: bytes, oldname: Any, newname: Any) -> None:
        old, new = imap4._parseMbox(oldname), imap4._parseMbox(newname)
        self._account_op(tag, lambda: self._acct.rename(old, new), b"RENAME completed")

    def do_SUBSCRIBE(self, tag: bytes, name: Any) -> None:
        mbox = imap4._parseMbox(name)
        self._account_op(tag, lambda: self._acct.subscribe(mbox), b"SUBSCRIBE completed")

    def do_UNSUBSCRIBE(self, tag: bytes, name: Any) -> None:
        mbox = imap4._parseMbox(name)
        self._account_op(tag, lambda: self._acct.unsubscribe(mbox), b"UNSUBSCRIBE completed")

    A = imap4.IMAP4Server
    auth_CREATE = select_CREATE = (do_CREATE, A.arg_finalastring)  # type: ignore[assignment]
    auth_DELETE = select_DELETE = (do_DELETE, A.arg_finalastring)  # type: ignore[assignment]
    auth_RENAME = select_RENAME = (do_RENAME, A.arg_astring, A.arg_finalastring)  # type: ignore[assignment]
    auth_SUBSCRIBE = select_SUBSCRIBE = (do_SUBSCRIBE, A.arg_finalastring)  # type: ignore[assignment]
    auth_UNSUBSCRIBE = select_UNSUBSCRIBE = (do_UNSUBSCRIBE, A.arg_finalastring)  # type: ignore[assignment]

    # --- no passwords in clear once TLS is on offer ------------------------

    def capabilities(self) -> dict[bytes, Any]:
        cap: dict[bytes, Any] = super().capabilities()
        if self.allow_plaintext:
            cap.pop(b"LOGINDISABLED", None)
        if b"LOGINDISABLED" in cap:
            cap[b"AUTH"] = []  # stock refuses LOGIN before STARTTLS but offers AUTH=PLAIN
        return cap

    def do_AUTHENTICATE(self, tag: bytes, args: bytes) -> None:
        if b"LOGINDISABLED" in self.capabilities():
            self.sendNegativeResponse(tag, b"[PRIVACYREQUIRED] STARTTLS first")
            return
        super().do_AUTHENTICATE(tag, args)

    unauth_AUTHENTICATE = (do_AUTHENTICATE, A.arg_atom)  # type: ignore[assignment]

    # --- login failures: RFC 5530 codes, throttled logins, no tracebacks -----

    def _login_failed(self, failure: Failure, tag: bytes) -> None:
        from twisted.cred.error import UnauthorizedLogin

        from .throttle import LoginThrottled

        if failure.check(LoginThrottled):
            self.sendNegativeResponse(tag, b"[UNAVAILABLE] Too many failed logins, try later")
        elif failure.check(UnauthorizedLogin):
            self.sendNegativeResponse(tag, b"[AUTHENTICATIONFAILED] Authentication failed")
        elif failure.check(PeerUnavailable):  # the node holding the profile is down or slow
            self.errors.counts["imap.login_peer_unavailable"] += 1
            self.sendNegativeResponse(tag, b"[UNAVAILABLE] Temporary authentication failure")
        else:
            log.failure("IMAP login check failed", failure)
            self.sendNegativeResponse(tag, b"[UNAVAILABLE] Temporary authentication failure")

    # stock's name-mangled errbacks of LOGIN and AUTHENTICATE
    _IMAP4Server__ebLogin = _login_failed
    _IMAP4Server__ebAuthResp = _login_failed

    def do_STORE(self, tag: bytes, messages: Any, mode: bytes, flags: Any, uid: int = 0) -> None:
        if self.mbox is not None and not self.mbox.isWriteable():
            self.sendNegativeResponse(tag, b"[READ-ONLY] mailbox opened with EXAMINE")
            return
        super().do_STORE(tag, messages, mode, flags, uid)

    select_STORE = (do_STORE, A.arg_seqset, A.arg_atom, A.arg_flaglist)  # type: ignore[assignment]

    def do_STATUS(self, tag: bytes, mailbox: Any, names: Any) -> None:
        wanted = [n.upper() if isinstance(n, bytes) else n for n in names or ()]
        if not wanted or any(n not in _STATUS_ITEMS for n in wanted):
            self.errors.client("imap", "bad_syntax")
            self.sendBadResponse(tag, b"STATUS items: MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN")
            return
        super().do_STATUS(tag, mailbox, wanted)

    auth_STATUS = select_STATUS = (do_STATUS, A.arg_astring, A.arg_plist)  # type: ignore[assignment]

    # --- FETCH / SEARCH ---------------------------------------------------------

    def do_FETCH(self, tag: bytes, messages: Any, query: Any, uid: int = 0) -> None:
        for p in query:
            if p.type == "body" and getattr(p, "header", None) is not None:
                try:
                    bytes(p.header)
                    str(p.header)
                except UnicodeDecodeError:  # stock raises it mid-response when labelling
                    self.errors.client("imap", "bad_syntax")
                    self.sendBadResponse(tag, b"Illegal syntax: header field names are ASCII")
                    return
        if isinstance(self.mbox, ImapMailbox):
            light = {"flags", "uid", "internaldate", "rfc822size"}
            self.mbox.want_bodies = any(p.type not in light for p in query)
            self.mbox.mark_seen = any(
                (p.type == "body" and not p.peek and (p.header or p.text or p.empty or p.mime))
                or p.type in ("rfc822", "rfc822text")
                for p in query
            )
        super().do_FETCH(tag, messages, query, uid)

    select_FETCH = (do_FETCH, A.arg_seqset, A.arg_fetchatt)  # type: ignore[assignment]

    def do_SEARCH(self, tag: bytes, charset: Any, query: Any, uid: int = 0) -> None:
        """SEARCH over the loaded messages, :attr:`SEARCH_BATCH` per reactor turn; a
        key the client got wrong is ``BAD`` (stock: a traceback per batch)."""
        mbox: Any = self.mbox
        if isinstance(mbox, ImapMailbox):
            mbox.want_bodies = any(t.upper() in _BODY_SEARCH for t in _flat(query))
        text = _as_text(query)
        d: Deferred[Any] = maybeDeferred(mbox.fetch, imap4.parseIdList(b"1:*"), uid)
        d.addCallback(lambda found: self._search_batch(list(found), 0, [], tag, text, uid))
        d.addErrback(self._answer_failure, tag, "SEARCH")

    def _search_batch(
        self, found: list[Any], start: int, hits: list[bytes], tag: bytes, query: Any, uid: int
    ) -> None:
        self._search_call = None
        if self._gone:
            return
        last_seq = found[-1][0] if found else 0
        last_uid = found[-1][1].getUID() if found else 0
        for seq, msg in found[start : start + self.SEARCH_BATCH]:
            try:
                ok = self._searchFilter(copy.deepcopy(query), seq, msg, last_seq, last_uid)
            except Exception as e:  # any key the stock evaluator cannot take is the client's
                self.errors.client("imap", "bad_search")
                self.sendBadResponse(tag, b"SEARCH: invalid search criteria (" + _text_of(e) + b")")
                return
            if ok:
                hits.append(b"%d" % (msg.getUID() if uid else seq))
        start += self.SEARCH_BATCH
        if start < len(found):
            self._search_call = self.clock.callLater(
                0, self._search_batch, found, start, hits, tag, query, uid
            )
            return
        self.sendUntaggedResponse(b" ".join([b"SEARCH", *hits]))
        self.sendPositiveResponse(tag, b"SEARCH completed")

    # Our search terms are str: stock keys this set with bytes only (OR/NOT/UID
    # then got the wrong arguments: a TypeError per message).
    _requiresLastMessageInfo = {b"OR", b"NOT", b"UID", "OR", "NOT", "UID"}  # type: ignore[arg-type]

    def _singleSearchStep(self, query: Any, msgId: int, msg: Any, lastSequenceId: int, lastMessageId: int) -> bool:  # fmt: skip
        q = query[0] if query else None
        if isinstance(q, str) and not q[:1].isalpha():  # a sequence set
            query.pop(0)
            return msgId in imap4.parseIdList(q.encode("ascii"), lastSequenceId)
        if isinstance(q, str) and not hasattr(self, "search_" + q.upper()):
            raise imap4.IllegalQueryError(f"unknown search key {q[:40]}")
        return bool(super()._singleSearchStep(query, msgId, msg, lastSequenceId, lastMessageId))

    def search_UID(self, query: Any, id: int, msg: Any, lastIDs: Any) -> bool:
        c = query.pop(0)
        ids = imap4.parseIdList(c.encode("ascii") if isinstance(c, str) else c, lastIDs[1])
        return msg.getUID() in ids

    def search_BODY(self, query: Any, id: int, msg: Any) -> bool:
        needle = str(query.pop(0)).lower().encode("utf-8")
        return isinstance(msg, MimePart) and needle in msg.body.lower()

    def search_TEXT(self, query: Any, id: int, msg: Any) -> bool:
        needle = str(query.pop(0)).lower().encode("utf-8")
        return isinstance(msg, MimePart) and needle in msg.raw.lower()

    def search_KEYWORD(self, query: Any, id: int, msg: Any) -> bool:
        return str(query.pop(0)).lower() in (f.lower() for f in msg.getFlags())

    def search_UNKEYWORD(self, query: Any, id: int, msg: Any) -> bool:
        return not self.search_KEYWORD(query, id, msg)

    select_SEARCH = (do_SEARCH, A.opt_charset, A.arg_searchkeys)  # type: ignore[assignment]
    del A

    def _section_bytes(self, part: Any, msg: Any) -> tuple[bytes, bytes]:
        """(label, octets) of a BODY[...] section, from the stored octets."""
        missing = False
        for p in part.part:
            if msg.isMultipart():
                try:
                    msg = msg.getSubPart(p)
                except (IndexError, ValueError):
                    missing = True
                    break
            elif p > 0:
                missing = True  # no such part: empty, as Dovecot answers
                break
        if missing:
            data = b""
        elif part.header:
            data = msg.header_block(part.header.fields, part.header.negate)
        elif part.text:
            data = msg.body
        elif part.mime:
            data = msg.head
        elif part.part:
            data = msg.body
        else:
            data = msg.raw
        saved = part.partialBegin
        part.partialBegin = None
        label = part.getBytes()
        part.partialBegin = saved
        if saved is not None:
            data = data[saved : saved + part.partialLength]
            label += b"<%d>" % saved
        return label, data

    def spew_body(self, part: Any, id: int, msg: Any, _w: Any = None, _f: Any = None) -> Any:
        if not isinstance(msg, ImapMessage):
            return super().spew_body(part, id, msg, _w, _f)
        if not (part.header or part.text or part.mime or part.empty):
            (_w or self._t.write)(b"BODY " + _structure(msg, False))
            return None
        label, data = self._section_bytes(part, msg)
        (_w or self._t.write)(label + b" {%d}\r\n" % len(data) + data)
        return None

    def spew_bodystructure(self, id: int, msg: Any, _w: Any = None, _f: Any = None) -> None:
        """BODYSTRUCTURE; raw 8-bit parameters (a file name) are sent RFC 2047-encoded
        (stock: UnicodeEncodeError, connection dropped)."""
        (_w or self._t.write)(b"BODYSTRUCTURE " + _structure(msg, True))

    def spew_envelope(self, id: int, msg: Any, _w: Any = None, _f: Any = None) -> None:
        """ENVELOPE; raw 8-bit header values (stock: UnicodeEncodeError, connection
        dropped at every sync of such a mailbox) are sent RFC 2047-encoded."""
        try:
            data = imap4.collapseNestedLists([imap4.getEnvelope(msg)])
        except UnicodeError:
            data = imap4.collapseNestedLists([imap4.getEnvelope(_Rfc2047Headers(msg))])
        (_w or self._t.write)(b"ENVELOPE " + data)

    def spew_rfc822header(self, id: int, msg: Any, _w: Any = None, _f: Any = None) -> Any:
        if not isinstance(msg, ImapMessage):
            return super().spew_rfc822header(id, msg, _w, _f)
        data = msg.head
        (_w or self._t.write)(b"RFC822.HEADER {%d}\r\n" % len(data) + data)
        return None

    def spew_rfc822text(self, id: int, msg: Any, _w: Any = None, _f: Any = None) -> Any:
        if not isinstance(msg, ImapMessage):
            return super().spew_rfc822text(id, msg, _w, _f)
        data = msg.body
        (_w or self._t.write)(b"RFC822.TEXT {%d}\r\n" % len(data) + data)
        return None

    def spew_rfc822(self, id: int, msg: Any, _w: Any = None, _f: Any = None) -> Any:
        if not isinstance(msg, ImapMessage):
            return super().spew_rfc822(id, msg, _w, _f)
        data = msg.raw
        (_w or self._t.write)(b"RFC822 {%d}\r\n" % len(data) + data)
        return None
