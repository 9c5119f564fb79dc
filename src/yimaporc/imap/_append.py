"""APPEND (with MULTIAPPEND, BINARY and UTF8 literals) for :class:`~._session.CommandRunner`,
and the flag and date checks it shares with STORE."""

from __future__ import annotations

import datetime as _dt
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import maybeDeferred

from . import _commands as c
from ._keywords import check_mailbox, check_new
from ._message import canonical_crlf
from ._outcome import Done
from ._serialize import ResponseCode
from ._view import uid_set_text
from .interfaces import AppendResult, ImapError

if TYPE_CHECKING:
    from ._session import CommandRunner


SYSTEM_FLAGS = ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")
_STORABLE_SYSTEM = frozenset(f.upper() for f in SYSTEM_FLAGS)


def parse_date(text: str | None) -> float | None:
    """APPEND date-time -> POSIX time."""
    if text is None:
        return None
    return _dt.datetime.strptime(text.strip(), "%d-%b-%Y %H:%M:%S %z").timestamp()


def check_storable(flag: str) -> None:
    """BAD for a system flag clients may not store (\\Recent, unknown ones)."""
    if flag.startswith("\\") and flag.upper() not in _STORABLE_SYSTEM:
        raise ImapError(f"flag {flag} cannot be stored", status="BAD")


def _check_keywords(runner: CommandRunner, cmd: c.Append) -> None:
    """``NO [LIMIT]`` (counted) for keywords past a bound; the mailbox bound only when
    ``cmd`` appends to the selected mailbox (another one's keywords are not at hand)."""
    limits = runner.keyword_limits
    try:
        new: set[str] = set()
        for m in cmd.messages():
            new |= check_new(limits, m.flags)
        box, view = runner.mailbox, runner.view
        if box is not None and view is not None and _same(box.name, cmd.mailbox):
            check_mailbox(limits, new, view.messages)
    except ImapError:
        runner._count("keyword_limit")
        raise


def _same(a: str, b: str) -> bool:
    return a == b or a.upper() == b.upper() == "INBOX"


def answer_append(runner: CommandRunner, cmd: c.Append) -> Any:
    """APPEND (one message, or several with MULTIAPPEND), answered with APPENDUID."""
    items = []
    if any(m.binary for m in cmd.messages()) and "BINARY" not in runner.capabilities(True):
        raise ImapError("BINARY is not supported", status="BAD")
    if any(m.utf8 for m in cmd.messages()) and "UTF8=ACCEPT" not in runner.enabled:
        raise ImapError("UTF8 needs ENABLE UTF8=ACCEPT", status="BAD")
    for m in cmd.messages():
        for f in m.flags:
            check_storable(f)
    _check_keywords(runner, cmd)
    for m in cmd.messages():
        # Line ends made CRLF (sizes then agree with what clients read, as Dovecot
        # presents them), except in a literal8: BINARY keeps every octet.
        raw = m.message if m.binary else canonical_crlf(m.message)
        try:
            items.append((raw, m.flags, parse_date(m.date)))
        except ValueError:
            raise ImapError("bad date-time", status="BAD") from None
    if cmd.more:
        if "MULTIAPPEND" not in runner.capabilities(True):
            raise ImapError("MULTIAPPEND is not supported", status="BAD")
        d = maybeDeferred(runner.authed.append_many, cmd.mailbox, items)
    else:
        message, flags, date = items[0]
        d = maybeDeferred(runner.authed.append, cmd.mailbox, message, flags, date)
        d.addCallback(lambda r: [r])

    def stored(results: list[AppendResult]) -> Done:
        if not all(r.uid > 0 for r in results):
            # Stored, but not numbered yet (Porcupine's mail held through a partition):
            # RFC 4315 has no way to say so but to leave APPENDUID out.
            return Done(text="APPEND completed")
        validity = results[0].uidvalidity
        uids = uid_set_text([r.uid for r in results])
        return Done(text="APPEND completed", code=ResponseCode.appenduid(validity, uids))

    return d.addCallback(stored)
