"""What a node kind's services may use of their node (:class:`IClusterNode`), and what a
fake node must provide.

Provided by :class:`~yimaporc.cluster.node.ClusterNode` and by the shipped fake
:class:`yimaporc.testing.cluster.MemoryClusterNode`; the same contract tests
(``tests/cluster/test_node_contract.py``) run against both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from .membership import IMembershipListener
from .routes import Route

if TYPE_CHECKING:
    from .buckets import BucketMap

__all__ = ["IBucketMap", "IClusterNode", "IRpcCaller"]


class IRpcCaller(Interface):
    """Calls an AMP command on another member."""

    def call(address: str, command: Any, **kwargs: Any) -> Deferred[Any]:
        """Run ``command`` at ``address`` (``host:port``); fails with
        :class:`~yimaporc.cluster.rpc.PeerUnavailable` when that node cannot be reached."""


class IClusterNode(Interface):
    """One member of a cluster, as its services see it."""

    node_id: str = Attribute("This node's id (unique in the cluster).")
    config = Attribute("The node's NodeConfig (data_dir, cluster_host, cluster_address...).")
    view = Attribute("The current committed View (members in address order).")
    registry = Attribute("The RpcRegistry answering other members' commands.")
    rpc = Attribute("An IRpcCaller to reach other members.")
    rng = Attribute("The node's random.Random (seeds, peer choice).")
    histograms = Attribute("Histograms exported on /metrics.")
    routes = Attribute("The admin Routes mounted with add_route, in order.")

    def cluster_time() -> float:
        """Seconds on the cluster's common clock."""

    def synced_cluster_time() -> float | None:
        """:meth:`cluster_time` while this node is synced to the cluster's time
        reference, else None (thread-safe: reads only)."""

    def subscribe(listener: IMembershipListener) -> None:
        """Call ``listener.membership_changed(old, new)`` on every new view."""

    def add_route(route: Route) -> None:
        """Mount an admin API route."""

    def add_status(provider: Callable[[], dict[str, Any]]) -> None:
        """Merge ``provider()`` into the status document."""

    def status() -> dict[str, Any]:
        """The status document: ``node_id``, ``kind``, ``epoch``, ``members`` and the
        providers' fields."""

    def when_ready() -> Deferred[None]:
        """Fires once every port listens; errbacks with ``CannotStart`` if one cannot."""


class IBucketMap(Interface):
    """The user-map buckets as this node knows them, as the services over it use them.

    Provided by :class:`~yimaporc.cluster.bucketservice.BucketMapService`.
    """

    def owner(bucket: int) -> str:
        """The node managing ``bucket`` ("" if none)."""

    def subscribe(listener: Callable[[BucketMap, BucketMap, set[int]], None]) -> None:
        """Call ``listener(old_map, new_map, fresh_buckets)`` after each change."""

    def was_away() -> bool:
        """Did the last installed view say this node was away (booted, or its previous
        view is not the one the coordinator committed from)?  Subscribers then resend
        and re-ask what they may have missed."""
