"""Mount the admin face on a node: what a composition root calls, once.

The node (:class:`~yimaporc.cluster.node.ClusterNode`) holds the routes and the
status document; this module serves them.  :func:`mount_admin` answers the
dashboard's :class:`~yimaporc.admin.dashboard.NodeSummary` RPC (every member does,
with or without an admin endpoint of its own, so any member's dashboard sees it)
and, given an endpoint, adds a :class:`~yimaporc.cluster.listening.ListeningService`
with the :class:`~yimaporc.admin.server.AdminSite` as a child of the node, so the
node's ``when_ready()`` fails when the admin port cannot be bound.
"""

from __future__ import annotations

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint

from ..cluster.listening import ListeningService
from ..cluster.node import ClusterNode, ConfigError
from .dashboard import NodeSummary, answer_summary
from .server import AdminSite

__all__ = ["admin_endpoint", "mount_admin"]


def admin_endpoint(reactor: object, description: str) -> IStreamServerEndpoint:
    """``--admin`` parsed now (a bad string is a :class:`ConfigError`, not a late crash)."""
    try:
        return serverFromString(reactor, description)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ConfigError(f"--admin {description!r}: {e}") from e


def mount_admin(
    node: ClusterNode,
    endpoint: IStreamServerEndpoint | None = None,
    *,
    label: str = "--admin",
) -> ListeningService | None:
    """Answer NodeSummary on ``node``; with ``endpoint``, serve its admin site there.

    Returns the listening child (None without an endpoint).  ``label`` names the
    endpoint in a :class:`~yimaporc.cluster.listening.CannotStart` message.
    """
    node.registry.register(NodeSummary, lambda: answer_summary(node.status()))
    if endpoint is None:
        return None
    listening = ListeningService(endpoint, AdminSite(node), label)
    listening.setServiceParent(node)
    return listening
