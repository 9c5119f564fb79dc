"""The retrieval proxy's front door: :class:`RetrievalProxy` authenticates a
POP3/IMAP login and opens that user's :class:`~.UserMail` with the node's two
strategies."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from twisted.internet.defer import Deferred

from ..interfaces import ILocalMailboxes, IMailboxManager, IUserManager
from ..values import Profile
from ._copies import SingleCopies
from ._home import HomeOnly
from ._usermail import UserMail
from .interfaces import ICopyPolicy, IMailLayout

__all__ = ["RetrievalProxy"]


class RetrievalProxy:
    """Authenticates a POP3/IMAP login and opens that user's :class:`UserMail`."""

    def __init__(
        self,
        node_id: str,
        users: Callable[[str], IUserManager],
        mailboxes: Callable[[str], IMailboxManager],
        *,
        layout: IMailLayout | None = None,
        copy_policy: ICopyPolicy | None = None,
        local: ILocalMailboxes | None = None,
    ) -> None:
        self.node_id = node_id
        self.users = users
        self.mailboxes = mailboxes
        #: Where users' mail is (default :class:`~.HomeOnly`: this node alone;
        #: :class:`~.Fragmented` in a cluster).
        self.layout: IMailLayout = layout if layout is not None else HomeOnly(node_id)
        #: How many copies a message has (default :class:`~.SingleCopies`;
        #: :class:`~.ReplicatedCopies` with replication).
        self.copy_policy: ICopyPolicy = copy_policy if copy_policy is not None else SingleCopies()
        #: This node's own mailboxes (a cluster: they record the UIDNEXT shown).
        self.local = local
        #: What the node's sessions were refused, by reason (``UserMail.counts``).
        self.counts: Counter[str] = Counter()

    def authenticate(self, address: str, password: str) -> Deferred[Profile]:
        """The profile, or ``BadCredentials``."""
        return self.users(address).authenticate(address, password)

    def open(self, address: str) -> UserMail:
        """The mail of an (already authenticated) user; its manager is looked up on
        every use (the bucket may move to another node while the session lasts)."""
        mail = UserMail(
            address,
            self.layout.home_of(address),
            self.users(address),
            self.mailboxes,
            self.layout,
            self.copy_policy,
            users_for=self.users,
            counts=self.counts,
        )
        self.layout.opened(mail, self.node_id, self.local)
        return mail
