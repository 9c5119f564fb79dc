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
    session = runner.session
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
        show_subscribed = subscribed_only or "SUBSCRIBED" in cmd.returns
        candidates = set(boxes) | parents
        patterns = [normalise_inbox(cmd.reference + p, delim) for p in cmd.patterns]
        out: list[tuple[str, tuple[str, ...]]] = []
        for name in sorted(candidates, key=lambda n: (n != "INBOX", n)):
            if not any(pattern_match(p, name, delim) for p in patterns):
                continue
            box = boxes.get(name)
            if subscribed_only and (box is None or not box.subscribed):
                continue
            attrs: list[str] = []
            if box is None:
                attrs.append("\\Noselect" if lsub or not cmd.selection else "\\NonExistent")
            else:
                attrs += [a for a in box.attributes if a]
            if special_only and not any(a in _SPECIAL_USE for a in attrs):
                continue
            if not lsub:
                attrs.append("\\HasChildren" if name in parents else "\\HasNoChildren")
                if show_subscribed and box is not None and box.subscribed:
                    attrs.append("\\Subscribed")
            out.append((name, tuple(dict.fromkeys(attrs))))
        for name, attrs_ in out:
            conn.send(s.list_item(attrs_, delim, name, lsub=lsub))
        if "STATUS" not in cmd.returns:
            return Done()
        return _statuses(runner, [n for n, a in out if "\\Noselect" not in a and "\\NonExistent" not in a],
                         cmd.status, status_items)  # fmt: skip

    return maybeDeferred(session.list_mailboxes).addCallback(got)


def _statuses(
    runner: CommandRunner, names: list[str], items: tuple[str, ...], status_items: Any
) -> Any:
    d: Deferred[Any] = succeed(None)
    for name in names:

        def one(_: object, name: str = name) -> Any:
            def got(st: MailboxStatus) -> None:
                runner.conn.send(s.status(name, status_items(st, items)))

            # A mailbox that vanished meanwhile just gets no STATUS line (RFC 5819).
            return maybeDeferred(runner.session.status, name).addCallbacks(got, lambda f: None)

        d.addCallback(one)
    return d.addCallback(lambda _: Done())
