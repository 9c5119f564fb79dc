"""Porcupine's IMAP backend: :mod:`yimaporc.imap` over a user's :class:`~.retrieval.UserMail`.

One :class:`PorcupineImapBackend` per connection (it holds that connection's
:class:`~.auth.ThrottledPortal`); a login opens a :class:`PorcupineSession`
over the user's ``UserMail``, a SELECT a :class:`PorcupineMailbox` whose
snapshots are the merged digests of every fragment (every node holding the
user's mail), so other sessions' changes anywhere in the cluster reach the
session after each command, on NOOP and (woken by :class:`MailboxRegistry`:
local changes at once, other nodes' on the cluster's poll) during IDLE.

Error mapping: a wrong password is ``NO [AUTHENTICATIONFAILED]``, a throttled
login or an unreachable node ``NO [UNAVAILABLE]``; a missing mailbox
``NONEXISTENT`` (``TRYCREATE`` for APPEND/COPY/MOVE), an existing one
``ALREADYEXISTS``; a listing that would lack mail on a node out of reach
``NO [UNAVAILABLE]`` (never a smaller mailbox: a syncing client would take the
missing messages as expunged).

MODSEQs come from the fragment store (:mod:`._modseq`): every message has one,
HIGHESTMODSEQ is the merged value of :func:`.retrieval.merge_trees`, STORE
``UNCHANGEDSINCE`` is checked by each node inside its flag-change transaction,
and QRESYNC leaves out of ``VANISHED (EARLIER)`` what the nodes' tombstones
show went before the client's mod-sequence; so CONDSTORE and QRESYNC are
advertised (docs/mail.md, "Mod-sequences").
The special-use mailboxes (Sent, Drafts, Trash, Junk, Archive) are created at
login when missing, as Dovecot's ``auto = create`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.cred import credentials, error
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from ..cluster.rpc import PeerUnavailable
from ..imap._message import Message
from ..imap._search import Need, Scope, SearchError, View, compile_search
from ..imap.interfaces import (
    AppendResult,
    CopyResult,
    IImapBackend,
    IImapSession,
    ImapError,
    ISelectedMailbox,
    MailboxListing,
    MailboxStatus,
    MessageInfo,
    Snapshot,
)
from ._guard import ClientErrors
from ._imap_errors import as_imap_error as as_imap_error  # re-exported
from ._imap_registry import SPECIAL_USE_MAX as SPECIAL_USE_MAX  # re-exported
from ._imap_registry import SPECIAL_USE_TTL as SPECIAL_USE_TTL  # re-exported
from ._imap_registry import MailboxRegistry
from .retrieval import Retry, UserMail
from .throttle import LoginThrottled
from .values import (
    DELIMITER,
    INBOX,
    Digest,
    MailboxExists,
    MailboxInfo,
    MailUnavailable,
)

if TYPE_CHECKING:
    from twisted.cred.portal import Portal

    from .auth import ThrottledPortal


log = Logger()

#: Special-use mailboxes every user has (RFC 6154), by name.
SPECIAL_USE = {
    "Sent": "\\Sent",
    "Drafts": "\\Drafts",
    "Trash": "\\Trash",
    "Junk": "\\Junk",
    "Archive": "\\Archive",
}
PERMANENT_FLAGS = ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")
#: Messages loaded at once by a SEARCH that reads headers or bodies.
SEARCH_BATCH = 200


def _canonical(name: str) -> str:
    return INBOX if name.upper() == INBOX else name


@implementer(IImapBackend)
class PorcupineImapBackend:
    """Logs a connection's user in through the node's (throttled) portal."""

    supports_modseq = True
    #: MULTIAPPEND: :meth:`PorcupineSession.append_many`; BINARY: APPEND stores what
    #: it is given (the shell makes line ends CRLF except in a ``~{n}`` literal8).
    extensions = ("MULTIAPPEND", "BINARY")

    def __init__(
        self,
        portal: ThrottledPortal | Portal,
        registry: MailboxRegistry,
        clock: IReactorTime,
        errors: ClientErrors | None = None,
        interface: type[Interface] | None = None,
    ) -> None:
        from .auth import IImapUser

        self.portal = portal
        self.registry = registry
        self.clock = clock
        self.errors = errors
        self.interface = interface or IImapUser

    def login(self, user: str, password: str) -> Deferred[PorcupineSession]:
        creds = credentials.UsernamePassword(user.encode("utf-8"), password.encode("utf-8"))
        d: Deferred[Any] = self.portal.login(creds, None, self.interface)
        return d.addCallbacks(self._logged_in, self._failed)

    def _logged_in(self, avatar: tuple[Any, UserMail, Callable[[], None]]) -> Any:
        _, mail, logout = avatar
        session = PorcupineSession(self, mail, logout)
        return session.autocreate().addCallback(lambda _: session)

    def _failed(self, f: Failure) -> None:
        if f.check(LoginThrottled):
            raise ImapError("too many failed logins, try later", "UNAVAILABLE")
        if f.check(error.UnauthorizedLogin):
            raise ImapError("authentication failed", "AUTHENTICATIONFAILED")
        if f.check(PeerUnavailable):  # the node holding the profile is down or slow
            if self.errors is not None:
                self.errors.counts["imap.login_peer_unavailable"] += 1
        else:
            log.failure("IMAP login check failed", f)
        raise ImapError("temporary authentication failure", "UNAVAILABLE")


@implementer(IImapSession)
class PorcupineSession:
    """One logged-in user: the mailbox tree and APPEND over ``UserMail``."""

    delimiter = DELIMITER

    def __init__(
        self, backend: PorcupineImapBackend, mail: UserMail, on_logout: Callable[[], None]
    ) -> None:
        self.backend = backend
        self.mail = mail
        self.on_logout = on_logout
        self.boxes: list[PorcupineMailbox] = []

    def autocreate(self) -> Deferred[None]:
        """Create the missing special-use mailboxes (best effort: a failure is logged).
        A login of a user whose check is running on this node waits for that one."""
        address = self.mail.address
        registry = self.backend.registry
        clock = self.backend.clock
        if registry.special_use_known(address, clock.seconds()):
            return succeed(None)
        running = registry.autocreating
        waiting = running.get(address)
        if waiting is not None:
            joined: Deferred[None] = Deferred()
            waiting.append(joined)
            return joined
        running[address] = []

        def exists(f: Failure) -> None:
            f.trap(MailboxExists)  # made meanwhile (another node's login): as wanted

        def create(infos: list[MailboxInfo]) -> Deferred[Any]:
            have = {i.name for i in infos}
            # the merged tree just read lacks them: no fragment asked again per name
            ds = [
                self.mail.create(n, absent=True).addErrback(exists)
                for n in SPECIAL_USE
                if n not in have
            ]
            d = gatherResults(ds, consumeErrors=True) if ds else succeed(None)
            return d.addCallback(lambda _: registry.special_use_found(address, clock.seconds()))

        def failed(f: Failure) -> None:
            log.warn(
                "imap: special-use mailboxes of {u} not created: {e}",
                u=self.mail.address,
                e=f.getErrorMessage(),
            )

        def land(_: None) -> None:
            for joined in running.pop(address, []):
                joined.callback(None)

        # maybeDeferred: a raise must not leave the waiters of this user waiting for ever
        d = maybeDeferred(self.mail.mailboxes).addCallback(create)
        return d.addCallbacks(lambda _: None, failed).addCallback(land)

    def _info(self, name: str, missing: str = "NONEXISTENT") -> Deferred[MailboxInfo]:
        want = _canonical(name)

        def find(infos: list[MailboxInfo]) -> MailboxInfo:
            for i in infos:
                if i.name == want:
                    return i
            raise ImapError(f"no mailbox {name}", missing)

        return self.mail.mailboxes().addCallbacks(find, as_imap_error)

    def list_mailboxes(self) -> Deferred[list[MailboxListing]]:
        def listing(infos: list[MailboxInfo]) -> list[MailboxListing]:
            return [
                MailboxListing(
                    i.name, (SPECIAL_USE[i.name],) if i.name in SPECIAL_USE else (), i.subscribed
                )
                for i in infos
            ]

        return self.mail.mailboxes().addCallbacks(listing, as_imap_error)

    def create(self, name: str, special_use: tuple[str, ...]) -> Deferred[None]:
        wanted = SPECIAL_USE.get(name)
        if special_use and tuple(special_use) != ((wanted,) if wanted else ()):
            # Special use follows the name here (Sent is \Sent, ...).
            raise ImapError("special use is given by the name here", "USEATTR")
        return self.mail.create(name).addCallbacks(lambda _: None, as_imap_error)

    def delete(self, name: str) -> Deferred[None]:
        self.backend.registry.special_use_changed(self.mail.address)
        return self.mail.delete_mailbox(name).addErrback(as_imap_error)

    def rename(self, old: str, new: str) -> Deferred[None]:
        self.backend.registry.special_use_changed(self.mail.address)
        return self.mail.rename(_canonical(old), new.rstrip(DELIMITER)).addErrback(as_imap_error)

    def subscribe(self, name: str, on: bool) -> Deferred[None]:
        return self.mail.subscribe(_canonical(name), on).addErrback(as_imap_error)

    def _open(self, name: str) -> Deferred[tuple[MailboxInfo, list[Digest]]]:
        """The mailbox's info and its (complete) digests, one ask per fragment node."""
        want = _canonical(name)

        def find(got: tuple[list[MailboxInfo], list[Digest]]) -> tuple[MailboxInfo, list[Digest]]:
            for i in got[0]:
                if i.name == want:
                    return i, got[1]
            raise ImapError(f"no mailbox {name}", "NONEXISTENT")

        return self.mail.open_mailbox(want, complete=True).addCallbacks(find, as_imap_error)

    def status(self, name: str) -> Deferred[MailboxStatus]:
        def count(opened: tuple[MailboxInfo, list[Digest]]) -> MailboxStatus:
            info, digests = opened
            unseen = sum(1 for d in digests if "\\Seen" not in d.flags)
            deleted = sum(1 for d in digests if "\\Deleted" in d.flags)
            top = max((d.uid for d in digests), default=0)
            return MailboxStatus(
                len(digests),
                max(info.uidnext, top + 1),
                info.uidvalidity,
                unseen,
                0,
                max(1, info.highestmodseq),
                sum(d.size for d in digests),
                deleted,
            )

        return self._open(name).addCallback(count)

    def append(
        self, name: str, message: bytes, flags: tuple[str, ...], date: float | None
    ) -> Deferred[AppendResult]:
        body = message  # line ends made CRLF by the shell unless sent as a literal8
        when = self.backend.clock.seconds() if date is None else date

        def attempt(deadline: float) -> Deferred[tuple[MailboxInfo, Digest]]:
            def store(info: MailboxInfo) -> Deferred[tuple[MailboxInfo, Digest]]:
                d = self.mail.append(info.name, body, flags, when, deadline)
                return d.addCallbacks(lambda got: (info, got), _store_retry)

            return self._info_retry(name).addCallback(store)

        def stored(got: tuple[MailboxInfo, Digest]) -> AppendResult:
            info, digest = got
            self.backend.registry.changed(self.mail.address, info.name)
            for box in self.boxes:
                if box.name == info.name:
                    box.uidnext = max(box.uidnext, digest.uid + 1)
            return AppendResult(info.uidvalidity, digest.uid)

        d = self.mail.failover(attempt)
        return d.addCallbacks(stored, as_imap_error, errbackArgs=("TRYCREATE",))

    def _info_retry(self, name: str) -> Deferred[MailboxInfo]:
        """:meth:`_info` for APPEND: a node out of reach while looking the mailbox up
        (a read: redone safely, even after a timeout) may be retried."""
        want = _canonical(name)

        def find(infos: list[MailboxInfo]) -> MailboxInfo:
            for i in infos:
                if i.name == want:
                    return i
            raise ImapError(f"no mailbox {name}", "TRYCREATE")

        def unreachable(f: Failure) -> Failure:
            if f.check(PeerUnavailable, MailUnavailable):
                raise Retry(f)
            return f

        return self.mail.mailboxes().addCallbacks(find, unreachable)

    def append_many(
        self, name: str, messages: list[tuple[bytes, tuple[str, ...], float | None]]
    ) -> Deferred[list[AppendResult]]:
        """MULTIAPPEND: one store of every message (bodies written first, then the index
        rows in one transaction: all visible together, or none; see
        :meth:`UserMail.append_many`)."""
        now = self.backend.clock.seconds()
        items = [(m, f, now if d is None else d) for m, f, d in messages]

        def attempt(deadline: float) -> Deferred[tuple[MailboxInfo, list[Digest]]]:
            def store(info: MailboxInfo) -> Deferred[tuple[MailboxInfo, list[Digest]]]:
                d = self.mail.append_many(info.name, items, deadline)
                return d.addCallbacks(lambda got: (info, got), _store_retry)

            return self._info_retry(name).addCallback(store)

        def stored(got: tuple[MailboxInfo, list[Digest]]) -> list[AppendResult]:
            info, digests = got
            self.backend.registry.changed(self.mail.address, info.name)
            top = max((x.uid for x in digests), default=0)
            for box in self.boxes:
                if box.name == info.name:
                    box.uidnext = max(box.uidnext, top + 1)
            return [AppendResult(info.uidvalidity, x.uid) for x in digests]

        d = self.mail.failover(attempt)
        return d.addCallbacks(stored, as_imap_error, errbackArgs=("TRYCREATE",))

    def select(self, name: str, readonly: bool) -> Deferred[PorcupineMailbox]:
        def opened(got: tuple[MailboxInfo, list[Digest]]) -> PorcupineMailbox:
            box = PorcupineMailbox(self, got[0], readonly, first=got[1])
            self.boxes.append(box)
            self.backend.registry.open(box)
            return box

        return self._open(name).addCallback(opened)

    def logout(self) -> None:
        for box in list(self.boxes):
            box.close()
        self.on_logout()


