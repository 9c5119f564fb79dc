"""The retrieval proxy (seed §2.3.2): one user's mail, over all their fragments.

:class:`RetrievalProxy` authenticates through the user's manager, learns the
fragment list, and hands out a :class:`UserMail`, which asks the mailbox
manager of each fragment node for digests, merges them, and routes fetches,
flag changes and deletions to the node holding each message.  When a node's
last message of the user goes, the node leaves the fragment list.

The IMAP mailbox tree (names, UIDVALIDITY, UID counters) lives on the user's
*home* fragment, this node in a cluster of one; see docs/mail.md for how the
cluster issue keeps UIDs ascending across fragments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, gatherResults

from .interfaces import IMailboxManager, IUserManager
from .values import Digest, MailboxInfo, NewMessage, Profile


class UserMail:
    """One authenticated user's view of their mail across fragments."""

    def __init__(
        self,
        address: str,
        home: str,
        users: IUserManager,
        mailboxes: Callable[[str], IMailboxManager],
    ) -> None:
        self.address = address
        self.home = home
        self.users = users
        self.managers = mailboxes

    def _home(self) -> IMailboxManager:
        return self.managers(self.home)

    def _nodes(self) -> Deferred[list[str]]:
        def merge(frags: tuple[str, ...]) -> list[str]:
            return [self.home, *(n for n in frags if n != self.home)]

        return self.users.fragments(self.address).addCallback(merge)

    # --- the mailbox tree (home fragment) -----------------------------------

    def mailboxes(self) -> Deferred[list[MailboxInfo]]:
        """Every mailbox with its counters."""
        return self._home().mailboxes(self.address)

    def create(self, name: str) -> Deferred[MailboxInfo]:
        """CREATE."""
        return self._home().create_mailbox(self.address, name)

    def delete_mailbox(self, name: str) -> Deferred[None]:
        """DELETE."""
        return self._home().delete_mailbox(self.address, name)

    def rename(self, old: str, new: str) -> Deferred[None]:
        """RENAME."""
        return self._home().rename_mailbox(self.address, old, new)

    def subscribe(self, name: str, on: bool) -> Deferred[None]:
        """SUBSCRIBE / UNSUBSCRIBE."""
        return self._home().subscribe(self.address, name, on)

    # --- messages (every fragment) ------------------------------------------

    def digests(self, mailbox: str) -> Deferred[list[Digest]]:
        """The mailbox's messages over all fragments, by UID."""

        def ask(nodes: list[str]) -> Deferred[list[Digest]]:
            ds = [self.managers(n).digests(self.address, mailbox) for n in nodes]
            return gatherResults(ds, consumeErrors=True).addCallback(
                lambda parts: sorted((d for part in parts for d in part), key=lambda d: d.uid)
            )

        return self._nodes().addCallback(ask)

    def _by_node(self, digests: Sequence[Digest]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for d in digests:
            out.setdefault(d.node, []).append(d.uid)
        return out

    def fetch(self, mailbox: str, digests: Sequence[Digest]) -> Deferred[dict[int, bytes]]:
        """Bodies by UID, each from the node that holds it."""
        ds = [
            self.managers(node).fetch(self.address, mailbox, uids)
            for node, uids in self._by_node(digests).items()
        ]

        def merge(parts: list[dict[int, bytes]]) -> dict[int, bytes]:
            out: dict[int, bytes] = {}
            for p in parts:
                out.update(p)
            return out

        return gatherResults(ds, consumeErrors=True).addCallback(merge)

    def set_flags(
        self, mailbox: str, digests: Sequence[Digest], flags: Sequence[str], mode: int
    ) -> Deferred[dict[int, tuple[str, ...]]]:
        """STORE on each node; the new flags by UID."""
        ds = [
            self.managers(node).set_flags(self.address, mailbox, uids, flags, mode)
            for node, uids in self._by_node(digests).items()
        ]

        def merge(parts: list[dict[int, tuple[str, ...]]]) -> dict[int, tuple[str, ...]]:
            out: dict[int, tuple[str, ...]] = {}
            for p in parts:
                out.update(p)
            return out

        return gatherResults(ds, consumeErrors=True).addCallback(merge)

    def delete(self, mailbox: str, digests: Sequence[Digest]) -> Deferred[list[int]]:
        """Remove messages; nodes left with nothing of the user leave the fragment list."""
        by_node = self._by_node(digests)
        ds = [
            self.managers(node).delete(self.address, mailbox, uids)
            for node, uids in by_node.items()
        ]

        def done(parts: list[list[int]]) -> Deferred[list[int]]:
            checks = [self._maybe_leave(node) for node in by_node if node != self.home]
            removed = sorted(u for p in parts for u in p)
            return DeferredList(checks).addCallback(lambda _: removed)

        return gatherResults(ds, consumeErrors=True).addCallback(done)

    def _maybe_leave(self, node: str) -> Deferred[None]:
        def check(mboxes: list[MailboxInfo]) -> Deferred[None] | None:
            if sum(m.messages for m in mboxes) == 0:
                return self.users.remove_fragment(self.address, node)
            return None

        return self.managers(node).mailboxes(self.address).addCallback(check)

    def copy(self, mailbox: str, digests: Sequence[Digest], dest: str) -> Deferred[list[Digest]]:
        """COPY within each node's fragment."""
        ds = [
            self.managers(node).copy(self.address, mailbox, uids, dest)
            for node, uids in self._by_node(digests).items()
        ]
        return gatherResults(ds, consumeErrors=True).addCallback(
            lambda parts: [d for p in parts for d in p]
        )

    def append(
        self, mailbox: str, body: bytes, flags: Sequence[str], date: float
    ) -> Deferred[Digest]:
        """APPEND: stored on the home fragment."""
        msg = NewMessage(self.address, mailbox, body, tuple(flags), date)

        def stored(digests: list[Digest]) -> Deferred[Digest]:
            d: Deferred[Any] = self.users.add_fragment(self.address, self.home)
            return d.addCallback(lambda _: digests[0])

        return self._home().store([msg]).addCallback(stored)


class RetrievalProxy:
    """Authenticates a POP3/IMAP login and opens that user's :class:`UserMail`."""

    def __init__(
        self,
        node_id: str,
        users: Callable[[str], IUserManager],
        mailboxes: Callable[[str], IMailboxManager],
    ) -> None:
        self.node_id = node_id
        self.users = users
        self.mailboxes = mailboxes

    def authenticate(self, address: str, password: str) -> Deferred[Profile]:
        """The profile, or ``BadCredentials``."""
        return self.users(address).authenticate(address, password)

    def open(self, address: str) -> UserMail:
        """The mail of an (already authenticated) user."""
        return UserMail(address, self.node_id, self.users(address), self.mailboxes)
