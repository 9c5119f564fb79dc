"""The copy policies (:class:`~.interfaces.ICopyPolicy`): one copy of each message,
or replicas (issue 8) read from the least-loaded holder and changed on one holder,
whose logged update reaches the others."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList, gatherResults
from zope.interface import implementer

from ..values import Digest, MailboxInfo, Profile
from ._merge import log_failures
from .interfaces import ICopyPolicy

if TYPE_CHECKING:
    from ._usermail import UserMail

__all__ = ["ReplicatedCopies", "SingleCopies"]


@implementer(ICopyPolicy)
class SingleCopies:
    """One copy of each message: a change goes to every node listing the message."""

    def profile_seen(self, mail: UserMail, profile: Profile | None) -> None:
        """See :class:`ICopyPolicy`: nothing to note."""

    def read_order(self, mail: UserMail, nodes: list[str]) -> list[str]:
        """See :class:`ICopyPolicy`: as listed."""
        return nodes

    def set_flags(
        self,
        mail: UserMail,
        mailbox: str,
        digests: Sequence[Digest],
        flags: Sequence[str],
        mode: int,
        extra: dict[str, Any],
    ) -> Deferred[list[dict[int, tuple[str, ...]]]]:
        """See :class:`ICopyPolicy`: on each node, its messages."""
        ds = [
            mail.managers(node).set_flags(mail.address, mailbox, uids, flags, mode, **extra)
            for node, uids in mail.by_node(digests, mailbox).items()
        ]
        return gatherResults(ds, consumeErrors=True)

    def delete(
        self, mail: UserMail, mailbox: str, digests: Sequence[Digest]
    ) -> Deferred[list[int]]:
        """See :class:`ICopyPolicy`: on each node; a node other than the home left with
        nothing of the user leaves the fragment list."""
        by_node = mail.by_node(digests, mailbox)
        ds = [
            mail.managers(node).delete(mail.address, mailbox, uids)
            for node, uids in by_node.items()
        ]

        def done(parts: list[list[int]]) -> Deferred[list[int]]:
            mail.forget_nodes()
            checks = [_maybe_leave(mail, node) for node in by_node if node != mail.home]
            removed = sorted({u for p in parts for u in p})
            return DeferredList(checks, consumeErrors=True).addCallback(log_failures, removed)

        return gatherResults(ds, consumeErrors=True).addCallback(done)


def _maybe_leave(mail: UserMail, node: str) -> Deferred[None]:
    def check(mboxes: list[MailboxInfo]) -> Deferred[None] | None:
        if sum(m.messages for m in mboxes) == 0:
            return mail.users.remove_fragment(mail.address, node)
        return None

    return mail.managers(node).mailboxes(mail.address).addCallback(check)


@implementer(ICopyPolicy)
class ReplicatedCopies:
    """Replicas (issue 8): each message is read from its least-loaded holder
    (``load_of``; another holder if that read fails), and a flag change or deletion
    goes to one holder, whose logged update reaches the others."""

    def __init__(self, load_of: Callable[[str], float] | None = None) -> None:
        #: A node's current load (None: holders are read in the listed order).
        self.load_of = load_of

    def profile_seen(self, mail: UserMail, profile: Profile | None) -> None:
        """See :class:`ICopyPolicy`: the user's R, for :meth:`UserMail.incomplete`."""
        if profile is not None:
            mail.replicas = max(1, profile.replicas)

    def read_order(self, mail: UserMail, nodes: list[str]) -> list[str]:
        """See :class:`ICopyPolicy`: the least loaded first."""
        load_of = self.load_of
        if load_of is None:
            return nodes
        return sorted(nodes, key=lambda n: load_of(n))  # stable: the listed node wins ties

    def set_flags(
        self,
        mail: UserMail,
        mailbox: str,
        digests: Sequence[Digest],
        flags: Sequence[str],
        mode: int,
        extra: dict[str, Any],
    ) -> Deferred[list[dict[int, tuple[str, ...]]]]:
        """See :class:`ICopyPolicy`: on one holder per message."""
        return mail.on_one_holder(
            mailbox,
            digests,
            lambda m, uids: m.set_flags(mail.address, mailbox, uids, flags, mode, **extra),
        )

    def delete(
        self, mail: UserMail, mailbox: str, digests: Sequence[Digest]
    ) -> Deferred[list[int]]:
        """See :class:`ICopyPolicy`: one holder per message makes the deletion a logged
        update (tombstone)."""
        d = mail.on_one_holder(
            mailbox, digests, lambda m, uids: m.delete(mail.address, mailbox, uids)
        )

        def done(parts: list[list[int]]) -> list[int]:
            mail.forget_nodes()
            for dig in digests:
                mail.twins.pop((mailbox, dig.uid), None)
            return sorted({u for p in parts for u in p})

        return d.addCallback(done)
