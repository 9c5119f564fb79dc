"""Membership scenario: real :class:`~yimaporc.cluster.node.ClusterNode` s on the kernel.

Each simulated node is the shipped node shell, unmodified: ``ClusterNode`` with its
``MembershipProtocol`` on a (simulated) UDP port, its RPC server on a (simulated)
TCP port, its reactor-lag monitor, and its state file ``membership.json`` in the
host's disk directory, which survives a crash.  Only the reactor, the random
source and the wall clock that seeds the incarnation are the kernel's.

:class:`ClusterSim` keeps the vocabulary of the earlier core-only simulator
(``make_cluster``, ``partition``, ``cut``, ``pause``, ``crash``/``start``,
``run_until_converged``), so the membership tests read the same.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred
from zope.interface import implementer

from ..cluster.membership import EMPTY_VIEW, IMembershipListener, TrmConfig, View
from ..cluster.node import ClusterNode, NodeConfig
from .kernel import Faults, SimHost, SimKernel

if TYPE_CHECKING:
    from ..cluster.membership import Membership

SECRET = b"k" * 32


@attrs.define(eq=False)
class SimMember:
    """One simulated node: its host (and disk) and, while up, its ``ClusterNode``."""

    node_id: str
    address: str
    host: SimHost
    seeds: tuple[str, ...]
    node: ClusterNode | None = None
    #: Every view this node committed, with the true time, across restarts.
    views: list[tuple[float, View]] = attrs.field(factory=list)
    last_epoch: int = 0

    @property
    def up(self) -> bool:
        """True while the node runs."""
        return self.node is not None

    @property
    def core(self) -> Membership | None:
        """The node's TRM core (None when down)."""
        return self.node.core if self.node is not None else None

    @property
    def view(self) -> View:
        """The node's current view (empty when down)."""
        return self.node.view if self.node is not None else EMPTY_VIEW

    @property
    def skew(self) -> float:
        """The host clock's offset from true time."""
        return self.host.skew

    @property
    def rx_loss(self) -> float:
        """The fraction of arriving datagrams the host's socket drops."""
        return self.host.rx_loss

    @rx_loss.setter
    def rx_loss(self, value: float) -> None:
        self.host.rx_loss = value


@implementer(IMembershipListener)
@attrs.define
class _Recorder:
    sim: ClusterSim
    member: SimMember

    def membership_changed(self, old: View, new: View) -> None:
        m = self.member
        if new.epoch < m.last_epoch:
            self.sim.epoch_went_back.append(m.node_id)
        m.last_epoch = max(m.last_epoch, new.epoch)
        m.views.append((self.sim.kernel.now, new))
        if self.sim.on_view is not None:
            self.sim.on_view(m, old, new)


