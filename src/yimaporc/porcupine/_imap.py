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
"""

from __future__ import annotations

import email.utils
import io
import re
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.python.failure import Failure
from zope.interface import implementer

from ._mime import MimePart
from .retrieval import UserMail
from .values import DELIMITER, INBOX, Digest, MailboxInfo, MailError

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
            box.arrived().addErrback(lambda f: log.failure("IMAP refresh failed", f))


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
        pattern = imap4.wildcardToRegexp((ref or "") + (wildcard or ""), DELIMITER)
        if isinstance(pattern.pattern, bytes):
            pattern = re.compile(pattern.pattern.decode())

        def got(infos: list[MailboxInfo]) -> list[tuple[str, _Listing]]:
            self._subscribed = {i.name for i in infos if i.subscribed}
            names = [i.name for i in infos]
            out = []
            for name in names:
                if pattern.match(name) or (name == INBOX and pattern.match("inbox")):
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


class MailImapServer(imap4.IMAP4Server):
    """IMAP4Server with the fixes listed in the module docstring."""

    MAX_LENGTH = 16384

    def __init__(
        self, clock: Any, max_literal: int, chal: Any = None, contextFactory: Any = None
    ) -> None:
        super().__init__(chal, contextFactory)
        self.clock = clock
        self.max_literal = max_literal

    @property
    def _t(self) -> Any:
        return self.transport

    @property
    def _acct(self) -> Any:
        return self.account

    def callLater(self, period: float, func: Callable[[], object]) -> Any:
        """TimeoutMixin's timer, on the injected clock."""
        return self.clock.callLater(period, func)

    def connectionMade(self) -> None:
        if hasattr(self._t, "setTcpNoDelay"):
            self._t.setTcpNoDelay(True)
        super().connectionMade()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.sendLine(b"* BAD line too long")
        self._t.loseConnection()

    def _fileLiteral(self, size: int) -> Any:
        if size > self.max_literal:
            raise imap4.IllegalClientResponse(
                f"Literal too long; at most {self.max_literal} octets"
            )
        return super()._fileLiteral(size)

    def _cbAppendGotMailbox(self, mbox: Any, tag: bytes, flags: Any, date: Any, message: Any) -> Any:  # fmt: skip
        return super()._cbAppendGotMailbox(mbox, tag, flags or [], date, message)

    # --- mailbox management that waits for the store ------------------------

    def _account_op(self, tag: bytes, call: Callable[[], Any], ok: bytes) -> None:
        def failed(f: Failure) -> None:
            if f.check(MailError, imap4.MailboxException):
                self.sendNegativeResponse(tag, str(f.value).encode("utf-8", "replace"))
            else:
                log.failure("IMAP mailbox operation failed", f)
                self.sendBadResponse(tag, b"Server error")

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

    # --- FETCH / SEARCH ---------------------------------------------------------

    def do_FETCH(self, tag: bytes, messages: Any, query: Any, uid: int = 0) -> None:
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
        if isinstance(self.mbox, ImapMailbox):
            self.mbox.want_bodies = any(t.upper() in _BODY_SEARCH for t in _flat(query))
        super().do_SEARCH(tag, charset, _as_text(query), uid)

    select_SEARCH = (do_SEARCH, A.opt_charset, A.arg_searchkeys)  # type: ignore[assignment]
    del A

    def _section_bytes(self, part: Any, msg: Any) -> tuple[bytes, bytes]:
        """(label, octets) of a BODY[...] section, from the stored octets."""
        for p in part.part:
            if msg.isMultipart():
                msg = msg.getSubPart(p)
            elif p > 0:
                raise TypeError("Requested subpart of non-multipart message")
        if part.header:
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
        if not isinstance(msg, ImapMessage) or not (
            part.header or part.text or part.mime or part.empty
        ):
            return super().spew_body(part, id, msg, _w, _f)
        label, data = self._section_bytes(part, msg)
        (_w or self._t.write)(label + b" {%d}\r\n" % len(data) + data)
        return None

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
