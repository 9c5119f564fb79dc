"""A node alone (:class:`HomeOnly`): every mailbox and message of a user is on this
node, the home; UIDs are the node's own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, gatherResults
from zope.interface import implementer

from ..values import Digest, MailboxInfo, NewMessage
from .interfaces import IMailLayout

if TYPE_CHECKING:
    from ..interfaces import ILocalMailboxes
    from ._usermail import UserMail

__all__ = ["HomeOnly"]


@implementer(IMailLayout)
class HomeOnly:
    """The :class:`IMailLayout` of a node alone: the home node (``node_id``) has it all."""

    def __init__(self, node_id: str = "") -> None:
        self.node_id = node_id

    def home_of(self, address: str) -> str:
        """See :class:`IMailLayout`: this node."""
        return self.node_id

    def opened(self, mail: UserMail, node_id: str, local: ILocalMailboxes | None) -> None:
        """See :class:`IMailLayout`: nothing to set (no fragments, no UIDNEXT record)."""

    def mailboxes(self, mail: UserMail) -> Deferred[list[MailboxInfo]]:
        """See :class:`IMailLayout`: the home's tree."""
        return mail.home_manager().mailboxes(mail.address)

    def open_mailbox(
        self, mail: UserMail, mailbox: str, complete: bool
    ) -> Deferred[tuple[list[MailboxInfo], list[Digest]]]:
        """See :class:`IMailLayout`: the tree, then the listing."""
        return mail.mailboxes().addCallback(
            lambda infos: mail.digests(mailbox, complete).addCallback(lambda ds: (infos, ds))
        )

    def digests(self, mail: UserMail, mailbox: str, complete: bool) -> Deferred[list[Digest]]:
        """See :class:`IMailLayout`: every fragment node's digests, by UID."""

        def ask(nodes: list[str]) -> Deferred[list[Digest]]:
            ds = [mail.managers(n).digests(mail.address, mailbox) for n in nodes]
            return gatherResults(ds, consumeErrors=True).addCallback(
                lambda parts: sorted((d for part in parts for d in part), key=lambda d: d.uid)
            )

        return mail.nodes().addCallback(ask)

    def create(self, mail: UserMail, name: str, absent: bool) -> Deferred[MailboxInfo]:
        """See :class:`IMailLayout`: at home."""
        return mail.home_manager().create_mailbox(mail.address, name)

    def delete_mailbox(self, mail: UserMail, name: str) -> Deferred[None]:
        """See :class:`IMailLayout`: at home."""
        return mail.home_manager().delete_mailbox(mail.address, name)

    def rename(self, mail: UserMail, old: str, new: str) -> Deferred[None]:
        """See :class:`IMailLayout`: at home."""
        return mail.home_manager().rename_mailbox(mail.address, old, new)

    def subscribe(self, mail: UserMail, name: str, on: bool) -> Deferred[None]:
        """See :class:`IMailLayout`: at home."""
        return mail.home_manager().subscribe(mail.address, name, on)

    def copy(
        self,
        mail: UserMail,
        mailbox: str,
        digests: Sequence[Digest],
        dest: str,
        deadline: float | None = None,
    ) -> Deferred[list[Digest]]:
        """See :class:`IMailLayout`: within each node's fragment (no reservation)."""
        ds = [
            mail.managers(node).copy(mail.address, mailbox, uids, dest)
            for node, uids in mail.by_node(digests).items()
        ]
        return gatherResults(ds, consumeErrors=True).addCallback(
            lambda parts: [d for p in parts for d in p]
        )

    def store(
        self, mail: UserMail, mailbox: str, msgs: list[NewMessage], first: int
    ) -> Deferred[list[Digest]]:
        """See :class:`IMailLayout`: a plain store at home."""
        return mail.stored_at_home(mail.home_manager().store(msgs), first)