@implementer(ISelectedMailbox)
class PorcupineMailbox:
    """A selected mailbox: snapshots from the merged digests of every fragment."""

    flags = PERMANENT_FLAGS
    permanent_flags = PERMANENT_FLAGS

    def __init__(
        self,
        session: PorcupineSession,
        info: MailboxInfo,
        readonly: bool,
        first: list[Digest] | None = None,
    ) -> None:
        self.session = session
        #: The digests read with the mailbox's info at SELECT: the first snapshot.
        self._first = first
        self.mail = session.mail
        self.registry = session.backend.registry
        self.name = info.name
        self.uidvalidity = info.uidvalidity
        #: Never goes back while the mailbox is selected (a node out of reach cannot
        #: lower it, docs/mail.md).
        self.uidnext = info.uidnext
        self.readonly = readonly
        self.digests: dict[int, Digest] = {}
        #: HIGHESTMODSEQ as SELECT read it (the only place a client is shown it while
        #: selected; later snapshots list changes by their own MODSEQs).
        self.highestmodseq = max(1, info.highestmodseq)
        self._last: Snapshot | None = None
        self._watch: Callable[[], None] | None = None
        self.closed = False

    # -- the snapshot -------------------------------------------------------------

    def snapshot(self) -> Deferred[Snapshot]:
        # complete: NO [UNAVAILABLE] rather than a listing lacking mail out of reach
        first, self._first = self._first, None
        d: Deferred[Any] = (
            succeed(first) if first is not None else self.mail.digests(self.name, complete=True)
        )
        d.addCallbacks(self._snap, as_imap_error)
        if self._watch is not None and self._last is not None:
            d.addErrback(self._no_news)
        return d

    def _no_news(self, f: Failure) -> Snapshot:
        """During IDLE a node out of reach means no news (one warning line, no
        traceback: the next poll tries again); the last snapshot stands."""
        f.trap(ImapError)
        log.warn(
            "imap: IDLE refresh of {u}/{m} failed: {e}",
            u=self.mail.address,
            m=self.name,
            e=f.getErrorMessage(),
        )
        assert self._last is not None
        return self._last

    def _snap(self, digests: list[Digest]) -> Snapshot:
        self.digests = {d.uid: d for d in digests}
        if digests:
            self.uidnext = max(self.uidnext, digests[-1].uid + 1)
        messages = tuple(
            MessageInfo(d.uid, tuple(d.flags), d.size, d.internal_date, max(1, d.modseq))
            for d in digests
        )
        last = self._last
        if last is not None and last.messages == messages and last.uidnext == self.uidnext:
            return last  # unchanged: the shell skips the diff
        self._last = Snapshot(messages, self.uidnext, self.highestmodseq)
        return self._last

    def _known(self, uids: Sequence[int]) -> list[Digest]:
        return [self.digests[u] for u in uids if u in self.digests]

    def changed(self) -> None:
        """Something may have changed (registry): wake an IDLE."""
        if self._watch is not None:
            self._watch()

    def _notify(self, mailbox: str | None = None) -> None:
        self.registry.changed(self.mail.address, mailbox or self.name)

    # -- messages ------------------------------------------------------------------

    def load(self, uids: list[int]) -> Deferred[dict[int, bytes]]:
        return self.mail.fetch(self.name, self._known(uids)).addErrback(as_imap_error)

    def store(
        self, uids: list[int], mode: str, flags: tuple[str, ...], unchanged_since: int | None
    ) -> Deferred[list[int]]:
        digests = self._known(uids)
        if not digests:
            return succeed([])
        how = {"": 0, "+": 1, "-": -1}[mode]
        d = self.mail.set_flags(self.name, digests, flags, how, unchanged_since)

        def done(updated: dict[int, tuple[str, ...]]) -> Any:
            for uid, new in updated.items():
                old = self.digests.get(uid)
                if old is not None:
                    self.digests[uid] = attrs.evolve(old, flags=tuple(new))
            self._notify()
            left = [x.uid for x in digests if x.uid not in updated]
            if unchanged_since is None or not left:
                return []
            # left out: changed since (MODIFIED), or expunged meanwhile (not reported)
            fresh = self.mail.digests(self.name)
            return fresh.addCallback(lambda now: sorted({x.uid for x in now} & set(left)))

        return d.addCallbacks(done, as_imap_error)

    def tombstones(self) -> Deferred[dict[int, int]]:
        """``{uid: modseq}`` of the expunges the fragment nodes remember (QRESYNC)."""
        return self.mail.tombstones(self.name).addErrback(as_imap_error)

    def expunge(self, uids: list[int] | None) -> Deferred[None]:
        wanted = None if uids is None else set(uids)

        def remove(digests: list[Digest]) -> Deferred[None]:
            gone = [
                d for d in digests if "\\Deleted" in d.flags and (wanted is None or d.uid in wanted)
            ]
            if not gone:
                return succeed(None)
            return self.mail.delete(self.name, gone).addCallback(lambda _: self._notify())

        d: Deferred[None] = self.mail.digests(self.name, complete=True).addCallback(remove)
        return d.addErrback(as_imap_error)

    def copy(self, uids: list[int], dest: str) -> Deferred[CopyResult]:
        """COPY; like APPEND, tried again while it fails before anything was written
        (the user's manager paused: :meth:`UserMail.failover`)."""
        digests = self._known(uids)

        def attempt(deadline: float) -> Deferred[tuple[MailboxInfo, list[Digest]]]:
            def run(info: MailboxInfo) -> Deferred[tuple[MailboxInfo, list[Digest]]]:
                if not digests:
                    return succeed((info, []))
                d = self.mail.copy(self.name, digests, info.name, deadline)
                return d.addCallbacks(lambda new: (info, new), _store_retry)

            return self.session._info_retry(dest).addCallback(run)

        def done(got: tuple[MailboxInfo, list[Digest]]) -> CopyResult:
            info, new = got
            if not digests:
                return CopyResult(info.uidvalidity, (), ())
            self._notify(info.name)
            # Copies are made in the order of the sources, UIDs ascending.
            pairs = list(zip(digests, sorted(new, key=lambda x: x.uid), strict=False))
            return CopyResult(
                info.uidvalidity,
                tuple(s.uid for s, _ in pairs),
                tuple(n.uid for _, n in pairs),
            )

        d = self.mail.failover(attempt)
        return d.addCallbacks(done, as_imap_error, errbackArgs=("TRYCREATE",))

    def move(self, uids: list[int], dest: str) -> Deferred[CopyResult]:
        if _canonical(dest) == self.name:
            raise ImapError("cannot move into the same mailbox", "CANNOT")

        def remove(result: CopyResult) -> Deferred[CopyResult]:
            moved = self._known(result.source_uids)
            if not moved:
                return succeed(result)
            d = self.mail.delete(self.name, moved)

            def done(_: object) -> CopyResult:
                self._notify()
                return result

            return d.addCallbacks(done, as_imap_error)

        return self.copy(uids, dest).addCallback(remove)

    # -- SEARCH ----------------------------------------------------------------------

    def search(
        self, criteria: tuple[Any, ...], charset: str | None, view: list[MessageInfo]
    ) -> Deferred[list[int]]:
        try:
            program = compile_search(list(criteria), charset)
        except SearchError as e:
            raise ImapError(e.text, e.code, e.status) from None
        scope = Scope(len(view), max((m.uid for m in view), default=0))
        numbered = [(i + 1, m) for i, m in enumerate(view)]
        if program.need is Need.METADATA:
            return succeed(
                [m.uid for seq, m in numbered if program.matches(_view(seq, m, None), scope)]
            )
        headers_only = program.need is Need.HEADERS
        out: list[int] = []

        def batch(start: int) -> Deferred[list[int]]:
            chunk = numbered[start : start + SEARCH_BATCH]
            if not chunk:
                return succeed(out)

            def match(raws: dict[int, bytes]) -> Deferred[list[int]]:
                for seq, m in chunk:
                    raw = raws.get(m.uid)
                    if raw is None:
                        continue  # expunged meanwhile
                    if headers_only:
                        raw = raw[: _header_end(raw)]
                    if program.matches(_view(seq, m, Message(raw)), scope):
                        out.append(m.uid)
                return batch(start + SEARCH_BATCH)

            return self.load([m.uid for _, m in chunk]).addCallback(match)

        return batch(0)

    # -- watching and closing ----------------------------------------------------------

    def watch(self, callback: Callable[[], None] | None) -> None:
        self._watch = callback

    def close(self) -> None:
        self._watch = None
        if not self.closed:
            self.closed = True
            self.registry.close(self)
            if self in self.session.boxes:
                self.session.boxes.remove(self)


def _view(seq: int, m: MessageInfo, message: Message | None) -> View:
    return View(seq, m.uid, m.flags, m.internal_date, m.size, m.modseq, message)


def _header_end(raw: bytes) -> int:
    """Where the header ends (with its blank line); the whole message if it has none."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        at = raw.find(sep)
        if at >= 0:
            return at + len(sep)
    return len(raw)


def _store_retry(f: Failure) -> Failure:
    """An APPEND/COPY that failed before its store was sent (part of the mail out of
    reach when looked up or read: ``MailUnavailable``) may be tried again.  A store
    that failed is not, even refused at once: a replicated store may have logged
    its copy here before a peer failed it, and a timed-out one may still land."""
    if f.check(MailUnavailable):
        raise Retry(f)
    return f
