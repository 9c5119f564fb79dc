"""A node alone: the :class:`~.interfaces.IMailTopology` of a cluster of one.

Every user's manager is this node's :class:`~.users.UserManager`, every mailbox is
on this node's disk, and profile writes stay local.  In a cluster the composition
root passes :class:`~.cluster.MailCluster` instead.
"""

from __future__ import annotations

from zope.interface import implementer

from ._cluster_profiles import ProfileReplicator
from .interfaces import ILoadBalancer, ILocalMailboxes, IMailTopology
from .profiledb import ProfileDB
from .users import UserManager

__all__ = ["LocalTopology"]


@implementer(IMailTopology)
class LocalTopology:
    """One node: its own user manager and mailbox manager for everything."""

    #: No load balancing: deliveries keep affinity, then this node.
    balancer: ILoadBalancer | None = None

    def __init__(self, node_id: str, profiles: ProfileDB, mailboxes: ILocalMailboxes) -> None:
        self.me = node_id
        self.user_manager = UserManager(node_id, profiles)
        self.local = mailboxes
        #: The one profile write path (local only).
        self.replicator = ProfileReplicator(profiles, self.forget)

    def users_for(self, address: str) -> UserManager:
        """See :class:`IMailTopology`: always this node's."""
        return self.user_manager

    def mailboxes_for(self, node_id: str) -> ILocalMailboxes:
        """See :class:`IMailTopology`: this node's; ``KeyError`` for any other."""
        if node_id != self.me:
            raise KeyError(f"no mailbox manager for node {node_id} in a cluster of one")
        return self.local

    def live(self) -> list[str]:
        """See :class:`IMailTopology`."""
        return [self.me]

    def home_of(self, address: str) -> str:
        """See :class:`IMailTopology`: this node."""
        return self.me

    def holders_of(self, address: str) -> set[str]:
        """The fragment list (and this node)."""
        return set(self.user_manager.state.fragment_list(address.lower())) | {self.me}

    def forget(self, address: str) -> None:
        """See :class:`IMailTopology`."""
        self.user_manager.forget(address)

    def known_nodes(self) -> set[str]:
        """Only this node."""
        return {self.me}
