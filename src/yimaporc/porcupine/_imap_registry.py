"""The mailboxes selected on a Porcupine node, and its special-use memory.

One :class:`MailboxRegistry` per node (built by :class:`~.storage.MailStorage`):
the IMAP sessions (:mod:`.imap_backend`) register the mailboxes they select, and
:meth:`MailboxRegistry.changed` wakes those watching (IDLE) when mail arrives or
flags change here or on another node.  It also remembers, for
:data:`SPECIAL_USE_TTL` seconds, which users a login found with every special-use
mailbox, so their next logins on this node skip the check.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred

if TYPE_CHECKING:
    from .imap_backend import PorcupineMailbox

__all__ = ["SPECIAL_USE_MAX", "SPECIAL_USE_TTL", "MailboxRegistry"]

#: Seconds a login's finding that a user has every special-use mailbox spares the
#: next logins on this node the check (:meth:`MailboxRegistry.special_use_known`).
SPECIAL_USE_TTL = 60.0
#: Users remembered so at most (least recently marked dropped first).
SPECIAL_USE_MAX = 100_000


class MailboxRegistry:
    """The mailboxes selected on this node, per (user, name): :meth:`changed` wakes
    those watching (IDLE).  The mailbox manager calls it when mail arrives here,
    sessions when they change flags or expunge, the cluster on its poll."""

    def __init__(self) -> None:
        self.boxes: dict[tuple[str, str], set[PorcupineMailbox]] = {}
        #: Users whose special-use mailboxes a login is checking or creating now: the
        #: logins waiting for it (concurrent first logins create each mailbox once).
        self.autocreating: dict[str, list[Deferred[None]]] = {}
        #: Users whose special-use mailboxes a login here found or made, until when
        #: (seconds on the clock): their next logins do not read the tree for them.
        #: A DELETE or RENAME through this node drops the user at once; one through
        #: another node is noticed at the first login after the mark runs out.
        self.special_use_seen: OrderedDict[str, float] = OrderedDict()

    def special_use_known(self, user: str, now: float) -> bool:
        """Whether ``user``'s special-use mailboxes were seen here less than
        :data:`SPECIAL_USE_TTL` ago."""
        until = self.special_use_seen.get(user)
        if until is None:
            return False
        if until <= now:
            del self.special_use_seen[user]
            return False
        return True

    def special_use_found(self, user: str, now: float) -> None:
        """``user`` has every special-use mailbox (a login just found or made them)."""
        self.special_use_seen.pop(user, None)
        self.special_use_seen[user] = now + SPECIAL_USE_TTL
        while len(self.special_use_seen) > SPECIAL_USE_MAX:
            self.special_use_seen.popitem(last=False)

    def special_use_changed(self, user: str) -> None:
        """A mailbox of ``user`` was deleted or renamed through this node."""
        self.special_use_seen.pop(user, None)

    def open(self, box: PorcupineMailbox) -> None:
        self.boxes.setdefault((box.mail.address, box.name), set()).add(box)

    def close(self, box: PorcupineMailbox) -> None:
        key = (box.mail.address, box.name)
        self.boxes.get(key, set()).discard(box)
        if not self.boxes.get(key):
            self.boxes.pop(key, None)

    def changed(self, user: str, mailbox: str) -> None:
        for box in list(self.boxes.get((user, mailbox), ())):
            box.changed()

    def count(self) -> int:
        """Mailboxes selected now (``imap_open_mailboxes``)."""
        return sum(len(b) for b in self.boxes.values())
