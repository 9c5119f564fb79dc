"""LIST and LSUB (RFC 3501, LIST-EXTENDED RFC 5258, LIST-STATUS RFC 5819, SPECIAL-USE RFC 6154).

The backend gives the user's mailboxes flat; matching ``*``/``%`` (in linear
time per name), implied parents (``\\Noselect``), ``\\HasChildren``/
``\\HasNoChildren``, subscription selection and ``RETURN (STATUS ...)`` are
done here, the same for every backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed

from . import _commands as c
from . import _serialize as s
from ._outcome import Done, status_items
from ._view import normalise_inbox, pattern_match
from .interfaces import MailboxListing, MailboxStatus

if TYPE_CHECKING:
    from ._session import CommandRunner

_SPECIAL_USE = frozenset(
    {"\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash", "\\Important"}
)


def answer_list(runner: CommandRunner, cmd: c.List, lsub: bool = False) -> Deferred[Done]:
    """Send the LIST/LSUB data of ``cmd``."""
    session = runner.authed
    delim: str = session.delimiter
    conn = runner.conn
    if not lsub and cmd.patterns == ("",) and not cmd.selection:
        # LIST "" "": the hierarchy delimiter and root (RFC 3501 6.3.8).
        conn.send(s.list_item(("\\Noselect",), delim, ""))
        return succeed(Done())

    def got(listings: list[MailboxListing]) -> Any:
        boxes: dict[str, MailboxListing] = {}
        for m in listings:
            name = normalise_inbox(m.name, delim)
            boxes[name] = MailboxListing(name, m.attributes, m.subscribed)
        parents: set[str] = set()
        for name in boxes:
            parts = name.split(delim)
            for i in range(1, len(parts)):
                parents.add(delim.join(parts[:i]))
        subscribed_only = "SUBSCRIBED" in cmd.selection
        special_only = "SPECIAL-USE" in cmd.selection
        recursive = "RECURSIVEMATCH" in cmd.selection
        show_subscribed = subscribed_only or "SUBSCRIBED" in cmd.returns
        subscribed = [n for n, b in boxes.items() if b.subscribed]
        candidates = set(boxes) | parents
        patterns = [normalise_inbox(cmd.reference + p, delim) for p in cmd.patterns]

        def matches(name: str) -> bool:
            return any(pattern_match(p, name, delim) for p in patterns)

        out: list[tuple[str, tuple[str, ...], tuple[tuple[str, Any], ...]]] = []
        for name in sorted(candidates, key=lambda n: (n != "INBOX", n)):
            if not matches(name):
                continue
            box = boxes.get(name)
            extended: tuple[tuple[str, Any], ...] = ()
            attrs: list[str] = []
            if (subscribed_only or lsub) and (box is None or not box.subscribed):
                # A parent of a subscribed mailbox the pattern does not reach: LSUB
                # shows it \Noselect (RFC 3501 6.3.9), LIST (SUBSCRIBED
                # RECURSIVEMATCH) with CHILDINFO (RFC 5258 3.5).
                prefix = name + delim
                if not any(d.startswith(prefix) and not matches(d) for d in subscribed):
                    continue
                if lsub:
                    attrs.append("\\Noselect")
                elif recursive:
                    extended = (("CHILDINFO", (b"SUBSCRIBED",)),)
                else:
                    continue
            if not lsub:
                if box is None:
                    attrs.append("\\NonExistent" if cmd.selection else "\\Noselect")
                else:
                    attrs += [a for a in box.attributes if a]
                if special_only and not any(a in _SPECIAL_USE for a in attrs):
                    continue
                attrs.append("\\HasChildren" if name in parents else "\\HasNoChildren")
                if show_subscribed and box is not None and box.subscribed:
                    attrs.append("\\Subscribed")
            out.append((name, tuple(dict.fromkeys(attrs)), extended))
        for name, attrs_, ext in out:
            conn.send(s.list_item(attrs_, delim, runner.shown(name), lsub=lsub, extended=ext))
        if "STATUS" not in cmd.returns:
            return Done()
        selectable = [n for n, a, _ in out if "\\Noselect" not in a and "\\NonExistent" not in a]
        return _statuses(runner, selectable, cmd.status)

    return maybeDeferred(session.list_mailboxes).addCallback(got)


def _statuses(runner: CommandRunner, names: list[str], items: tuple[str, ...]) -> Any:
    d: Deferred[Any] = succeed(None)
    for name in names:

        def one(_: object, name: str = name) -> Any:
            def got(st: MailboxStatus) -> None:
                runner.conn.send(s.status(runner.shown(name), status_items(st, items)))

            # A mailbox that vanished meanwhile just gets no STATUS line (RFC 5819).
            return maybeDeferred(runner.authed.status, name).addCallbacks(got, lambda f: None)

        d.addCallback(one)
    return d.addCallback(lambda _: Done())
