"""The two strategies a :class:`~.UserMail` is built with, chosen once by the
composition root (:meth:`~yimaporc.porcupine.node.PorcupineNode.from_config`, or
:class:`~yimaporc.porcupine.service.MailService` for a node alone); nothing
switches them later.

- :class:`IMailLayout`: where the user's mailbox tree and messages are: all on
  this node (:class:`~.HomeOnly`), or fragments over the cluster with the tree on
  a home node chosen by the cluster (:class:`~.Fragmented`).
- :class:`ICopyPolicy`: how many copies a message has and how a change reaches
  them: one copy, changed where it is (:class:`~.SingleCopies`), or replicas
  read from the least-loaded holder and changed on one holder, whose logged
  update reaches the others (:class:`~.ReplicatedCopies`).

A strategy is shared by every user's ``UserMail`` of a node: it keeps no state of
its own; each method takes the ``UserMail`` it works for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from zope.interface import Interface

from ..values import Digest, MailboxInfo, NewMessage, Profile

if TYPE_CHECKING:
    from ..interfaces import ILocalMailboxes
    from ._usermail import UserMail

__all__ = ["ICopyPolicy", "IMailLayout"]


class IMailLayout(Interface):
    """Where one user's mail is: the mailbox tree, listings, mailbox changes, stores."""

    def home_of(address: str) -> str:
        """The node holding ``address``'s mailbox tree."""

    def opened(mail: UserMail, node_id: str, local: ILocalMailboxes | None) -> None:
        """``mail`` was just opened on ``node_id`` (whose own mailboxes are ``local``):
        set what this layout needs of it (clock, the UIDNEXT record)."""

    def mailboxes(mail: UserMail) -> Deferred[list[MailboxInfo]]:
        """Every mailbox with its counters."""

    def open_mailbox(
        mail: UserMail, mailbox: str, complete: bool
    ) -> Deferred[tuple[list[MailboxInfo], list[Digest]]]:
        """The tree and ``mailbox``'s messages together (SELECT, STATUS, a POP3 login)."""

    def digests(mail: UserMail, mailbox: str, complete: bool) -> Deferred[list[Digest]]:
        """The mailbox's messages by UID (``complete``: ``MailUnavailable`` rather than
        a listing that lacks mail out of reach)."""

    def create(mail: UserMail, name: str, absent: bool) -> Deferred[MailboxInfo]:
        """CREATE (``absent``: the caller has just seen the tree without ``name``)."""

    def delete_mailbox(mail: UserMail, name: str) -> Deferred[None]:
        """DELETE."""

    def rename(mail: UserMail, old: str, new: str) -> Deferred[None]:
        """RENAME."""

    def subscribe(mail: UserMail, name: str, on: bool) -> Deferred[None]:
        """SUBSCRIBE / UNSUBSCRIBE."""

    def copy(
        mail: UserMail,
        mailbox: str,
        digests: Sequence[Digest],
        dest: str,
        deadline: float | None = None,
    ) -> Deferred[list[Digest]]:
        """COPY ``digests`` of ``mailbox`` into ``dest`` (a UID reservation waits for
        its manager at most until ``deadline``)."""

    def store(
        mail: UserMail, mailbox: str, msgs: list[NewMessage], first: int
    ) -> Deferred[list[Digest]]:
        """APPEND/COPY's store of ``msgs`` (under the reservation starting at ``first``)."""


class ICopyPolicy(Interface):
    """How many copies of a message there are, where it is read, how a change reaches it."""

    def profile_seen(mail: UserMail, profile: Profile | None) -> None:
        """The user's profile was read: note what it says of copies."""

    def read_order(mail: UserMail, nodes: list[str]) -> list[str]:
        """``nodes`` holding one message, in the order to read it from."""

    def set_flags(
        mail: UserMail,
        mailbox: str,
        digests: Sequence[Digest],
        flags: Sequence[str],
        mode: int,
        extra: dict[str, Any],
    ) -> Deferred[list[dict[int, tuple[str, ...]]]]:
        """STORE: each node's answer (``extra``: CONDSTORE's ``unchanged_since``)."""

    def delete(mail: UserMail, mailbox: str, digests: Sequence[Digest]) -> Deferred[list[int]]:
        """EXPUNGE: the UIDs removed."""
