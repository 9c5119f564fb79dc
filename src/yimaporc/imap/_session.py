"""Running IMAP commands of one connection against an :class:`~.interfaces.IImapBackend`.

:class:`CommandRunner` has one ``_do_<command>`` method per command; each
returns a :class:`Done` (or a Deferred of it) after sending its untagged data
through the sans-IO connection.  :meth:`CommandRunner.run` adds the mailbox
updates due after the command (EXPUNGE/EXISTS/FETCH FLAGS of changes made
anywhere) and the tagged response, and turns failures into ``NO``/``BAD``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import _commands as c
from . import _serialize as s
from ._append import SYSTEM_FLAGS, answer_append, check_storable, parse_date
from ._connection import ImapConnection
from ._fetch import answer_fetch, answer_search
from ._keywords import DEFAULT_KEYWORD_LIMITS
from ._listing import answer_list
from ._machine import State
from ._outcome import Done, _code, status_items
from ._selected import answer_copy, answer_select, answer_store
from ._serialize import ResponseCode
from ._view import (
    MailboxView,
    mutf7_decode,
    mutf7_encode,
    valid_mailbox_name,
)
from .interfaces import (
    IImapBackend,
    IImapSession,
    ImapError,
    IMessageRenderer,
    ISelectedMailbox,
    MailboxStatus,
    Snapshot,
)

log = Logger()

#: Kept importable from here (they live in ``_append``).
__all__ = ["SYSTEM_FLAGS", "CommandRunner", "check_storable", "parse_date"]

#: FETCH items that set \Seen unless PEEKed.
_SETS_SEEN = frozenset({"RFC822", "RFC822.TEXT"})
_CONTENT = frozenset(
    {"ENVELOPE", "BODY", "BODYSTRUCTURE", "RFC822", "RFC822.HEADER", "RFC822.TEXT"}
)


class CommandRunner:
    """The commands of one connection (one at a time; the shell keeps them in order)."""

    def __init__(
        self,
        conn: ImapConnection,
        backend: IImapBackend,
        renderer: IMessageRenderer,
        capabilities: Callable[[bool], list[str]],
        flush: Callable[[], None],
        start_tls: Callable[[], bool] | None = None,
        auth_allowed: Callable[[], bool] = lambda: True,
        writable: Callable[[], Deferred[None]] = lambda: succeed(None),
    ) -> None:
        self.conn = conn
        self.backend = backend
        self.renderer = renderer
        self.capabilities = capabilities
        self.flush = flush
        self.start_tls = start_tls
        self.auth_allowed = auth_allowed
        #: A Deferred that fires when the transport can take more output (the shell's
        #: write buffer is not full); fails with ImapError once the connection is gone.
        self.writable = writable
        self.session: IImapSession | None = None
        self.mailbox: ISelectedMailbox | None = None
        self.view: MailboxView | None = None
        self.enabled: set[str] = set()
        self.condstore = False
        self.user: str | None = None
        self._idle: Deferred[Done] | None = None
        self._idle_syncing = False
        self._idle_again = False
        self._sasl: Deferred[bytes | None] | None = None
        #: Commands answered NO/BAD by a handler, and handler failures (our bugs).
        self.failed = 0
        self.server_errors = 0
        #: Of the failed: STORE/APPEND refused ``NO [LIMIT]`` for keywords (_keywords.py).
        self.keyword_limit = 0
        self.keyword_limits = DEFAULT_KEYWORD_LIMITS
        #: Called with the counter's name each time one moves (an embedder's metrics).
        self.on_count: Callable[[str], None] | None = None

    @property
    def authed(self) -> IImapSession:
        """The logged-in user's session (the state machine admits the commands that
        use it only once there is one)."""
        if self.session is None:
            raise ImapError("not authenticated", status="BAD")
        return self.session

    @property
    def selected(self) -> ISelectedMailbox:
        """The selected mailbox (the state machine admits the commands that use it only
        in the selected state)."""
        if self.mailbox is None:
            raise ImapError("no mailbox selected", status="BAD")
        return self.mailbox

    def _count(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)
        if self.on_count is not None:
            self.on_count(name)

    # -- driving ----------------------------------------------------------------

    def run(self, cmd: c.Command) -> Deferred[None]:
        """Execute ``cmd`` completely (untagged data, updates, tagged response)."""
        bad = self.conn.check(cmd)
        if bad is not None:
            self._count("failed")
            # complete() also resumes parsing after a held IDLE/AUTHENTICATE/STARTTLS.
            self.conn.complete(cmd, "BAD", bad.text)
            self.flush()
            return succeed(None)
        if "UTF8=ACCEPT" in self.enabled:
            cmd = _internal_names(cmd)
        handler = getattr(self, "_do_" + type(cmd).__name__.lower())
        d: Deferred[Any] = maybeDeferred(handler, cmd)
        d.addCallback(lambda done: self._after(cmd, done))
        d.addErrback(self._failed, cmd)
        d.addCallback(lambda done: self._complete(cmd, done))
        return d

    def shown(self, name: str) -> str:
        """A mailbox name as this client reads it: Unicode after ENABLE UTF8=ACCEPT,
        else modified UTF-7 as stored."""
        return mutf7_decode(name) if "UTF8=ACCEPT" in self.enabled else name

    def _after(self, cmd: c.Command, done: Done) -> Any:
        if self.mailbox is None or isinstance(cmd, c.Select | c.Logout | c.Idle | c.Fetch):
            # FETCH brings the view up to date before it answers (fresh FLAGS).
            return done
        allow = getattr(cmd, "uid", True) or not isinstance(cmd, c.Fetch | c.Store | c.Search)
        # The command's own outcome stands when only the update after it fails.
        return self.refresh(allow).addCallbacks(
            lambda _: done, self._refresh_failed, errbackArgs=(done,)
        )

    def _refresh_failed(self, f: Failure, done: Done) -> Done:
        if not isinstance(f.value, ImapError):
            log.failure("imap: mailbox update failed", f)
        return done

    def _failed(self, f: Failure, cmd: c.Command) -> Done:
        self._count("failed")
        err = f.value
        if isinstance(err, ImapError):
            return Done(err.status, err.text, _code(err.code))
        self._count("server_errors")
        log.failure("imap: {command} failed", f, command=type(cmd).__name__)
        return Done("NO", "internal server error", ResponseCode("SERVERBUG"))

    def _complete(self, cmd: c.Command, done: Done) -> None:
        if isinstance(cmd, c.Select) and done.status == "NO":
            self._deselect()
        self.conn.complete(cmd, done.status, done.text, done.code)
        self.flush()
        if isinstance(cmd, c.StartTls) and done.status == "OK" and self.start_tls is not None:
            self.conn.start_tls()
            self.start_tls()

    def refresh(
        self,
        allow_expunge: bool = True,
        silent: frozenset[int] = frozenset(),
        skip: frozenset[int] = frozenset(),
    ) -> Any:
        """Send the updates of the selected mailbox since the view."""
        box = self.mailbox
        if box is None:
            return succeed(None)

        def got(snap: Snapshot) -> None:
            if self.mailbox is not box or self.view is None:
                return
            vanished = "QRESYNC" in self.enabled
            updates = self.view.update(snap, allow_expunge, vanished, self.condstore, silent, skip)
            for data in updates:
                self.conn.send(data)

        return maybeDeferred(box.snapshot).addCallback(got)

    def expunged_before(self, modseq: int) -> Any:
        """The UIDs the selected mailbox's tombstones show expunged at or before
        ``modseq`` (QRESYNC leaves them out of ``VANISHED (EARLIER)``); none when the
        backend keeps no tombstones."""
        box = self.mailbox
        if box is None:
            return succeed([])
        return maybeDeferred(box.tombstones).addCallback(
            lambda t: [uid for uid, at in t.items() if at <= modseq]
        )

    def connection_lost(self) -> None:
        """Release everything the session holds."""
        # A client gone in IDLE or mid-AUTHENTICATE is ordinary: end them quietly.
        self.idle_done(False)
        self.sasl_response(None, "connection closed")
        self._deselect()
        if self.session is not None:
            session, self.session = self.session, None
            try:
                session.logout()
            except Exception:
                log.failure("imap: logout failed")

    def _deselect(self, announce: bool = False) -> None:
        """Close the selected mailbox; ``announce``: a SELECT/EXAMINE replaces it, so a
        QRESYNC client is told (RFC 7162 3.2.11), not on LOGOUT or a dropped line."""
        box, self.mailbox, self.view = self.mailbox, None, None
        if box is not None:
            box.watch(None)
            box.close()
            if announce and self.conn.state is State.SELECTED and "QRESYNC" in self.enabled:
                self.conn.send(
                    s.StatusResponse("OK", "previous mailbox closed", ResponseCode("CLOSED"))
                )

    # -- any state ----------------------------------------------------------------

    def _do_capability(self, cmd: c.Capability) -> Done:
        self.conn.send(
            s.capability(self.capabilities(self.conn.state is not State.NOT_AUTHENTICATED))
        )
        return Done()

    def _do_noop(self, cmd: c.Noop) -> Done:
        return Done()

    def _do_logout(self, cmd: c.Logout) -> Done:
        self.conn.send(s.StatusResponse("BYE", "logging out"))
        self.connection_lost()
        return Done(text="LOGOUT completed")

    def _do_id(self, cmd: c.Id) -> Done:
        self.conn.send(s.id_response((("name", "yimaporc"), ("vendor", "yimaporc"))))
        return Done()

    # -- not authenticated --------------------------------------------------------

    def _do_starttls(self, cmd: c.StartTls) -> Done:
        if self.start_tls is None:
            return Done("BAD", "STARTTLS not available")
        return Done(text="begin TLS negotiation now")

    def _do_login(self, cmd: c.Login) -> Any:
        self._privacy()
        return self._login(cmd.user, cmd.password)

    def _privacy(self) -> None:
        if not self.auth_allowed():
            raise ImapError("use STARTTLS first", "PRIVACYREQUIRED")

    def _login(self, user: str, password: str) -> Any:
        def ok(session: Any) -> Done:
            self.session = session
            self.user = user
            caps = ResponseCode("CAPABILITY", tuple(self.capabilities(True)))
            return Done(text="logged in", code=caps)

        return maybeDeferred(self.backend.login, user, password).addCallback(ok)

    def _do_authenticate(self, cmd: c.Authenticate) -> Any:
        self._privacy()
        if cmd.mechanism != "PLAIN":
            return Done("NO", f"unsupported mechanism {cmd.mechanism}", ResponseCode("CANNOT"))
        if cmd.initial_response is not None:
            return self._plain(cmd.initial_response)
        self._sasl = Deferred()
        self.conn.sasl_challenge(b"")
        self.flush()
        return self._sasl.addCallback(self._plain)

    def sasl_response(self, data: bytes | None, error: str | None) -> None:
        """A client line during AUTHENTICATE."""
        d, self._sasl = self._sasl, None
        if d is None:
            return
        if data is None:
            d.errback(ImapError(error or "authentication cancelled", status="BAD"))
        else:
            d.callback(data)

    def _plain(self, data: bytes | None) -> Any:
        assert data is not None
        parts = data.split(b"\x00")
        if len(parts) != 3:
            raise ImapError("malformed PLAIN response", status="BAD")
        authz, user, password = (p.decode("utf-8", "replace") for p in parts)
        if authz and authz != user:
            raise ImapError("cannot act as another user", "AUTHORIZATIONFAILED")
        return self._login(user, password)

    # -- authenticated ------------------------------------------------------------

    def _do_enable(self, cmd: c.Enable) -> Done:
        offered = set(self.capabilities(True))
        asked = [
            x for x in cmd.capabilities
            if x in offered and x in ("CONDSTORE", "QRESYNC", "UTF8=ACCEPT")
        ]  # fmt: skip
        # ENABLED names what this command enabled, as asked (RFC 5161); QRESYNC
        # implies CONDSTORE (RFC 7162 3.2.3) without naming it.
        new = list(dict.fromkeys(x for x in asked if x not in self.enabled))
        self.enabled.update(asked)
        if "QRESYNC" in self.enabled:
            self.enabled.add("CONDSTORE")
        if "CONDSTORE" in self.enabled:
            self.condstore = True
        self.conn.send(s.enabled(new))
        return Done()

    def _do_namespace(self, cmd: c.Namespace) -> Done:
        self.conn.send(s.namespace((("", self.authed.delimiter),), None, None))
        return Done()

    def _do_create(self, cmd: c.Create) -> Any:
        name = cmd.mailbox.rstrip(self.authed.delimiter)
        if name == "INBOX":
            raise ImapError("INBOX exists", "ALREADYEXISTS")
        if not valid_mailbox_name(name):
            raise ImapError("mailbox name is not valid modified UTF-7", "CANNOT")
        return maybeDeferred(self.authed.create, name, cmd.special_use).addCallback(
            lambda _: Done()
        )

    def _do_delete(self, cmd: c.Delete) -> Any:
        if cmd.mailbox == "INBOX":
            raise ImapError("INBOX cannot be deleted", "CANNOT")
        return maybeDeferred(self.authed.delete, cmd.mailbox).addCallback(lambda _: Done())

    def _do_rename(self, cmd: c.Rename) -> Any:
        # RENAME INBOX is the backend's (RFC 3501 6.3.5: its messages move, INBOX stays
        # empty; ImapBackendContract pins it); INBOX itself always exists.
        if cmd.new == "INBOX":
            raise ImapError("INBOX exists", "ALREADYEXISTS")
        if not valid_mailbox_name(cmd.new):
            raise ImapError("mailbox name is not valid modified UTF-7", "CANNOT")
        return maybeDeferred(self.authed.rename, cmd.old, cmd.new).addCallback(lambda _: Done())

    def _do_subscribe(self, cmd: c.Subscribe) -> Any:
        return maybeDeferred(self.authed.subscribe, cmd.mailbox, True).addCallback(lambda _: Done())

    def _do_unsubscribe(self, cmd: c.Unsubscribe) -> Any:
        return maybeDeferred(self.authed.subscribe, cmd.mailbox, False).addCallback(
            lambda _: Done()
        )

    def _do_list(self, cmd: c.List) -> Any:
        return answer_list(self, cmd)

    def _do_lsub(self, cmd: c.Lsub) -> Any:
        return answer_list(
            self, c.List(cmd.tag, cmd.reference, (cmd.pattern,), ("SUBSCRIBED",)), lsub=True
        )

    def _do_status(self, cmd: c.Status) -> Any:
        def got(st: MailboxStatus) -> Done:
            self.conn.send(s.status(self.shown(cmd.mailbox), status_items(st, cmd.items)))
            return Done()

        return maybeDeferred(self.authed.status, cmd.mailbox).addCallback(got)

    def _do_select(self, cmd: c.Select) -> Any:
        return answer_select(self, cmd)

    def _do_append(self, cmd: c.Append) -> Any:
        return answer_append(self, cmd)

    def _do_idle(self, cmd: c.Idle) -> Any:
        self._idle = Deferred()
        self.conn.idle_started()
        self.flush()
        if self.mailbox is not None:
            self.mailbox.watch(self._idle_changed)
            self._idle_changed()
        return self._idle

    def _idle_changed(self) -> None:
        if self._idle_syncing:
            self._idle_again = True
            return
        self._idle_syncing = True
        self._idle_again = False

        def done(_: object) -> None:
            self._idle_syncing = False
            self.flush()
            if self._idle_again and self._idle is not None and not self._idle.called:
                self._idle_changed()

        self.refresh(True).addErrback(
            lambda f: log.failure("imap: IDLE refresh failed", f)
        ).addBoth(done)

    def idle_done(self, valid: bool) -> None:
        """The client ended IDLE."""
        d, self._idle = self._idle, None
        if self.mailbox is not None:
            self.mailbox.watch(None)
        if d is not None and not d.called:
            d.callback(Done(text="IDLE terminated") if valid else Done("BAD", "expected DONE"))

    # -- selected -----------------------------------------------------------------

    def _do_check(self, cmd: c.Check) -> Done:
        return Done()

    def _do_close(self, cmd: c.Close) -> Any:
        box = self.selected
        d = succeed(None) if box.readonly else maybeDeferred(box.expunge, None)

        def closed(_: object) -> Done:
            self.mailbox = None  # CLOSE expunges silently (no EXPUNGE responses)
            self.view = None
            box.watch(None)
            box.close()
            return Done()

        return d.addCallback(closed)

    def _do_unselect(self, cmd: c.Unselect) -> Done:
        box, self.mailbox, self.view = self.selected, None, None
        box.watch(None)
        box.close()
        return Done()

    def _writable(self) -> None:
        if self.selected.readonly:
            raise ImapError("mailbox is read-only")

    def _do_expunge(self, cmd: c.Expunge) -> Any:
        self._writable()
        assert self.view is not None
        uids = None if cmd.uid_set is None else self.view.resolve(cmd.uid_set, True)
        return maybeDeferred(self.selected.expunge, uids).addCallback(lambda _: Done())

    def _do_search(self, cmd: c.Search) -> Any:
        return answer_search(self, cmd)

    def _do_fetch(self, cmd: c.Fetch) -> Any:
        return answer_fetch(self, cmd)

    def _do_store(self, cmd: c.Store) -> Any:
        return answer_store(self, cmd)

    def _do_copy(self, cmd: c.Copy | c.Move) -> Any:
        return answer_copy(self, cmd)

    _do_move = _do_copy


def _internal_names(cmd: c.Command) -> c.Command:
    """``cmd`` with its Unicode mailbox names (UTF8=ACCEPT) in modified UTF-7, the form
    backends store and the rest of the package handles."""
    if isinstance(cmd, c.Rename):
        return attrs.evolve(cmd, old=mutf7_encode(cmd.old), new=mutf7_encode(cmd.new))
    if isinstance(cmd, c.List):
        return attrs.evolve(
            cmd,
            reference=mutf7_encode(cmd.reference),
            patterns=tuple(mutf7_encode(p) for p in cmd.patterns),
        )
    if isinstance(cmd, c.Lsub):
        return attrs.evolve(
            cmd, reference=mutf7_encode(cmd.reference), pattern=mutf7_encode(cmd.pattern)
        )
    name = getattr(cmd, "mailbox", None)
    if isinstance(name, str) and name != "INBOX":
        return attrs.evolve(cmd, mailbox=mutf7_encode(name))  # type: ignore[misc,arg-type]
    return cmd
