"""A deterministic simulated network for cluster protocol cores (TRM cores alone).

The package's simulation kernel (:mod:`yimaporc.sim.kernel`, :mod:`yimaporc.sim.cluster`)
runs the shipped ``ClusterNode`` shells; this older network of cores alone serves only the
bench's mail cost model (:mod:`.mailsim`).

Many nodes run in one process on a virtual clock.  Every datagram can go
through the real wire format (MAC, replay guard) and suffers seeded latency,
loss, duplication, reordering and partitions; nodes crash and restart with
their persistent state; each node's local clock is skewed.  Everything is
driven by one ``random.Random(seed)``, so a failing seed replays exactly.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable

import attrs

from yimaporc.cluster import wire
from yimaporc.cluster.membership import EMPTY_VIEW, Membership, Send, TrmConfig, View, ViewChanged

from .coreloop import CoreNet


@attrs.define
class Faults:
    """Network behaviour: latency range (s) and probabilities per datagram."""

    latency: tuple[float, float] = (0.0005, 0.005)
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_extra: float = 0.05


@attrs.define
class Disk:
    """What survives a crash: epoch, Lamport clock, boot count, known addresses."""

    epoch: int = 0
    lamport: int = 0
    incarnation: int = 0
    known: tuple[str, ...] = ()


@attrs.define(eq=False)
class SimNode:
    """One simulated node: its persistent disk and, while up, its protocol core."""

    node_id: str
    address: str
    seeds: tuple[str, ...]
    skew: float
    disk: Disk = attrs.field(factory=Disk)
    core: Membership | None = None
    guard: wire.ReplayGuard = attrs.field(factory=wire.ReplayGuard)
    timer_gen: int = 0
    seq: int = 0
    paused_until: float = 0.0
    rx_loss: float = 0.0
    views: list[tuple[float, View]] = attrs.field(factory=list)

    @property
    def up(self) -> bool:
        """True while the node runs."""
        return self.core is not None

    @property
    def view(self) -> View:
        """The node's current view (empty when down)."""
        return self.core.view if self.core is not None else EMPTY_VIEW


