"""A shipped fake cluster node: members in one process, RPC by direct call.

:class:`MemoryClusterNode` provides :class:`~yimaporc.cluster.interfaces.IClusterNode`
for unit tests of services.  Nodes joined to the same :class:`MemoryNetwork` reach
each other's :class:`~yimaporc.cluster.rpc.RpcRegistry` through ``node.rpc.call``
(arguments go through the command's AMP encoding and back, so a handler sees what it
would over the wire); :meth:`MemoryNetwork.set_members` commits a view on every
node and tells their listeners.  It passes the same contract tests as the real
:class:`~yimaporc.cluster.node.ClusterNode` (``tests/cluster/test_node_contract.py``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.protocols import amp
from zope.interface import implementer

from ..cluster.histogram import Histograms
from ..cluster.interfaces import IClusterNode, IRpcCaller
from ..cluster.membership import IMembershipListener, View
from ..cluster.node import NodeConfig
from ..cluster.routes import Route
from ..cluster.rpc import PeerUnavailable, RpcRegistry
from ..cluster.wire import Member

__all__ = ["MemoryClusterNode", "MemoryNetwork"]


def _through_amp(arguments: list[tuple[bytes, Any]], values: dict[str, Any]) -> dict[str, Any]:
    """``values`` encoded and decoded with ``arguments`` (AMP's own checks apply)."""
    box = amp._objectsToStrings(values, arguments, amp.AmpBox(), None)  # type: ignore[attr-defined]
    return amp._stringsToObjects(box, arguments, None)  # type: ignore[attr-defined, no-any-return]


class MemoryNetwork:
    """The members of one in-process cluster, by address."""

    def __init__(self) -> None:
        self.nodes: dict[str, MemoryClusterNode] = {}
        #: Addresses that do not answer (a node down, a partition).
        self.down: set[str] = set()
        self.epoch = 0

    def set_members(self, node_ids: Sequence[str]) -> View:
        """Commit a view of ``node_ids`` (in that order) on every member and tell listeners."""
        by_id = {n.node_id: n for n in self.nodes.values()}
        self.epoch += 1
        members = tuple(
            Member(i, by_id[i].config.cluster_address, by_id[i].incarnation) for i in node_ids
        )
        view = View(self.epoch, members, members[0].node_id if members else "")
        for node_id in node_ids:
            by_id[node_id].commit(view)
        return view


@implementer(IRpcCaller)
class MemoryRpc:
    """``call`` straight into the registry of the member at ``address``."""

    def __init__(self, network: MemoryNetwork) -> None:
        self.network = network
        self.calls: list[tuple[str, bytes]] = []

    def call(self, address: str, command: Any, **kwargs: Any) -> Deferred[Any]:
        """Run ``command`` at ``address`` (PeerUnavailable if unknown or down)."""
        self.calls.append((address, command.commandName))
        node = self.network.nodes.get(address)
        if node is None or address in self.network.down:
            return fail(PeerUnavailable(f"{address} is unreachable"))
        found = node.registry.lookup(command.commandName)
        if found is None:
            return fail(PeerUnavailable(f"{address} does not answer {command.commandName!r}"))
        _, handler = found
        d = maybeDeferred(_through_amp, command.arguments, kwargs)
        d.addCallback(lambda args: handler(**args))
        return d.addCallback(lambda answer: _through_amp(command.response, answer))


@implementer(IClusterNode)
class MemoryClusterNode:
    """A node of a :class:`MemoryNetwork`: identity, view, registry, RPC, routes, status."""

    def __init__(
        self,
        node_id: str,
        clock: IReactorTime,
        *,
        data_dir: Path,
        network: MemoryNetwork | None = None,
        kind: str = "yima",
        host: str = "127.0.139.1",
        port: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.network = network or MemoryNetwork()
        port = port if port is not None else 7000 + len(self.network.nodes)
        self.config = NodeConfig(node_id, kind, data_dir, host, port)
        self.reactor = clock
        self.rng = rng or random.Random(node_id)
        self.incarnation = 1
        self.registry = RpcRegistry()
        self.rpc = MemoryRpc(self.network)
        self.histograms = Histograms()
        self.routes: list[Route] = []
        self.status_providers: list[Callable[[], dict[str, Any]]] = []
        self.listeners: list[IMembershipListener] = []
        self.view = View(0, (), "")
        #: Is this node synced to the cluster's time reference (set it to play one
        #: that is, or one that lost it)?
        self.synced = False
        self.network.nodes[self.config.cluster_address] = self

    @property
    def node_id(self) -> str:
        """This node's id."""
        return self.config.node_id

    def commit(self, view: View) -> None:
        """Install ``view`` and tell every listener (as the real node does on a TRM commit)."""
        old, self.view = self.view, view
        for listener in list(self.listeners):
            listener.membership_changed(old, view)

    def cluster_time(self) -> float:
        """The clock's seconds (one clock: no offset to estimate)."""
        return float(self.reactor.seconds())

    def synced_cluster_time(self) -> float | None:
        """:meth:`cluster_time` while :attr:`synced`, else None."""
        return self.cluster_time() if self.synced else None

    def subscribe(self, listener: IMembershipListener) -> None:
        """Call ``listener.membership_changed`` on every new view."""
        self.listeners.append(listener)

    def add_route(self, route: Route) -> None:
        """Mount an admin route (kept in :attr:`routes`)."""
        self.routes.append(route)

    def add_status(self, provider: Callable[[], dict[str, Any]]) -> None:
        """Merge ``provider()`` into :meth:`status`."""
        self.status_providers.append(provider)

    def status(self) -> dict[str, Any]:
        """The status document's common part plus the providers'."""
        doc: dict[str, Any] = {
            "node_id": self.node_id,
            "kind": self.config.kind,
            "epoch": self.view.epoch,
            "members": [{"node_id": m.node_id, "address": m.address} for m in self.view.members],
        }
        for provider in self.status_providers:
            doc.update(provider())
        return doc

    def when_ready(self) -> Deferred[None]:
        """Always ready (a fake binds nothing)."""
        return succeed(None)
