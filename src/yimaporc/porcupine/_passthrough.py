"""A node's mailboxes wrapped: :class:`PassThroughMailboxes` passes every
:class:`~.interfaces.ILocalMailboxes` call to the manager it wraps, so a wrapper
(the load meter's :class:`~._cluster_load.CountingMailboxes`, replication's
:class:`~.replication.objects.ReplicatedMailboxManager`) says only what it changes."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred
from zope.interface import implementer

from .interfaces import ILocalMailboxes
from .values import Digest, MailboxInfo, NewMessage

__all__ = ["PassThroughMailboxes"]


@implementer(ILocalMailboxes)
class PassThroughMailboxes:
    """Every call passed to ``inner`` unchanged; subclasses override what they change."""

    def __init__(self, inner: ILocalMailboxes) -> None:
        self.inner = inner
        self.node_id: str = inner.node_id

    def store(self, messages: Sequence[NewMessage]) -> Deferred[list[Digest]]:
        """See :class:`IMailboxManager`."""
        return self.inner.store(messages)

    def mailboxes(self, user: str) -> Deferred[list[MailboxInfo]]:
        """See :class:`IMailboxManager`."""
        return self.inner.mailboxes(user)

    def create_mailbox(self, user: str, name: str) -> Deferred[MailboxInfo]:
        """See :class:`IMailboxManager`."""
        return self.inner.create_mailbox(user, name)

    def delete_mailbox(self, user: str, name: str) -> Deferred[None]:
        """See :class:`IMailboxManager`."""
        return self.inner.delete_mailbox(user, name)

    def rename_mailbox(self, user: str, old: str, new: str) -> Deferred[None]:
        """See :class:`IMailboxManager`."""
        return self.inner.rename_mailbox(user, old, new)

    def subscribe(self, user: str, name: str, subscribed: bool) -> Deferred[None]:
        """See :class:`IMailboxManager`."""
        return self.inner.subscribe(user, name, subscribed)

    def digests(self, user: str, mailbox: str) -> Deferred[list[Digest]]:
        """See :class:`IMailboxManager`."""
        return self.inner.digests(user, mailbox)

    def view(
        self, user: str, mailbox: str
    ) -> Deferred[tuple[list[MailboxInfo], list[Digest] | None]]:
        """See :class:`IMailboxManager`."""
        return self.inner.view(user, mailbox)

    def fetch(self, user: str, mailbox: str, uids: Sequence[int]) -> Deferred[dict[int, bytes]]:
        """See :class:`IMailboxManager`."""
        return self.inner.fetch(user, mailbox, uids)

    def set_flags(
        self,
        user: str,
        mailbox: str,
        uids: Sequence[int],
        flags: Sequence[str],
        mode: int,
        unchanged_since: int | None = None,
    ) -> Deferred[dict[int, tuple[str, ...]]]:
        """See :class:`IMailboxManager`."""
        return self.inner.set_flags(user, mailbox, uids, flags, mode, unchanged_since)

    def tombstones(self, user: str, mailbox: str) -> Deferred[dict[int, int]]:
        """See :class:`IMailboxManager`."""
        return self.inner.tombstones(user, mailbox)

    def copy(
        self, user: str, mailbox: str, uids: Sequence[int], dest: str
    ) -> Deferred[list[Digest]]:
        """See :class:`IMailboxManager`."""
        return self.inner.copy(user, mailbox, uids, dest)

    def delete(self, user: str, mailbox: str, uids: Sequence[int]) -> Deferred[list[int]]:
        """See :class:`IMailboxManager`."""
        return self.inner.delete(user, mailbox, uids)

    def remove_user(self, user: str) -> Deferred[None]:
        """See :class:`IMailboxManager`."""
        return self.inner.remove_user(user)

    def users_in_bucket(self, bucket: int) -> Deferred[list[str]]:
        """See :class:`IMailboxManager`."""
        return self.inner.users_in_bucket(bucket)

    def number_pending(
        self, user: str, fence: str, first: int, count: int
    ) -> Deferred[tuple[int, int, int]]:
        """See :class:`IMailboxManager`."""
        return self.inner.number_pending(user, fence, first, count)

    def demote(self, user: str, mailbox: str, uid: int, key: str) -> Deferred[bool]:
        """See :class:`IMailboxManager`."""
        return self.inner.demote(user, mailbox, uid, key)

    def shown(self, user: str, marks: dict[str, tuple[int, int]]) -> Deferred[dict[str, int]]:
        """See :class:`ILocalMailboxes`."""
        return self.inner.shown(user, marks)
