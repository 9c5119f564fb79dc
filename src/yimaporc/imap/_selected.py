"""The selected state of :class:`~._session.CommandRunner`: SELECT/EXAMINE (with
CONDSTORE and QRESYNC), STORE, COPY and MOVE."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import maybeDeferred

from . import _commands as c
from . import _serialize as s
from ._append import check_storable
from ._keywords import check_store, may_create
from ._outcome import Done
from ._serialize import ResponseCode
from ._view import MailboxView, absent_uids, uid_set_text
from .interfaces import CopyResult, ImapError, ISelectedMailbox, Snapshot

if TYPE_CHECKING:
    from ._session import CommandRunner


def answer_select(runner: CommandRunner, cmd: c.Select) -> Any:
    """SELECT/EXAMINE: replace the selected mailbox, send its state (and the QRESYNC
    catch-up when asked)."""
    if cmd.qresync is not None and "QRESYNC" not in runner.enabled:
        raise ImapError("QRESYNC is not enabled", status="BAD")
    runner._deselect(announce=True)
    if cmd.condstore:
        runner.condstore = True
    d = maybeDeferred(runner.authed.select, cmd.mailbox, cmd.readonly)

    def opened(box: ISelectedMailbox) -> Any:
        runner.mailbox = box
        return maybeDeferred(box.snapshot).addCallback(
            lambda snap: _selected(runner, cmd, box, snap)
        )

    return d.addCallback(opened)


def _selected(runner: CommandRunner, cmd: c.Select, box: ISelectedMailbox, snap: Snapshot) -> Any:
    if runner.mailbox is not box:
        raise ImapError("mailbox closed meanwhile")
    view = runner.view = MailboxView(snap)
    send = runner.conn.send
    send(s.flags(box.flags))
    perm: tuple[str, ...] = () if box.readonly else tuple(box.permanent_flags)
    if not box.readonly and may_create(runner.keyword_limits, view.messages):
        perm = (*perm, "\\*")  # RFC 9051 7.1: while new keywords can be made
    send(s.StatusResponse("OK", "flags permitted", ResponseCode("PERMANENTFLAGS", perm)))
    send(s.exists(len(view)))
    send(s.recent(0))
    unseen = next((i + 1 for i, m in enumerate(view.messages) if "\\Seen" not in m.flags), None)
    if unseen is not None:
        send(s.StatusResponse("OK", "first unseen", ResponseCode.number("UNSEEN", unseen)))
    send(s.StatusResponse("OK", "UIDs valid", ResponseCode.number("UIDVALIDITY", box.uidvalidity)))
    send(s.StatusResponse("OK", "predicted next UID", ResponseCode.number("UIDNEXT", snap.uidnext)))
    if runner.backend.supports_modseq:
        code = ResponseCode.number("HIGHESTMODSEQ", max(1, snap.highestmodseq))
        send(s.StatusResponse("OK", "highest modseq", code))
    elif runner.condstore:
        send(s.StatusResponse("OK", "no modseqs here", ResponseCode("NOMODSEQ")))
    access = "READ-ONLY" if box.readonly else "READ-WRITE"
    done = Done(
        text=f"{'EXAMINE' if cmd.readonly else 'SELECT'} completed", code=ResponseCode(access)
    )
    q = cmd.qresync
    if q is not None and q.uidvalidity == box.uidvalidity:
        d = runner.expunged_before(q.modseq)
        return d.addCallback(lambda old: _qresync(runner, q, view, snap, old)).addCallback(
            lambda _: done
        )
    return done


def _qresync(
    runner: CommandRunner, q: c.Qresync, view: MailboxView, snap: Snapshot, old: list[int]
) -> None:
    if runner.mailbox is None or runner.view is not view:
        raise ImapError("mailbox closed meanwhile")
    present = sorted(m.uid for m in snap.messages)
    gone = absent_uids(q.known_uids or "1:*", present, snap.uidnext, old)
    if gone:
        runner.conn.send(s.vanished(gone, earlier=True))
    for i, m in enumerate(view.messages):
        if m.modseq > q.modseq:
            runner.conn.send(
                s.fetch(i + 1, [("UID", m.uid), ("FLAGS", m.flags), ("MODSEQ", m.modseq)])
            )


def answer_store(runner: CommandRunner, cmd: c.Store) -> Any:
    """STORE (with UNCHANGEDSINCE): change flags, then send the updates."""
    runner._writable()
    for f in cmd.flags:
        check_storable(f)
    assert runner.view is not None
    uids = runner.view.resolve(cmd.sequence_set, cmd.uid)
    view = runner.view
    targets = [m for m in map(view.info, uids) if m is not None]
    try:
        check_store(runner.keyword_limits, cmd.mode, cmd.flags, targets, view.messages)
    except ImapError:
        runner._count("keyword_limit")
        raise
    if cmd.unchanged_since is not None:
        runner.condstore = True
    box = runner.selected
    d = maybeDeferred(box.store, uids, cmd.mode, cmd.flags, cmd.unchanged_since)

    def stored(modified: list[int]) -> Any:
        silent = frozenset(uids) if cmd.silent else frozenset()
        r = runner.refresh(cmd.uid, silent)
        if modified:
            assert runner.view is not None
            if cmd.uid:
                text = uid_set_text(modified)
            else:
                text = uid_set_text(q for q in (runner.view.seq_of(u) for u in modified) if q)
            if text:
                return r.addCallback(
                    lambda _: Done(
                        "OK",
                        "some messages changed meanwhile",
                        ResponseCode("MODIFIED", (text,)),
                    )
                )
        return r.addCallback(lambda _: Done())

    return d.addCallback(stored)


def answer_copy(runner: CommandRunner, cmd: c.Copy | c.Move) -> Any:
    """COPY or MOVE, answered with COPYUID."""
    if isinstance(cmd, c.Move):
        runner._writable()
    assert runner.view is not None
    uids = runner.view.resolve(cmd.sequence_set, cmd.uid)
    if not uids:
        return Done(text="no messages")
    box = runner.selected
    op = box.move if isinstance(cmd, c.Move) else box.copy

    def done(r: CopyResult) -> Any:
        code = None
        if r.source_uids and all(u > 0 for u in r.dest_uids):
            # (copies not numbered yet, as APPEND's: no COPYUID rather than a bad one)
            code = ResponseCode.copyuid(
                r.uidvalidity, uid_set_text(r.source_uids), _pairs(r.dest_uids)
            )
        if isinstance(cmd, c.Move):
            if code is not None:
                runner.conn.send(s.StatusResponse("OK", "moved", code))
            return runner.refresh(True).addCallback(lambda _: Done())
        return Done(code=code)

    return maybeDeferred(op, uids, cmd.mailbox).addCallback(done)


def _pairs(uids: tuple[int, ...]) -> str:
    # COPYUID pairs source and destination UIDs by position: keep the order.
    return ",".join(str(u) for u in uids) if list(uids) != sorted(uids) else uid_set_text(uids)