class ClusterSim:
    """``ClusterNode`` s on one :class:`SimKernel`; ``run_until`` advances time."""

    def __init__(
        self,
        seed: int,
        *,
        faults: Faults | None = None,
        config: TrmConfig | None = None,
        skew: float = 0.0,
        kind: str = "porcupine",
        on_view: Callable[[SimMember, View, View], None] | None = None,
        kernel: SimKernel | None = None,
        tls: tuple[Path, Path] | None = None,
        on_boot: Callable[[SimMember, ClusterNode], None] | None = None,
    ) -> None:
        self.kernel = kernel or SimKernel(seed, faults=faults)
        self.rng = self.kernel.rng
        self.config = config or TrmConfig()
        self.max_skew = skew
        self.kind = kind
        self.on_view = on_view
        #: ``(cert, key)`` PEM files every node uses for its RPC (TLS over the kernel)
        self.tls = tls
        #: Called with each freshly built node before it starts (a scenario adds the
        #: services a node kind puts on it: bucket map, replication, documents...).
        self.on_boot = on_boot
        self.nodes: dict[str, SimMember] = {}
        self.epoch_went_back: list[str] = []

    def close(self) -> None:
        """Remove the host disks."""
        self.kernel.close()

    def __enter__(self) -> ClusterSim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def now(self) -> float:
        """True (simulated) time."""
        return self.kernel.now

    # --- topology -----------------------------------------------------------------

    def add_node(self, node_id: str, address: str, seeds: Iterable[str] = ()) -> SimMember:
        """Create (but do not start) a node on a host of its own at ``address``."""
        skew = self.rng.uniform(-self.max_skew, self.max_skew)
        ip, _, _ = address.rpartition(":")
        host = self.kernel.add_host(node_id, ip, skew=skew)
        member = SimMember(node_id, address, host, tuple(seeds))
        self.nodes[node_id] = member
        return member

    def start(self, node_id: str) -> None:
        """Boot (or reboot) a node's process; the node reads its state from the disk."""
        m = self.nodes[node_id]
        reactor = self.kernel.boot(m.host)
        ip, _, port = m.address.rpartition(":")
        config = NodeConfig(
            node_id=node_id,
            kind=self.kind,
            data_dir=m.host.disk,
            cluster_host=ip,
            cluster_port=int(port),
            join=m.seeds,
            trm=self.config,
            cluster_name="sim",
            tls_cert=self.tls[0] if self.tls else None,
            tls_key=self.tls[1] if self.tls else None,
        )
        node = ClusterNode(
            reactor,
            config,
            SECRET,
            rng=random.Random(self.rng.getrandbits(64)),
            wall_clock=m.host.wall_time,
            threadpool=reactor.getThreadPool(),
        )
        node.subscribe(_Recorder(self, m))
        m.node = node
        if self.on_boot is not None:
            self.on_boot(m, node)
        node.startService()

    def crash(self, node_id: str) -> None:
        """Kill a node's process at once (SIGKILL)."""
        m = self.nodes[node_id]
        self.kernel.crash(m.host)
        m.node = None

    def stop(self, node_id: str) -> Deferred[None]:
        """Stop a node cleanly (``stopService``: children, RPC, ports), then end its process;
        fires once it is gone."""
        m = self.nodes[node_id]
        node = m.node
        assert node is not None, f"{node_id} is not running"

        def gone(_: object) -> None:
            if m.node is node:
                self.crash(node_id)

        return node.stopService().addCallback(gone)

    def partition(self, *groups: Iterable[str]) -> None:
        """Only nodes within the same group can talk; unlisted nodes are isolated."""
        self.kernel.partition(*groups)

    def heal(self) -> None:
        """Remove every partition and cut link."""
        self.kernel.heal()

    def cut(self, a: str, b: str) -> None:
        """Only the link between ``a`` and ``b`` fails (non-transitive connectivity)."""
        self.kernel.cut(a, b)

    def pause(self, node_id: str, seconds: float) -> None:
        """Stop a node's process for ``seconds`` (SIGSTOP)."""
        self.kernel.pause(self.nodes[node_id].host, seconds)

    def connected(self, a: str, b: str) -> bool:
        """True when ``a`` and ``b`` can exchange datagrams."""
        return self.kernel.connected(a, b)

    def components(self) -> list[set[str]]:
        """The live nodes, grouped by who can reach whom."""
        comps: list[set[str]] = []
        for n in self.nodes.values():
            if not n.up:
                continue
            for comp in comps:
                if self.connected(n.node_id, next(iter(comp))):
                    comp.add(n.node_id)
                    break
            else:
                comps.append({n.node_id})
        return comps

    def converged(self) -> bool:
        """Every component's live nodes share one view whose members are exactly them."""
        for comp in self.components():
            # Checked every 50 ms of a run: compare with one view (no set of views to hash).
            views = [self.nodes[i].view for i in comp]
            first = views[0]
            for v in views:
                if v.epoch != first.epoch or v.members != first.members:
                    return False
            if {m.node_id for m in first.members} != comp:
                return False
            if any(self.nodes[i].core.in_round for i in comp):  # type: ignore[union-attr]
                return False
        return True

    # --- time ---------------------------------------------------------------------

    def run_until(self, until: float, stop: Callable[[], bool] | None = None) -> bool:
        """Advance to ``until`` (true time); with ``stop``, return early once it holds."""
        return self.kernel.run_until(until, stop)

    def run_until_converged(self, limit: float) -> float | None:
        """Run until converged (checked every 50 ms); the time it took, or None."""
        start = self.now
        while self.now < start + limit:
            self.run_until(self.now + 0.05)
            if self.converged():
                return self.now - start
        return None

    def sent(self) -> dict[str, Any]:
        """Datagram counters summed over the live nodes' membership shells."""
        total: dict[str, Any] = {}
        for m in self.nodes.values():
            if m.node is not None and m.node.protocol is not None:
                for k, v in m.node.protocol.stats.items():
                    total[k] = total.get(k, 0) + v
        return total


def make_cluster(n: int, seed: int, *, seeds_per_node: int = 1, **kwargs: Any) -> ClusterSim:
    """``n`` nodes ``n0..`` on addresses ``10.0.0.i:7946``; each knows a few earlier seeds."""
    sim = ClusterSim(seed, **kwargs)
    addresses = [f"10.0.{i // 250}.{i % 250 + 1}:7946" for i in range(n)]
    for i in range(n):
        pool = addresses[:i] or addresses[1:2]
        seeds = sim.rng.sample(pool, min(seeds_per_node, len(pool))) if pool else []
        sim.add_node(f"n{i}", addresses[i], seeds)
    for i in range(n):
        sim.start(f"n{i}")
    return sim