class SimNetwork(CoreNet):
    """Nodes, links and a virtual clock (:class:`~.coreloop.CoreNet`: the event
    queue, partitions and cut links, the datagram draws); ``run_until`` advances time."""

    def __init__(
        self,
        seed: int,
        *,
        faults: Faults | None = None,
        config: TrmConfig | None = None,
        skew: float = 0.0,
        encode: bool = True,
        on_view: Callable[[SimNode, View, View], None] | None = None,
    ) -> None:
        super().__init__(seed)
        self.faults = faults or Faults()
        self.config = config or TrmConfig()
        self.max_skew = skew
        self.encode = encode
        self.on_view = on_view
        self.key = b"k" * 32
        self.scope = wire.Scope("sim", "porcupine")
        self.nodes: dict[str, SimNode] = {}
        self.by_address: dict[str, SimNode] = {}
        self.datagrams_sent = 0
        self.datagrams_delivered = 0
        self.rejected = 0
        self.epoch_went_back: list[str] = []

    # --- topology -----------------------------------------------------------------

    def add_node(self, node_id: str, address: str, seeds: Iterable[str] = ()) -> SimNode:
        """Create (but do not start) a node."""
        skew = self.rng.uniform(-self.max_skew, self.max_skew)
        node = SimNode(node_id, address, tuple(seeds), skew)
        self.nodes[node_id] = node
        self.by_address[address] = node
        return node

    def start(self, node_id: str) -> None:
        """Boot (or reboot) a node from its disk."""
        node = self.nodes[node_id]
        node.disk.incarnation += 1
        me = wire.Member(node.node_id, node.address, node.disk.incarnation)
        node.core = Membership(
            me,
            seeds=node.seeds,
            rng=random.Random(self.rng.getrandbits(64)),
            config=self.config,
            epoch=node.disk.epoch,
            lamport=node.disk.lamport,
            known=node.disk.known,
        )
        node.guard = wire.ReplayGuard()
        node.seq = 0
        self._perform(node, node.core.start(self._local(node)))

    def crash(self, node_id: str) -> None:
        """Stop a node at once (its in-flight datagrams still arrive nowhere)."""
        node = self.nodes[node_id]
        node.core = None
        node.timer_gen += 1

    def pause(self, node_id: str, seconds: float) -> None:
        """Stop a node's process for ``seconds`` (SIGSTOP): its timers and the datagrams
        it receives wait; on resume its late timers run first, then the queued datagrams."""
        self.nodes[node_id].paused_until = self.now + seconds

    def components(self) -> list[set[str]]:
        """The live nodes, grouped by who can reach whom."""
        live = [n for n in self.nodes.values() if n.up]
        comps: list[set[str]] = []
        for n in live:
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
            views = {(self.nodes[i].view.epoch, self.nodes[i].view.members) for i in comp}
            if len(views) != 1:
                return False
            (_, members) = next(iter(views))
            if {m.node_id for m in members} != comp:
                return False
            if any(self.nodes[i].core.in_round for i in comp):  # type: ignore[union-attr]
                return False
        return True

    # --- time -------------------------------------------------------------------

    def _local(self, node: SimNode) -> float:
        return self.now + node.skew

    def run_until_converged(self, limit: float) -> float | None:
        """Run until converged (checked as events happen); the time it took, or None."""
        start = self.now
        step = 0.05
        while self.now < start + limit:
            self.run_until(self.now + step)
            if self.converged():
                return self.now - start
        return None

    # --- plumbing ---------------------------------------------------------------

    def _perform(self, node: SimNode, actions: list[Send | ViewChanged]) -> None:
        core = node.core
        if core is None:
            return
        for act in actions:
            if isinstance(act, Send):
                self._transmit(node, act)
            else:
                if act.new.epoch < node.disk.epoch:
                    self.epoch_went_back.append(node.node_id)
                node.disk.epoch = act.new.epoch
                node.disk.known = tuple(core.known_addresses())
                node.views.append((self.now, act.new))
                if self.on_view is not None:
                    self.on_view(node, act.old, act.new)
        node.disk.lamport = core.lamport
        self._schedule(node)

    def _schedule(self, node: SimNode) -> None:
        core = node.core
        if core is None:
            return
        node.timer_gen += 1
        gen = node.timer_gen
        deadline = core.next_deadline()
        if deadline is None:
            return
        when = max(self.now, deadline - node.skew)

        def fire() -> None:
            if node.paused_until > self.now:
                self._at(node.paused_until, fire)
                return
            if node.timer_gen == gen and node.core is not None:
                # never tick before the deadline because of float rounding
                local = max(self._local(node), deadline)
                self._perform(node, node.core.tick(local))

        self._at(when, fire)

    def _transmit(self, src: SimNode, act: Send) -> None:
        assert src.core is not None
        self.datagrams_sent += 1
        src.seq += 1
        header = wire.Header(
            src.node_id, src.address, src.disk.incarnation, src.seq, src.core.lamport
        )
        payload: bytes | wire.Datagram
        if self.encode:
            payload = wire.serialize(self.key, self.scope, header, act.body)
        else:
            payload = wire.Datagram(header, act.body)
        dst = self.by_address.get(act.address)
        if dst is None or not self.connected(src.node_id, dst.node_id):
            return
        f = self.faults
        for delay in self._delays(f.latency, f.loss, f.duplicate, (f.reorder, f.reorder_extra)):
            self._at(self.now + delay, functools.partial(self._deliver, src.node_id, dst, payload))

    def _deliver(self, src: str, dst: SimNode, payload: bytes | wire.Datagram) -> None:
        if dst.core is None or not self.connected(src, dst.node_id):
            return
        if dst.paused_until > self.now:
            # after the timers that fire at the same instant, as a reactor does
            self._at(dst.paused_until + 1e-6, functools.partial(self._deliver, src, dst, payload))
            return
        if dst.rx_loss and self.rng.random() < dst.rx_loss:
            return  # the node's socket buffer overflowed (a flood)
        if isinstance(payload, bytes):
            try:
                dgram = wire.parse(self.key, self.scope, payload)
            except wire.MalformedPacket:
                self.rejected += 1
                return
        else:
            dgram = payload
        if not dst.guard.check(dgram.header):
            self.rejected += 1
            return
        self.datagrams_delivered += 1
        self._perform(dst, dst.core.receive(dgram.header, dgram.body, self._local(dst)))


def make_cluster(n: int, seed: int, *, seeds_per_node: int = 1, **kwargs: object) -> SimNetwork:
    """``n`` nodes ``n0..`` on addresses ``10.0.0.i:7946``; each knows a few earlier seeds."""
    net = SimNetwork(seed, **kwargs)  # type: ignore[arg-type]
    addresses = [f"10.0.{i // 250}.{i % 250 + 1}:7946" for i in range(n)]
    for i in range(n):
        pool = addresses[:i] or addresses[1:2]
        seeds = net.rng.sample(pool, min(seeds_per_node, len(pool))) if pool else []
        net.add_node(f"n{i}", addresses[i], seeds)
    for i in range(n):
        net.start(f"n{i}")
    return net
