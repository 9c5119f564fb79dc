"""The bench's mail cost model, a deterministic model of a Porcupine cluster:
``cd bench && ../.venv/bin/python -m mailmodel.mailsim`` (``bench/model.py`` drives it).

It runs the shipped sans-IO cores, not the shipped nodes: the simulation of the shipped
Porcupine nodes (their Twisted shells, SMTP/IMAP/POP3 sessions, stores) is
:mod:`yimaporc.sim.mail` on the one simulation kernel.  Once this model had a rule the
shipped delivery proxy lacked (record a new holder before a numbered store) and nothing
showed it until the kernel ran the real nodes; what it says about correctness is checked
there, what it says about cost against the scaled-down measurements (docs/benchmarks.md).


Many mail nodes run in one process on the virtual clock of
:class:`.simnet.SimNetwork`, so membership is the real TRM core
(:mod:`yimaporc.cluster.membership`) with the user map
(:class:`~yimaporc.cluster.buckets.BucketMap`) riding in its commits, exactly
as :class:`~yimaporc.cluster.bucketservice.BucketMapService` does it.  Above
it, each node runs the real sans-IO pieces of the mail service: a
:class:`~yimaporc.porcupine.softstate.UserManagerState` (soft state, lost on
a crash), :func:`~yimaporc.porcupine.softstate.hints_for` for reconstruction
and a :class:`~yimaporc.porcupine.balancer.LoadBalancer` in the delivery
proxy.  Hard state is a set of message ids per user in one directory per
bucket (it survives crashes); each node has one disk that serves operations
one at a time (``disk_time`` seconds each, longer on a *slow* node), and a
node's load is its pending disk operations.

Mail RPCs are request/reply pairs with seeded latency; a request or reply
across a partition or to a crashed node is lost and the caller times out.
Every reply carries the replier's load.  What a call between two processes
costs is counted (a call a node makes to itself is free):

* delivery at a proxy: ask the recipient's manager for the fragment list,
  choose a node with the balancer, store there (retry elsewhere on timeout);
  a node storing the first message of a user in a bucket tells the bucket's
  manager (with the map epoch it knows; early notes wait at the manager for
  that map, stale ones are dropped because the node's reconstruction hint for
  the newer map covers them);
* retrieval at a proxy: ask the manager, then ask every fragment node for the
  user's digests (message ids);
* reconfiguration: on every view change each node sends each new manager of a
  fresh bucket one message with its hints (resent while the map stands).
  The commit also names the coordinator's previous view; a member whose own
  previous view differs was *away* (it booted, sat in another partition, or
  installed a commit the coordinator never saw).  An away node sends hints for
  every bucket it holds mail in, and pulls hints from every member for the
  buckets it manages that the commit did not restamp (for those the others
  saw no change).  Without this the simulator finds lost fragment entries
  after quick restarts and partition merges;
* background: every second each node swaps loads with one random member.

Delivery is at least once: if a store's reply is lost, the retry can store
the message a second time; retrieval merges by message id (the invariants
check that only such deliveries have copies).  With ``replicas`` R > 1 the
proxy stores every message on the R nodes the balancer picks, each copy also
paying an update-log write, and answers when all R are durable.

A cost model (``MailConfig.cpu``, off by default): each node also has one
CPU, a FIFO server like its disk, charged per SMTP message at the proxy, per
end of every call between two nodes, per stored copy and per log write;
:meth:`MailSim.closed_loop` drives it at saturation (bench/model.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs

from yimaporc.cluster import wire
from yimaporc.cluster.buckets import BucketMap
from yimaporc.cluster.bucketservice import pack_commit, unpack_commit
from yimaporc.cluster.membership import TrmConfig, View
from yimaporc.porcupine.balancer import LoadBalancer, load_figure
from yimaporc.porcupine.reconstruct import (
    HEDGE_DELAY,
    HORIZON_AGE,
    LEASE,
    MARK_TIMEOUT,
    PAUSE_GRACE,
    PULL_TRIES,
    READ_RENEW,
    SWEEP_INTERVAL,
    Action,
    BucketHint,
    Horizon,
    MajorityWrite,
    NeedMark,
    Number,
    PullHints,
    Reconstruction,
    SendHints,
    Settled,
    Taken,
    UserHint,
    admit_fenced,
    decode_hints,
    fence_of,
)
from yimaporc.porcupine.softstate import UserManagerState, bucket_of
from yimaporc.porcupine.values import PENDING
from yimaporc.sim.uidcheck import UidChecker

from .simnet import Faults, SimNetwork, SimNode

N_BUCKETS = 256


@attrs.frozen
class CpuCost:
    """CPU seconds per operation on a node's one core (``MailConfig.cpu``)."""

    smtp: float = 0.0  # at the proxy: one message's SMTP session
    rpc: float = 0.0  # at each end of a call between two nodes
    store: float = 0.0  # at a node storing one copy
    log: float = 0.0  # at each replica, when replicas > 1: the update-log entry


@attrs.define
class MailConfig:
    """Workload and cost parameters of one simulation."""

    n_buckets: int = N_BUCKETS
    users_per_node: int = 20
    spread_limit: int = 2
    replicas: int = 1
    #: Per-user R instead of ``replicas``: user i gets ``replica_mix[i % len]``
    #: (mixed ``--replicas 1/2/3`` as the chaos run has them).
    replica_mix: tuple[int, ...] = ()
    rpc_latency: tuple[float, float] = (0.0003, 0.002)
    rpc_timeout: float = 0.3
    store_attempts: int = 3
    retry_after: float = 0.3
    disk_time: float = 0.004
    slow: dict[str, float] = attrs.field(factory=dict)  # node -> disk time factor
    exchange_interval: float = 1.0
    hot_users: int = 0  # the first k users receive ``hot_share`` of the mail
    hot_share: float = 0.0
    cpu: CpuCost | None = None  # None: CPU is free (only disks and latency cost time)
    log_disk_time: float = 0.0  # disk time of a replica's update-log write (replicas > 1)


@attrs.define(eq=False)
class MailNode:
    """One node's mail service: hard state (survives crashes) and soft state (does not).

    Hard state follows :class:`~yimaporc.porcupine.fragments.FragmentStore`: per user
    the message ids held (``mail``), each one's UID (0: stored unnumbered, oldest
    first in ``unnumbered``), the mailbox's UIDNEXT, the highest UIDNEXT this node
    ever showed a client, and the bucket marks and holder records it wrote for
    managers.  Soft state is the :class:`~yimaporc.porcupine.reconstruct.Reconstruction`
    core (the one the node runs), the fences of the installed map and the lease."""

    node_id: str
    n_buckets: int
    mail: dict[int, dict[str, set[str]]] = attrs.field(factory=dict)  # bucket -> user -> ids
    uids: dict[str, dict[str, int]] = attrs.field(factory=dict)  # user -> id -> UID (0: none)
    unnumbered: dict[str, list[str]] = attrs.field(factory=dict)  # user -> ids, oldest first
    uidnext: dict[str, int] = attrs.field(factory=dict)  # user -> the mailbox's UIDNEXT
    shown: dict[str, int] = attrs.field(factory=dict)  # user -> highest UIDNEXT shown here
    marks: dict[int, int] = attrs.field(factory=dict)  # bucket -> UID mark recorded here
    holders: dict[int, set[tuple[str, str]]] = attrs.field(factory=dict)
    known: set[str] = attrs.field(factory=set)  # every node ever seen in a view
    #: Replicated copies waiting for the UID their numbering copy gets elsewhere
    #: (FragmentStore's ``held`` table): user -> ids; never listed, never numbered here.
    held: dict[str, set[str]] = attrs.field(factory=dict)
    #: The replica set of each replicated message this node numbers (its log object).
    copies: dict[tuple[str, str], tuple[str, ...]] = attrs.field(factory=dict)
    #: UID versions still to push to replicas (the update log: durable, retried):
    #: (target, user, id, uid; 0: a held copy to store).
    outbox: list[tuple[str, str, str, int]] = attrs.field(factory=list)
    map: BucketMap = attrs.field(default=BucketMap.empty(N_BUCKETS))  # cached on disk
    core: Reconstruction | None = None
    fences: dict[int, str] = attrs.field(factory=dict)
    lb: LoadBalancer | None = None
    waiting: dict[int, list[Callable[[], None]]] = attrs.field(factory=dict)
    extending: dict[int, list[Callable[[], None]]] = attrs.field(factory=dict)
    timer_gen: int = 0
    paused_until: float = 0.0
    lapsed_until: float = 0.0  # lease: lapsed until a new view or this time
    incarnation: int = 0
    up: bool = False
    disk_free: float = 0.0
    cpu_free: float = 0.0
    disk_busy: float = 0.0  # seconds of disk work queued so far
    cpu_busy: float = 0.0  # seconds of CPU work queued so far
    pending: int = 0
    stores: int = 0
    exchanging: int = -1  # incarnation whose load exchange loop runs

    @property
    def um(self) -> UserManagerState | None:
        """The soft state (fragment lists) of the core, None while down."""
        return self.core.state if self.core is not None else None

    def users_with_mail(self, bucket: int) -> list[str]:
        """One directory read: users of ``bucket`` this node holds mail for."""
        return [u for u, ids in self.mail.get(bucket, {}).items() if ids]

    def hint(self, bucket: int, epoch: int) -> BucketHint:
        """This node's hard state of ``bucket`` as the hint the node sends (one read)."""
        users = set(self.mail.get(bucket, {}))
        users |= {u for u in self.shown if bucket_of(u, self.n_buckets) == bucket}
        return BucketHint(
            bucket,
            epoch,
            tuple(
                UserHint(
                    u,
                    bool(self.mail.get(bucket, {}).get(u)),
                    max(self.uidnext.get(u, 1), self.shown.get(u, 1)),
                    len(self.unnumbered.get(u, ())),
                )
                for u in sorted(users)
            ),
            (),
            self.marks.get(bucket, 1),
            tuple(sorted(self.holders.get(bucket, ()))),
        )

    @property
    def load(self) -> float:
        """This node's load figure (pending disk operations)."""
        return load_figure(self.pending)


@attrs.define
class _Delivery:
    user: str
    msg_id: str
    proxy: str
    incarnation: int
    fragments: list[str] = attrs.field(factory=list)
    unrecorded: set[str] = attrs.field(factory=set)  # of ``fragments``: no majority record
    uid: int = 0
    fence: str = ""
    plan_from: str = ""
    planned_at: float = 0.0
    recorded: set[str] = attrs.field(factory=set)  # new holders a majority recorded
    attempts: int = 0
    timeouts: int = 0
    done: Callable[[bool], None] | None = None


class _Net(SimNetwork):
    """SimNetwork whose coordinators put the user map into the commit."""

    def __init__(self, seed: int, owner: MailSim, **kwargs: Any) -> None:
        super().__init__(seed, **kwargs)
        self.owner = owner

    def at(self, when: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` at virtual time ``when``."""
        self._at(when, fn)

    def start(self, node_id: str) -> None:
        """Boot (or reboot) a node from its disk; its commits carry the user map
        in the node's own commit format (:func:`bucketservice.pack_commit`)."""
        self.owner._booting(node_id)
        super().start(node_id)
        core = self.nodes[node_id].core
        assert core is not None
        mail = self.owner.mail[node_id]

        def attach(old: View, members: tuple[wire.Member, ...], epoch: int) -> bytes:
            return pack_commit(old, mail.map.reassign([m.node_id for m in members], epoch))

        core.attachment_for = attach


class MailSim:
    """A Porcupine cluster of ``n`` nodes on a simulated network, seeded."""

    def __init__(
        self,
        n: int,
        seed: int,
        config: MailConfig | None = None,
        *,
        faults: Faults | None = None,
        trm: TrmConfig | None = None,
    ) -> None:
        self.config = config or MailConfig()
        self.seed = seed
        self.rng = random.Random(seed * 1_000_003 + 17)
        self.mail: dict[str, MailNode] = {}
        self.net = _Net(
            seed,
            self,
            faults=faults or Faults(),
            config=trm,
            encode=False,
            on_view=self._on_view,
        )
        self.users = [f"user{i}@example.org" for i in range(self.config.users_per_node * n)]
        self.msgs: Counter[str] = Counter()  # messages by purpose
        self.sent_by: dict[str, Counter[str]] = {}  # node -> purpose -> messages
        self.calls_by: dict[str, Counter[str]] = {}  # node -> purpose -> requests
        self.hint_bytes: Counter[str] = Counter()  # node -> bytes of hints sent
        self.dir_reads: Counter[str] = Counter()  # node -> bucket directories read for hints
        self.deliveries = 0
        self.retrievals = 0
        self.acked: dict[tuple[str, str], int] = {}  # (user, msg) -> store timeouts seen
        self.failed_deliveries = 0
        #: Stores that timed out after reaching their node (DeliveryProxy.unsure).
        self.unsure_stores = 0
        self.last_soft_update = 0.0
        self._next_msg = 0
        self._parsed: dict[bytes, tuple[tuple[int, str] | None, BucketMap]] = {}
        self.away_installs = 0
        self._n_started = 0
        self.checker = UidChecker()
        #: Reads show only what is below the manager's visibility horizon
        #: (:class:`~yimaporc.porcupine.reconstruct.Horizon`); False: the old reads.
        self.visibility = True
        #: A numbered store goes to a fragment node no majority recorded as a holder
        #: only after its record (:meth:`Reconstruction.unrecorded`); False: the old rule.
        self.record_first = True
        #: Replicated users' UIDs under the same fence as R=1 (issue 14 bug 2): the
        #: plan is fenced, the first replica (the coordinator of the message's log
        #: object) decides numbered or unnumbered under the store's fence check and
        #: the other copies follow it (held until it is numbered).  False: the old
        #: path, an unfenced UID even without a majority, every copy stored alike.
        self.fenced_replicas = True
        #: Reads are certain only under a read lease from a majority, and a node that
        #: confirmed one records no mark for another view's map until it ran out
        #: (:data:`~yimaporc.porcupine.reconstruct.READ_LEASE`); False: the old rule.
        self.read_leases = True
        #: Copies whose UID was taken there by another message (should stay 0).
        self.copy_collisions = 0
        self._pushing: set[tuple[Any, ...]] = set()
        self.faults_done: Counter[str] = Counter()
        #: (user, node) a proxy recorded as a holder, no store there answered yet.
        self.recorded_unstored: set[tuple[str, str]] = set()
        for _ in range(n):
            self.add_node(start=False)
        for node_id in list(self.mail):
            self.net.start(node_id)

    # --- topology ---------------------------------------------------------------

    def add_node(self, *, start: bool = True) -> str:
        """Create (and by default boot) a node that knows up to two earlier nodes."""
        i = self._n_started
        self._n_started += 1
        node_id = f"n{i}"
        address = f"10.0.{i // 250}.{i % 250 + 1}:7946"
        pool = sorted(n.address for n in self.net.nodes.values())
        seeds = self.rng.sample(pool, min(2, len(pool))) if pool else []
        if not seeds and i == 0:
            seeds = ["10.0.0.2:7946"]
        self.net.add_node(node_id, address, seeds)
        self.mail[node_id] = MailNode(
            node_id, self.config.n_buckets, map=BucketMap.empty(self.config.n_buckets)
        )
        if start:
            self.net.start(node_id)
        return node_id

    def _booting(self, node_id: str) -> None:
        m = self.mail[node_id]
        m.incarnation += 1
        m.up = True
        m.core = Reconstruction(node_id, self.config.n_buckets)
        m.core.known |= m.known
        m.core.read_leases = self.read_leases
        if self.read_leases:
            m.core.booted(self.net.now)
        m.fences = {}
        m.lb = LoadBalancer(node_id, spread_limit=self.config.spread_limit)
        m.waiting, m.extending = {}, {}
        m.pending = 0
        m.paused_until = m.lapsed_until = 0.0
        m.disk_free = self.net.now
        m.cpu_free = self.net.now

    def crash(self, node_id: str) -> None:
        """Stop a node: soft state and queued disk work are lost, hard state stays."""
        self.net.crash(node_id)
        m = self.mail[node_id]
        m.incarnation += 1
        m.up = False
        m.core = None
        m.lb = None
        m.waiting, m.extending = {}, {}
        m.pending = 0

    def restart(self, node_id: str) -> None:
        """Boot a crashed node from its disk."""
        self.net.start(node_id)

    def pause(self, node_id: str, seconds: float) -> None:
        """SIGSTOP for ``seconds``: nothing runs there (timers, requests and replies
        wait), then it goes on with its old state.  A pause longer than half a lease
        lapses the node's lease until it installs a new view or PAUSE_GRACE s pass
        (what MailCluster's lease loop finds on waking)."""
        m = self.mail[node_id]
        self.net.pause(node_id, seconds)
        m.paused_until = self.net.now + seconds
        if seconds > LEASE / 2:
            m.lapsed_until = m.paused_until + PAUSE_GRACE

    def lease_ok(self, m: MailNode) -> bool:
        """``m``'s lease (always, alone in its known cluster)."""
        return m.known <= {m.node_id} or self.net.now >= m.lapsed_until

    def live(self, node_id: str) -> tuple[str, ...]:
        """The members of ``node_id``'s current view."""
        return self.net.nodes[node_id].view.node_ids

    def up_nodes(self) -> list[str]:
        """Nodes that run."""
        return [n for n, m in self.mail.items() if m.up]

    # --- plumbing ---------------------------------------------------------------

    def _count(self, src: str, purpose: str) -> None:
        self.msgs[purpose] += 1
        by = self.sent_by.get(src)
        if by is None:
            by = self.sent_by[src] = Counter()
        by[purpose] += 1

    def _running(self, node: MailNode, inc: int, fn: Callable[[], None]) -> None:
        """Run ``fn`` on ``node`` now, or when it resumes if it is paused (never if it
        crashed meanwhile)."""
        if not node.up or node.incarnation != inc:
            return
        if node.paused_until > self.net.now:
            self.net.at(node.paused_until + 1e-6, lambda: self._running(node, inc, fn))
            return
        fn()

    def _later(self, node: MailNode, delay: float, fn: Callable[[], None]) -> None:
        """A timer of ``node`` (late if it is paused then; gone if it crashes)."""
        inc = node.incarnation
        self.net.at(self.net.now + delay, lambda: self._running(node, inc, fn))

    def _rpc(
        self,
        src: MailNode,
        dst_id: str,
        purpose: str,
        work: Callable[[MailNode, Callable[[Any], None]], None],
        on_reply: Callable[[Any], None],
        on_fail: Callable[[], None],
        timeout: float | None = None,
        on_arrive: Callable[[], None] | None = None,
    ) -> None:
        """Call ``work`` at ``dst_id``; it answers through its callback; replies carry load.
        ``timeout``: longer than ``rpc_timeout`` for calls the callee answers only after
        a majority write (plans, holder notes: up to MARK_TIMEOUT).  ``on_arrive``: the
        request reached ``dst_id`` (its TCP delivered it; a paused callee runs it on
        waking), so a timeout is no proof it will not be done."""
        inc = src.incarnation
        state = {"done": False}
        dst = self.mail.get(dst_id)

        def reply(result: Any) -> None:
            if state["done"] or not src.up or src.incarnation != inc:
                return
            state["done"] = True
            on_reply(result)

        if dst is src:
            work(src, reply)
            return

        def expire() -> None:
            if not state["done"]:
                state["done"] = True
                on_fail()

        self._later(src, self.config.rpc_timeout if timeout is None else timeout, expire)
        self._count(src.node_id, purpose)
        calls = self.calls_by.get(src.node_id)
        if calls is None:
            calls = self.calls_by[src.node_id] = Counter()
        calls[purpose] += 1

        def arrive() -> None:
            if dst is None or not dst.up or not self.net.connected(src.node_id, dst_id):
                return
            if on_arrive is not None:
                on_arrive()
            dinc = dst.incarnation

            def respond(result: Any) -> None:
                if not dst.up or dst.incarnation != dinc:
                    return
                self._count(dst_id, purpose)
                load = dst.load

                def back() -> None:
                    if not self.net.connected(src.node_id, dst_id):
                        return
                    if src.lb is not None and src.up and src.incarnation == inc:
                        src.lb.observe(dst_id, load, self.net.now)
                    self._cpu(src, self._rpc_cpu, lambda: reply(result))

                self.net.at(self.net.now + self._latency(), lambda: self._running(src, inc, back))

            self._running(
                dst, dinc, lambda: self._cpu(dst, self._rpc_cpu, lambda: work(dst, respond))
            )

        self.net.at(self.net.now + self._latency(), arrive)

    @property
    def _slow_rpc(self) -> float:
        return self.config.rpc_timeout + MARK_TIMEOUT

    def _latency(self) -> float:
        return self.rng.uniform(*self.config.rpc_latency)

    @property
    def _rpc_cpu(self) -> float:
        return self.config.cpu.rpc if self.config.cpu else 0.0

    def _cpu(self, node: MailNode, seconds: float, fn: Callable[[], None]) -> None:
        """Queue ``seconds`` of CPU work on ``node`` (FIFO); ``fn`` runs when it is done.

        Free work (the default, no cost model) runs at once, as before the model.
        """
        if seconds <= 0:
            fn()
            return
        inc = node.incarnation
        start = max(self.net.now, node.cpu_free)
        node.cpu_free = start + seconds
        node.cpu_busy += seconds

        def done() -> None:
            if node.up and node.incarnation == inc:
                fn()

        self.net.at(node.cpu_free, done)

    def _disk(self, node: MailNode, fn: Callable[[], None], seconds: float | None = None) -> None:
        """Queue one disk operation on ``node``; ``fn`` runs when it completes."""
        inc = node.incarnation
        factor = self.config.slow.get(node.node_id, 1.0)
        start = max(self.net.now, node.disk_free)
        t = (self.config.disk_time if seconds is None else seconds) * factor
        t *= self.rng.uniform(0.5, 1.5)
        node.disk_free = start + t
        node.disk_busy += t
        node.pending += 1

        def done() -> None:
            if node.up and node.incarnation == inc:
                node.pending -= 1
                fn()

        self.net.at(node.disk_free, done)

    def _bucket(self, user: str) -> int:
        return bucket_of(user, self.config.n_buckets)

    # --- user manager side ------------------------------------------------------

    # --- the reconstruction core's shell ----------------------------------------------

    def _on_view(self, node: SimNode, old: View, new: View) -> None:
        """Install the committed map in the node's core and carry out its actions."""
        m = self.mail[node.node_id]
        if new.attachment:
            # Every member parses the same commit: do it once (construct is slow).
            cached = self._parsed.get(new.attachment)
            if cached is None:
                cached = unpack_commit(new.attachment)
                self._parsed = {new.attachment: cached}
            previous, new_map = cached
            away = previous is not None and previous != (old.epoch, old.coordinator)
        else:
            new_map = m.map.reassign(new.node_ids, new.epoch)  # booted: a group of one
            away = True
        m.map = new_map
        if m.core is None:
            return
        members = set(new.node_ids)
        m.known |= members
        m.core.known |= members
        m.lapsed_until = 0.0  # the view a paused node waits for
        m.fences = {b: fence_of(new_map, b) for b in range(len(new_map))}
        if away:
            self.away_installs += 1
        away = away or m.core.prev_live is None
        self._perform(
            m, m.core.install(new_map, members, view=new.epoch, away=away, now=self.net.now)
        )

    def _perform(self, m: MailNode, actions: Sequence[Action]) -> None:
        """Carry out the core's actions on ``m`` and keep its timer at the next deadline."""
        for a in actions:
            if isinstance(a, SendHints):
                self._send_hints(m, a)
            elif isinstance(a, PullHints):
                self._pull(m, m.incarnation, a.peer, list(a.buckets), a.view, PULL_TRIES)
            elif isinstance(a, Settled):
                for fn in m.waiting.pop(a.bucket, []):
                    fn()
            elif isinstance(a, Number):
                self._number(m, a)
            # PushProfiles: the simulator has no profiles
        self._arm(m)

    def _arm(self, m: MailNode) -> None:
        if m.core is None:
            return
        due = m.core.next_deadline()
        m.timer_gen += 1
        if due is None:
            return
        gen = m.timer_gen

        def fire() -> None:
            if m.timer_gen == gen and m.core is not None:
                self._perform(m, m.core.tick(self.net.now, lease=self.lease_ok(m)))

        self._later(m, max(0.0, due - self.net.now), fire)

    def _receive(self, m: MailNode, sender: str, hints: Sequence[BucketHint], view: int) -> None:
        if m.core is None:
            return
        before = m.core.hints_received
        out: list[Action] = []
        for h in hints:
            out.extend(m.core.receive(sender, h, view, now=self.net.now))
        if m.core.hints_received > before:
            self.last_soft_update = self.net.now
        self._perform(m, out)

    def _read_hints(self, m: MailNode, bmap: BucketMap, buckets: Sequence[int]) -> list[BucketHint]:
        self.dir_reads[m.node_id] += sum(1 for b in buckets if m.mail.get(b))
        return [m.hint(b, bmap.epochs[b]) for b in buckets]

    def _send_hints(self, m: MailNode, act: SendHints) -> None:
        per: dict[str, list[BucketHint]] = {}
        for h in self._read_hints(m, act.bmap, act.buckets):
            per.setdefault(act.bmap.owners[h.bucket], []).append(h)
        for manager, hints in sorted(per.items()):
            self._push(m, m.incarnation, manager, hints, act.view, PULL_TRIES)

    def _push(
        self, m: MailNode, inc: int, manager: str, hints: list[BucketHint], view: int, tries: int
    ) -> None:
        if not m.up or m.incarnation != inc or m.core is None:
            return
        if manager == m.node_id:
            self._receive(m, m.node_id, hints, view)
            return
        self.hint_bytes[m.node_id] += len(json.dumps([h.encode() for h in hints]))
        wire_hints = [h.encode() for h in hints]

        def work(dst: MailNode, respond: Callable[[Any], None]) -> None:
            self._receive(dst, m.node_id, decode_hints(wire_hints, self.config.n_buckets), view)
            respond(None)

        def retry() -> None:
            core = m.core
            if core is None:
                return
            still = core.still_wanted(manager, hints)
            if tries > 1 and still and manager in core.members:
                self._later(
                    m,
                    self.config.retry_after,
                    lambda: self._push(m, inc, manager, still, view, tries - 1),
                )

        self._rpc(m, manager, "reconfig", work, lambda _: None, retry)

    def _pull(
        self, m: MailNode, inc: int, peer: str, buckets: list[int], view: int, tries: int
    ) -> None:
        """Ask ``peer`` for its hints of ``buckets`` (we were away)."""
        if not m.up or m.incarnation != inc or m.core is None:
            return
        self.hint_bytes[m.node_id] += len(json.dumps(buckets))

        def work(dst: MailNode, respond: Callable[[Any], None]) -> None:
            hints = self._read_hints(dst, dst.map, buckets)
            body = [h.encode() for h in hints]
            self.hint_bytes[dst.node_id] += len(json.dumps(body))
            respond(body)

        def got(body: Any) -> None:
            core = m.core
            if core is None:
                return
            hints = core.pulled(peer, decode_hints(body, self.config.n_buckets), buckets)
            self._receive(m, peer, hints, core.view_epoch)

        def retry() -> None:
            core = m.core
            still = core.pull_again(peer, buckets, view) if core is not None else []
            if tries > 1 and still:
                self._later(
                    m,
                    self.config.retry_after,
                    lambda: self._pull(m, inc, peer, still, view, tries - 1),
                )

        self._rpc(m, peer, "reconfig", work, got, retry)

    def _settled(self, m: MailNode, user: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` once ``user``'s bucket is not settling at ``m``."""
        b = self._bucket(user)
        if m.core is not None and b in m.core.settling:
            m.waiting.setdefault(b, []).append(fn)
        else:
            fn()

    def _majority(
        self,
        m: MailNode,
        purpose: str,
        write: Callable[[MailNode], bool],
        done: Callable[[bool], None],
        disk: bool = True,
    ) -> None:
        """``write`` on a majority of ``m``'s known cluster (:class:`MajorityWrite`),
        ``done(granted)`` once decided or after MARK_TIMEOUT."""
        core = m.core
        assert core is not None
        vote = MajorityWrite(m.node_id, core.members, core.known)
        state = {"done": False}

        def finish(result: bool) -> None:
            if not state["done"]:
                state["done"] = True
                done(result)

        def answer(ok: bool) -> None:
            nxt = vote.answer(ok)
            if nxt is not None:
                ask(nxt)
            if vote.result is not None:
                finish(vote.result)

        def ask(node: str) -> None:
            def work(dst: MailNode, respond: Callable[[Any], None]) -> None:
                if disk:
                    self._disk(dst, lambda: respond(write(dst)))
                else:
                    respond(write(dst))

            # The shell's call times out after RpcClient's 10 s, longer than the vote's
            # MARK_TIMEOUT: a slow member is not replaced by a spare (that would only
            # queue the write on more disks), only a refusal or a failure asks one.
            self._rpc(
                m,
                node,
                purpose,
                work,
                lambda ok: answer(bool(ok)),
                lambda: answer(False),
                self._slow_rpc,
            )

        def hedge() -> None:
            for node in vote.hedge():
                ask(node)

        self._later(m, MARK_TIMEOUT, lambda: finish(False))
        self._later(m, HEDGE_DELAY, hedge)
        for node in vote.first:
            ask(node)

    def _take(
        self,
        m: MailNode,
        user: str,
        count: int,
        done: Callable[[int, str], None],
        unfenced: bool = False,
        again: bool = True,
        numbering: bool = False,
    ) -> None:
        """The core's :meth:`Reconstruction.take`, raising the mark on a majority first
        when needed; ``done(first, fence)`` (first PENDING: none)."""
        core = m.core
        if core is None:
            return
        got = core.take(
            user,
            count,
            lease=self.lease_ok(m),
            unfenced=unfenced,
            again=again,
            numbering=numbering,
            now=self.net.now,
        )
        if isinstance(got, Taken):
            done(got.first, got.fence)
            return
        if not isinstance(got, NeedMark):
            done(PENDING, "")
            return
        need = got
        inc = m.incarnation
        retake = lambda: self._running(  # noqa: E731
            m, inc, lambda: self._take(m, user, count, done, unfenced, False, numbering)
        )
        if not core.mark_write(need):
            m.extending.setdefault(need.bucket, []).append(retake)
            return
        m.extending[need.bucket] = []

        seen = [1]  # the marks the asked nodes had (their answers carry them)

        def write(dst: MailNode) -> bool:
            b = need.bucket
            seen[0] = max(seen[0], dst.marks.get(b, 1))
            if dst.fences.get(b) != need.fence or not self.lease_ok(dst):
                return False
            if self.read_leases and (
                dst.core is None or not dst.core.may_record_mark(b, self.net.now)
            ):
                return False  # a read lease it confirmed for another view may run
            dst.marks[b] = max(dst.marks.get(b, 1), need.target)
            return True

        def granted(ok: bool) -> None:
            if m.core is not core:
                return
            core.mark_done(need, ok, seen[0])
            for fn in [retake, *m.extending.pop(need.bucket, [])]:
                fn()

        self._majority(m, "mark", write, granted)

    def _record_holder(self, m: MailNode, user: str, node: str, then: Callable[[], None]) -> None:
        """A majority records that ``node`` holds ``user``'s mail (once per tenure)."""
        core = m.core
        todo = core.record_holder(user, node, self.lease_ok(m)) if core is not None else None
        if core is None or todo is None:
            then()
            return
        b, fence = todo

        def write(dst: MailNode) -> bool:
            if dst.fences.get(b) != fence or not self.lease_ok(dst):
                return False
            dst.holders.setdefault(b, set()).add((user, node))
            return True

        def recorded(ok: bool) -> None:
            core.holder_recorded(user, node, fence, ok)
            then()

        self._majority(m, "holders", write, recorded)

    def _number(self, m: MailNode, job: Number) -> None:
        """Take UIDs and have ``job.node`` number its oldest unnumbered mail with them."""
        core = m.core
        assert core is not None

        def go(first: int, fence: str) -> None:
            if m.core is not core:
                return
            if first == PENDING:
                core.number_cancelled(job.user, job.node, self.net.now)
                self._arm(m)
                return

            def work(dst: MailNode, respond: Callable[[Any], None]) -> None:
                self._disk(
                    dst, lambda: respond(self._number_here(dst, job.user, fence, first, job.count))
                )

            def done(r: tuple[int, int, int]) -> None:
                if m.core is not core:
                    return
                if core.number_done(job.user, job.node, *r, self.net.now, first=first):
                    self._record_holder(m, job.user, job.node, lambda: None)
                self._arm(m)

            def failed() -> None:
                if m.core is core:
                    core.number_failed(job.user, job.node, self.net.now)
                    self._arm(m)

            self._rpc(m, job.node, "numbering", work, done, failed)

        def recorded() -> None:
            if m.core is not core:
                return
            if not core.holder_ok(job.user, job.node):
                core.number_cancelled(job.user, job.node, self.net.now)
                self._arm(m)
                return
            self._take(m, job.user, job.count, go, numbering=True)

        self._record_holder(m, job.user, job.node, recorded)

    # --- hard state (FragmentStore's rules) ----------------------------------------

    def _store_here(
        self, dst: MailNode, user: str, msg: str, uid: int, fence: str, age: float = 0.0
    ) -> int:
        """Store one message durably at ``dst``; the UID it got (0: unnumbered)."""
        b = self._bucket(user)
        dst.mail.setdefault(b, {}).setdefault(user, set()).add(msg)
        nxt = dst.uidnext.get(user, 1)
        lease = self.lease_ok(dst)
        if uid > 0 and admit_fenced(uid, fence, dst.fences.get(b), lease, nxt, age):
            dst.uids.setdefault(user, {})[msg] = uid
            dst.uidnext[user] = max(nxt, uid + 1)
            return uid
        dst.uids.setdefault(user, {})[msg] = 0
        dst.unnumbered.setdefault(user, []).append(msg)
        return 0

    def _number_here(
        self, dst: MailNode, user: str, fence: str, first: int, count: int
    ) -> tuple[int, int, int]:
        """FragmentStore.number_pending: (numbered, still unnumbered, highest UIDNEXT)."""
        b = self._bucket(user)
        waiting = dst.unnumbered.get(user, [])
        done = 0
        if fence and dst.fences.get(b) == fence and count > 0 and self.lease_ok(dst):
            uid = first
            for msg in list(waiting[:count]):
                if uid < dst.uidnext.get(user, 1):
                    break
                dst.uids[user][msg] = uid
                dst.uidnext[user] = uid + 1
                waiting.remove(msg)
                for t in dst.copies.get((user, msg), ()):
                    if t != dst.node_id:  # its UID version, through the log
                        dst.outbox.append((t, user, msg, uid))
                uid += 1
                done += 1
        if done and dst.outbox:
            self._flush_outbox(dst)
        top = max(dst.uidnext.get(user, 1), dst.shown.get(user, 1))
        return done, len(waiting), top

    def _tell_manager(
        self,
        m: MailNode,
        manager: str,
        user: str,
        node: str,
        kind: str,
        then: Callable[[bool], None],
    ) -> None:
        """A note from ``m`` to ``manager``: ``add`` (``node`` holds ``user``'s mail now;
        the manager has a majority record it before answering; ``then(recorded)``) or
        ``pending`` (``node`` stored mail for ``user`` unnumbered)."""
        if not manager:
            then(False)
            return

        def work(dst: MailNode, respond: Callable[[Any], None]) -> None:
            core = dst.core
            if core is None:
                respond(False)
            elif kind == "add":
                if core.add_fragment(user, node):
                    self.last_soft_update = self.net.now
                    self._record_holder(
                        dst, user, node, lambda: respond(core.holder_ok(user, node))
                    )
                    return
                respond(False)
            else:
                core.note_pending(user, node, self.net.now)
                self._arm(dst)
                respond(True)

        self._rpc(
            m,
            manager,
            "delivery",
            work,
            lambda ok: then(bool(ok)),
            lambda: then(False),
            self._slow_rpc,
        )

    def _remind(self, node_id: str, inc: int) -> None:
        """Every SWEEP_INTERVAL s: tell managers of users with unnumbered mail here."""
        m = self.mail[node_id]
        if not m.up or m.incarnation != inc:
            return
        for user in sorted(u for u, w in m.unnumbered.items() if w):
            manager = m.map.owners[self._bucket(user)]
            self._tell_manager(m, manager, user, node_id, "pending", lambda _: None)
        self._flush_outbox(m)
        self._later(m, SWEEP_INTERVAL, lambda: self._remind(node_id, inc))

    def _fragments_of(self, dst: MailNode, user: str) -> list[str] | None:
        if dst.um is None or not dst.um.manages(user):
            return None
        return sorted(dst.um.fragment_list(user))

    # --- delivery and retrieval --------------------------------------------------

    def replicas_of(self, user: str) -> int:
        """``user``'s R (:attr:`MailConfig.replica_mix`, else ``replicas``)."""
        mix = self.config.replica_mix
        if not mix:
            return self.config.replicas
        return mix[self.users.index(user) % len(mix)] if user in self.users else mix[0]

    def pick_user(self) -> str:
        """A recipient: uniform, or ``hot_share`` of the time one of the first ``hot_users``."""
        c = self.config
        if c.hot_users and self.rng.random() < c.hot_share:
            return self.users[self.rng.randrange(c.hot_users)]
        return self.users[self.rng.randrange(len(self.users))]

    def deliver(self, proxy: str, user: str, done: Callable[[bool], None] | None = None) -> None:
        """An SMTP client hands ``proxy`` a message for ``user``; ``done(acked)`` at the end.

        The proxy asks the manager (of its map) for the plan: fragment list, one UID
        and its fence (:meth:`Reconstruction.take`, PENDING when the manager may not
        number; no answer: PENDING too, the mail is stored unnumbered)."""
        p = self.mail[proxy]
        if not p.up:
            return
        self._next_msg += 1
        d = _Delivery(user, f"m{self._next_msg}", proxy, p.incarnation, done=done)
        self.deliveries += 1
        unfenced = self.replicas_of(user) > 1 and not self.fenced_replicas

        def got(plan: tuple[list[str], int, str, float, set[str]] | None) -> None:
            if plan is not None:
                d.fragments, d.uid, d.fence, d.planned_at = list(plan[0]), *plan[1:4]
                d.unrecorded = set(plan[4]) if self.record_first else set()
            self._store(d)

        def work(dst: MailNode, respond: Callable[[Any], None]) -> None:
            def answer(first: int, fence: str) -> None:
                # the allocation's time at the manager (its age is checked at the store)
                core = dst.core
                unrecorded = core.unrecorded(user) if core is not None else set()
                frags = self._fragments_of(dst, user) or []
                respond((frags, first, fence, self.net.now, unrecorded))

            self._settled(dst, user, lambda: self._take(dst, user, 1, answer, unfenced))

        def session() -> None:
            manager = p.map.owners[self._bucket(user)]
            d.plan_from = manager
            if not manager:
                self._store(d)
                return
            self._rpc(p, manager, "delivery", work, got, lambda: self._store(d), self._slow_rpc)

        self._cpu(p, self.config.cpu.smtp if self.config.cpu else 0.0, session)

    def _give_up(self, d: _Delivery) -> None:
        self.failed_deliveries += 1
        if d.done is not None:
            d.done(False)

    def _store(self, d: _Delivery) -> None:
        p = self.mail[d.proxy]
        if not p.up or p.incarnation != d.incarnation or p.lb is None:
            return
        if d.attempts >= self.config.store_attempts:
            self._give_up(d)
            return
        d.attempts += 1
        targets = p.lb.choose(
            self.live(p.node_id), d.fragments, self.replicas_of(d.user), self.net.now
        )
        if not targets:
            self._give_up(d)
            return
        known = set(d.fragments) - d.unrecorded
        new = [t for t in targets if t not in known and t not in d.recorded]
        if d.uid > 0 and new and d.plan_from:
            # A numbered message goes only where a majority knows mail lies (else a
            # manager after a partition could show higher UIDs without waiting for it):
            # new fragment nodes are recorded first; if that fails, stored unnumbered.
            left = {"n": len(new), "ok": True}

            def recorded(node: str, ok: bool) -> None:
                left["n"] -= 1
                left["ok"] = left["ok"] and ok
                if ok:
                    d.recorded.add(node)
                if left["n"] == 0:
                    if not left["ok"]:
                        d.uid, d.fence = PENDING, ""
                    self._store_round(d, targets)

            for t in new:
                self.recorded_unstored.add((d.user, t))
                self._tell_manager(p, d.plan_from, d.user, t, "add", functools.partial(recorded, t))
            return
        self._store_round(d, targets)

    def _store_round(self, d: _Delivery, targets: list[str]) -> None:
        """One round of stores, to every target; acked when all reply."""
        p = self.mail[d.proxy]
        if not p.up or p.incarnation != d.incarnation:
            return
        replicated = self.replicas_of(d.user) > 1
        if replicated and self.fenced_replicas and len(targets) > 1:
            self._store_replicated(d, targets)
            return
        cpu = self.config.cpu
        cpu_s = (cpu.store + (cpu.log if replicated else 0.0)) if cpu else 0.0
        attempt: dict[str, Any] = {
            "left": len(targets),
            "failed": False,
            "got": {},
            "reached": set(),
        }
        uid = d.uid if d.uid > 0 else PENDING

        def work(dst: MailNode, respond: Callable[[Any], None]) -> None:
            attempt["reached"].add(dst.node_id)  # (also for a call to itself)

            def write() -> None:
                age = self.net.now - d.planned_at
                got = self._store_here(dst, d.user, d.msg_id, uid, d.fence, age)
                dst.stores += 1
                if replicated:  # the replica's update-log entry is durable too
                    self._disk(dst, lambda: respond(got), self.config.log_disk_time)
                else:
                    respond(got)

            self._cpu(dst, cpu_s, lambda: self._disk(dst, write))

        def ok(target: str, got: int) -> None:
            self.recorded_unstored.discard((d.user, target))
            attempt["got"][target] = got
            attempt["left"] -= 1
            if attempt["left"] == 0 and not attempt["failed"]:
                self._noted(d, attempt["got"])

        for target in targets:

            def failed(target: str = target) -> None:
                if attempt["failed"]:
                    return
                attempt["failed"] = True
                d.timeouts += 1
                if target in attempt["reached"]:
                    # DeliveryProxy._store: the request reached the node (a slow disk),
                    # so the store may still happen there: not stored elsewhere too
                    # (that would spread the user's mail for every slow answer), the
                    # delivery fails (a temporary SMTP error; a retry is a new message).
                    self.unsure_stores += 1
                    self._give_up(d)
                    return
                if p.lb is not None:
                    p.lb.failed(target, self.net.now)
                self._store(d)

            self._rpc(
                p,
                target,
                "delivery",
                work,
                functools.partial(ok, target),
                failed,
                on_arrive=functools.partial(attempt["reached"].add, target),
            )

    def _store_replicated(self, d: _Delivery, targets: list[str]) -> None:
        """MailReplication's path under the fence (issue 14 bug 2): the coordinator
        (``targets[0]``, the first replica of the message's log object) stores its
        copy under the store's fence check (numbered, or unnumbered: a stale fence, a
        lapsed lease, an allocation too old), and logs the message with *that*
        outcome; the other replicas store their copy under the same UID, or hold it
        (never listed, never numbered there) until the coordinator's copy is
        numbered and the UID version reaches them.  The answer waits for every copy
        that answers in time; the log brings the others theirs later."""
        p = self.mail[d.proxy]
        if not p.up or p.incarnation != d.incarnation:
            return
        coord, others = targets[0], targets[1:]
        cpu = self.config.cpu
        cpu_s = (cpu.store + cpu.log) if cpu else 0.0
        uid = d.uid if d.uid > 0 else PENDING
        reached: set[str] = set()

        def coordinate(dst: MailNode, respond: Callable[[Any], None]) -> None:
            reached.add(dst.node_id)

            def write() -> None:
                age = self.net.now - d.planned_at
                got = self._store_here(dst, d.user, d.msg_id, uid, d.fence, age)
                dst.copies[(d.user, d.msg_id)] = tuple(targets)
                dst.stores += 1
                self._disk(dst, lambda: push(dst, got, respond), self.config.log_disk_time)

            self._cpu(dst, cpu_s, lambda: self._disk(dst, write))

        def push(c: MailNode, got: int, respond: Callable[[Any], None]) -> None:
            results = {c.node_id: got}
            left = {"n": len(others)}

            def one(target: str, result: int | None) -> None:
                if result is None:  # the log pushes it again later
                    c.outbox.append((target, d.user, d.msg_id, got))
                else:
                    results[target] = result
                left["n"] -= 1
                if left["n"] == 0:
                    respond(results)

            for t in others:

                def work(dst: MailNode, respond_copy: Callable[[Any], None]) -> None:
                    def write() -> None:
                        r = self._copy_here(dst, d.user, d.msg_id, got)
                        dst.stores += 1  # the replica's log entry is durable too
                        self._disk(dst, lambda: respond_copy(r), self.config.log_disk_time)

                    self._cpu(dst, cpu_s, lambda: self._disk(dst, write))

                self._rpc(
                    c,
                    t,
                    "delivery",
                    work,
                    functools.partial(one, t),
                    functools.partial(one, t, None),
                )

        def ok(results: dict[str, int]) -> None:
            self.recorded_unstored.discard((d.user, coord))
            for t in results:
                self.recorded_unstored.discard((d.user, t))
            self._noted(d, results, numbering=coord)

        def failed() -> None:
            d.timeouts += 1
            if coord in reached:
                self.unsure_stores += 1  # MailReplication._via: never a second coordinator
                self._give_up(d)
                return
            if p.lb is not None:
                p.lb.failed(coord, self.net.now)
            self._store(d)

        self._rpc(
            p,
            coord,
            "delivery",
            coordinate,
            ok,
            failed,
            self._slow_rpc,
            on_arrive=functools.partial(reached.add, coord),
        )

    def _copy_here(self, dst: MailNode, user: str, msg: str, uid: int) -> int:
        """A replica applies the logged copy of ``msg``: under ``uid`` (the UID its
        coordinator's copy got), or held (``uid`` 0) until that copy is numbered."""
        b = self._bucket(user)
        dst.mail.setdefault(b, {}).setdefault(user, set()).add(msg)
        ids = dst.uids.setdefault(user, {})
        if ids.get(msg, 0) > 0:
            return ids[msg]
        held = dst.held.setdefault(user, set())
        if uid > 0:
            if any(u == uid for m, u in ids.items() if m != msg):
                self.copy_collisions += 1
                ids[msg] = 0
                held.add(msg)
                return 0
            ids[msg] = uid
            dst.uidnext[user] = max(dst.uidnext.get(user, 1), uid + 1)
            held.discard(msg)
            waiting = dst.unnumbered.get(user, [])
            if msg in waiting:
                waiting.remove(msg)
            return uid
        if msg not in ids and msg not in dst.unnumbered.get(user, []):
            ids[msg] = 0
            held.add(msg)
        return 0

    def _flush_outbox(self, m: MailNode) -> None:
        """Push the UID versions and copies ``m``'s log still owes (retried each sweep)."""
        for entry in list(m.outbox):
            key = (m.node_id, *entry)
            if key in self._pushing:
                continue
            self._pushing.add(key)
            target = entry[0]

            def work(dst: MailNode, respond: Callable[[Any], None], e: Any = entry) -> None:
                self._disk(dst, lambda: respond(self._copy_here(dst, e[1], e[2], e[3])))

            def done(_: Any, e: Any = entry, k: Any = key) -> None:
                self._pushing.discard(k)
                if e in m.outbox:
                    m.outbox.remove(e)

            self._rpc(
                m, target, "delivery", work, done, functools.partial(self._pushing.discard, key)
            )

    def _noted(self, d: _Delivery, got: dict[str, int], numbering: str = "") -> None:
        """DeliveryProxy's ``noted``: new fragment nodes to the plan's manager, copies
        stored unnumbered to the manager of the proxy's current map (a replicated
        message: only the copy of ``numbering``, the others are held); then the 250."""
        p = self.mail[d.proxy]
        notes: list[tuple[str, str, str]] = []
        for node in sorted(got):
            if node not in d.fragments and node not in d.recorded:
                notes.append((d.plan_from, node, "add"))
        current = p.map.owners[self._bucket(d.user)]
        for node in sorted(n for n, uid in got.items() if uid == 0):
            if not numbering or node == numbering:
                notes.append((current, node, "pending"))
        left = {"n": len(notes)}

        def ack() -> None:
            self.acked[(d.user, d.msg_id)] = d.timeouts
            if d.done is not None:
                d.done(True)

        def one(_: bool) -> None:
            left["n"] -= 1
            if left["n"] == 0:
                ack()

        if not notes:
            ack()
        for manager, node, kind in notes:
            self._tell_manager(p, manager, d.user, node, kind, one)

    def retrieve(
        self, proxy: str, user: str, done: Callable[[list[str] | None], None] | None = None
    ) -> None:
        """A POP/IMAP client at ``proxy`` selects ``user``'s INBOX and lists it.

        As RetrievalProxy does: the manager's fragment list (after settling), its away
        holders and whether it is certain; then every fragment node's messages and
        UIDNEXT.  Refused (``done(None)``) when the manager is not certain, a holder
        is away or does not answer, or the merged UIDNEXT is below what ``proxy``
        showed before: mail out of reach.  What a client is shown goes through
        :attr:`checker`.  ``done`` gets the message ids listed."""
        p = self.mail[proxy]
        if not p.up:
            return
        self.retrievals += 1
        inc = p.incarnation
        manager = p.map.owners[self._bucket(user)]
        b = self._bucket(user)

        def refused(why: str = "no manager answer") -> None:
            self.checker.refusals += 1
            self.checker.refused_why[why] += 1
            self.checker.last_refusal = (proxy, user, why)
            if done is not None:
                done(None)

        if not manager:
            refused()
            return

        def gather(answer: tuple[list[str], list[str], bool, Horizon, float] | None) -> None:
            if answer is None:
                refused()
                return
            frags, away, certain, horizon, answered_at = answer
            if not certain or away:
                refused("not certain" if not certain else f"away {away}")
                return
            got: dict[str, tuple[list[tuple[str, int]], int]] = {}
            left = {"n": len(frags), "failed": False}

            def finish() -> None:
                if left["failed"]:
                    refused("a holder did not answer")
                    return
                merged = max([1, *(n for _, n in got.values())])
                listing = [(msg, uid) for pairs, _ in got.values() for msg, uid in pairs]
                if self.visibility and self.net.now - answered_at > HORIZON_AGE:
                    refused("the manager's answer is too old")
                    return
                if self.visibility:
                    # The visibility horizon: nothing at or above an outstanding UID
                    # not found (it may still land), nor above the manager's counter.
                    bound = horizon.bound(uid for _, uid in listing)
                    listing = [(msg, uid) for msg, uid in listing if uid < bound]
                    merged = min(merged, bound)
                if merged < p.shown.get(user, 1):
                    refused(f"UIDNEXT {merged} below shown {p.shown.get(user, 1)}: {frags}")
                    return
                if p.up and p.incarnation == inc:
                    p.shown[user] = merged  # the node's ``shown`` table (durable)
                self.checker.read(proxy, user, listing, merged)
                if done is not None:
                    done(sorted({msg for msg, _ in listing}))

            def one(node: str, result: Any) -> None:
                if result is None:
                    left["failed"] = True
                else:
                    got[node] = result
                left["n"] -= 1
                if left["n"] == 0:
                    finish()

            if not frags:
                finish()
            for f in frags:

                def work(dst: MailNode, respond: Callable[[Any], None]) -> None:
                    def read() -> None:
                        ids = dst.uids.get(user, {})
                        held = dst.mail.get(b, {}).get(user, set())
                        pairs = sorted((m, u) for m, u in ids.items() if u > 0 and m in held)
                        respond((pairs, dst.uidnext.get(user, 1)))

                    self._disk(dst, read)

                self._rpc(
                    p,
                    f,
                    "retrieval",
                    work,
                    functools.partial(one, f),
                    functools.partial(one, f, None),
                )

        def ask(dst: MailNode, respond: Callable[[Any], None]) -> None:
            def answer() -> None:
                core = dst.core
                if core is None or not core.state.manages(user):
                    respond(None)
                    return
                respond(
                    (
                        sorted(core.state.fragment_list(user)),
                        sorted(core.state.away_list(user)),
                        core.certain(user, self.net.now if self.read_leases else None),
                        core.horizon(user, self.net.now),
                        self.net.now,
                    )
                )

            self._settled(dst, user, answer)

        self._rpc(p, manager, "retrieval", ask, gather, refused)

    def _exchange(self, node_id: str, inc: int) -> None:
        m = self.mail[node_id]
        if not m.up or m.incarnation != inc:
            return
        others = [n for n in self.live(node_id) if n != node_id]
        if others and m.lb is not None:
            peer = self.rng.choice(others)
            my_load = m.load
            m.lb.observe(node_id, my_load, self.net.now)

            def work(dst: MailNode, respond: Callable[[Any], None]) -> None:
                if dst.lb is not None:
                    dst.lb.observe(node_id, my_load, self.net.now)
                respond(None)

            self._rpc(m, peer, "load", work, lambda _: None, lambda: None)
        jitter = self.config.exchange_interval * self.rng.uniform(0.8, 1.2)
        self.net.at(self.net.now + jitter, lambda: self._exchange(node_id, inc))

    # --- driving ----------------------------------------------------------------

    def start_exchange(self) -> None:
        """Start the periodic load swap and the unnumbered-mail reminders on every
        running node (call again after boots)."""
        for n in self.up_nodes():
            m = self.mail[n]
            if m.exchanging != m.incarnation:
                m.exchanging = m.incarnation
                self._exchange(n, m.incarnation)
                self._later(m, SWEEP_INTERVAL, functools.partial(self._remind, n, m.incarnation))
                if self.read_leases:
                    self._renew_read_lease(n, m.incarnation)

    def _renew_read_lease(self, node_id: str, inc: int) -> None:
        """Every READ_RENEW s: a majority confirms our view (the read lease)."""
        m = self.mail[node_id]
        if not m.up or m.incarnation != inc:
            return
        core = m.core
        if core is not None and not core.alone():
            view, asked = core.view_id(), self.net.now

            def grant(dst: MailNode) -> bool:
                return dst.core is not None and dst.core.grant_read(view, self.net.now)

            def done(ok: bool) -> None:
                if ok and m.core is core:
                    core.read_granted(view, asked)

            self._majority(m, "lease", grant, done, disk=False)
        self._later(m, READ_RENEW, lambda: self._renew_read_lease(node_id, inc))

    def converge(self, limit: float = 60.0) -> float:
        """Run until membership has converged; the time it took."""
        t = self.net.run_until_converged(limit)
        if t is None:
            raise RuntimeError(f"seed {self.seed}: membership did not converge in {limit}s")
        return t

    def run(self, duration: float, deliveries_per_s: float, retrievals_per_s: float = 0.0) -> None:
        """Poisson deliveries and retrievals at random running nodes for ``duration`` seconds."""
        end = self.net.now + duration
        t = self.net.now
        events: list[tuple[float, str]] = []
        for rate, kind in ((deliveries_per_s, "d"), (retrievals_per_s, "r")):
            t = self.net.now
            while rate > 0:
                t += self.rng.expovariate(rate)
                if t >= end:
                    break
                events.append((t, kind))
        for when, kind in sorted(events):
            self.net.at(when, lambda kind=kind: self._arrival(kind))  # type: ignore[misc]
        self.start_exchange()
        self.net.run_until(end)

    def closed_loop(self, clients: int, duration: float, warmup: float = 0.0) -> float:
        """Saturation: ``clients`` SMTP clients spread round robin over the running nodes,
        each sending its next message as soon as the last is answered; deliveries/s
        acknowledged in the ``duration`` seconds after ``warmup``."""
        up = sorted(self.up_nodes(), key=lambda x: int(x[1:]))
        t0 = self.net.now + warmup
        t1 = t0 + duration
        count = [0]

        def send(proxy: str) -> None:
            if self.net.now >= t1:
                return

            def done(acked: bool) -> None:
                if acked and t0 <= self.net.now < t1:
                    count[0] += 1
                self.net.at(self.net.now, lambda: send(proxy))  # not recursively

            self.deliver(proxy, self.pick_user(), done)

        for i in range(clients):
            send(up[i % len(up)])
        self.start_exchange()
        self.net.run_until(t1)
        return count[0] / duration

    def _arrival(self, kind: str) -> None:
        up = self.up_nodes()
        if not up:
            return
        proxy = self.rng.choice(up)
        user = self.pick_user()
        if kind == "d":
            self.deliver(proxy, user)
        else:
            self.retrieve(proxy, user)

    def chaos(
        self,
        duration: float,
        deliveries_per_s: float,
        *,
        max_add: int = 2,
        kinds: Sequence[str] = ("crash", "crash", "restart", "add", "partition", "heal"),
        max_pause: float = 4.0,
    ) -> list[str]:
        """Mail traffic (deliveries, and checked reads at a quarter of that rate) while
        faults of ``kinds`` come and go: ``crash`` (soft state and queued work lost,
        disk kept), ``restart``, ``add`` (a new node), ``partition`` (clean, two
        sides), ``bridge`` (non-transitive: one node sees both sides, the sides not
        each other), ``pause`` (SIGSTOP 0.5-``max_pause`` s, then on with its old
        state) and ``heal`` (partitions and cut links)."""
        log: list[str] = []
        end = self.net.now + duration
        added = 0
        while self.net.now < end:
            step = min(self.rng.uniform(1.0, 4.0), end - self.net.now)
            self.run(step, deliveries_per_s, deliveries_per_s / 4)
            action = self.rng.choice(list(kinds))
            up = sorted(self.up_nodes(), key=lambda x: int(x[1:]))
            down = sorted(set(self.mail) - set(up))
            if action == "crash" and len(up) > 2:
                victim = self.rng.choice(up)
                self.crash(victim)
                log.append(f"{self.net.now:.2f} crash {victim}")
            elif action == "restart" and down:
                back = self.rng.choice(down)
                self.restart(back)
                log.append(f"{self.net.now:.2f} restart {back}")
            elif action == "add" and added < max_add:
                added += 1
                log.append(f"{self.net.now:.2f} add {self.add_node()}")
            elif action == "partition":
                ids = sorted(self.mail)
                self.rng.shuffle(ids)
                cut = self.rng.randint(1, len(ids) - 1)
                self.net.heal()
                self.net.partition(ids[:cut], ids[cut:])
                log.append(f"{self.net.now:.2f} partition {sorted(ids[:cut])}")
            elif action == "bridge" and len(self.mail) >= 3:
                ids = sorted(self.mail)
                self.rng.shuffle(ids)
                bridge, rest = ids[0], ids[1:]
                cut = self.rng.randint(1, len(rest) - 1)
                self.net.heal()
                for a in rest[:cut]:
                    for b in rest[cut:]:
                        self.net.cut(a, b)
                log.append(f"{self.net.now:.2f} bridge {bridge} {sorted(rest[:cut])}")
            elif action == "pause" and up:
                victim = self.rng.choice(up)
                length = self.rng.uniform(0.5, max_pause)
                self.pause(victim, length)
                log.append(f"{self.net.now:.2f} pause {victim} {length:.2f}s")
            elif action == "heal":
                self.net.heal()
                log.append(f"{self.net.now:.2f} heal")
            else:
                continue
            self.faults_done[action] += 1
        return log

    def heal_all(self, settle: float = 6.0) -> None:
        """Heal partitions, restart crashed nodes, converge, let reconstruction finish."""
        self.net.heal()
        for n in sorted(set(self.mail) - set(self.up_nodes())):
            self.restart(n)
        self.net.run_until(max(self.net.now, *(m.paused_until for m in self.mail.values())))
        self.converge()
        self.start_exchange()
        self.net.run_until(self.net.now + settle)
        self.converge()

    def final_problems(self, settle: float = 8.0) -> list[str]:
        """After :meth:`heal_all`: wait ``settle`` s (numbering of what waited), then
        read every user with acknowledged mail at every node: every acknowledged
        message listed (more than once only if its store was retried), no read
        refused; plus every violation :attr:`checker` saw on the way."""
        self.net.run_until(self.net.now + settle)
        want: dict[str, dict[str, int]] = {}
        for (u, msg), timeouts in self.acked.items():
            want.setdefault(u, {})[msg] = timeouts
        results: dict[tuple[str, str], list[str] | None] = {}
        for u in sorted(want):
            for node in sorted(self.up_nodes()):
                # one client at a time (a burst of reads would time out on the disks)
                self.retrieve(node, u, functools.partial(results.__setitem__, (node, u)))
                self.net.run_until(self.net.now + 1.0, lambda k=(node, u): k in results)  # type: ignore[misc]
        out = list(self.checker.violations)
        for u in sorted(want):
            for node in sorted(self.up_nodes()):
                if (node, u) not in results:
                    out.append(f"{u} at {node}: no answer after the heal")
                    continue
                got = results[(node, u)]
                if got is None:
                    out.append(f"{u} at {node}: refused after the heal")
                    continue
                for msg in sorted(set(want[u]) - set(got)):
                    out.append(f"{u} at {node}: {msg} acknowledged, hidden after the heal")
        return out

    # --- invariants -------------------------------------------------------------

    def manager_problems(self) -> list[str]:
        """Every bucket has exactly one manager per connected component (converged views)."""
        out: list[str] = []
        for comp in self.net.components():
            maps = {self.mail[n].map for n in comp}
            if len(maps) != 1:
                out.append(f"component {sorted(comp)[:3]}...: {len(maps)} different maps")
                continue
            (bmap,) = maps
            for b in range(len(bmap)):
                claim = [n for n in comp if (um := self.mail[n].um) and um.map.owners[b] == n]
                if len(claim) != 1 or bmap.owners[b] not in comp:
                    out.append(f"bucket {b}: managers {claim}, map says {bmap.owners[b]!r}")
        return out

    def fragment_problems(self) -> list[str]:
        """Within each component, managers' fragment lists equal the members' hard state
        (a node recorded as a holder before a store to it that got no answer may be
        listed without mail: the proxy records new holders before storing there)."""
        out: list[str] = []
        for comp in self.net.components():
            holders: dict[str, set[str]] = {}
            for n in comp:
                for users in self.mail[n].mail.values():
                    for u, ids in users.items():
                        if ids:
                            holders.setdefault(u, set()).add(n)
            lists: dict[str, set[str]] = {}
            for n in comp:
                um = self.mail[n].um
                assert um is not None
                for u, frags in um.fragments.items():
                    if um.manages(u):
                        lists[u] = set(frags)
            for u in sorted(set(holders) | set(lists)):
                hard, listed = holders.get(u, set()), lists.get(u, set())
                if hard <= listed and all((u, n) in self.recorded_unstored for n in listed - hard):
                    continue  # recorded before a store whose reply never came: harmless
                if hard != listed:
                    out.append(
                        f"{u}: list {sorted(lists.get(u, ()))} hard {sorted(holders.get(u, ()))}"
                    )
        return out

    def mailbox(self, user: str) -> Counter[str]:
        """Message ids of ``user`` gathered via its manager's fragment list (copies counted)."""
        b = self._bucket(user)
        up = self.up_nodes()
        manager = self.mail[up[0]].map.owners[b]
        um = self.mail[manager].um
        assert um is not None
        got: Counter[str] = Counter()
        for f in um.fragment_list(user):
            got.update(self.mail[f].mail.get(b, {}).get(user, ()))
        return got

    def mailbox_problems(self) -> list[str]:
        """Every acknowledged message is in its user's mailbox, exactly once unless retried."""
        out: list[str] = []
        boxes = {u: self.mailbox(u) for u in {u for u, _ in self.acked}}
        for (u, msg), timeouts in sorted(self.acked.items()):
            n = boxes[u][msg]
            if n == 0:
                out.append(f"{u} {msg}: acknowledged but not listed")
            elif n > self.replicas_of(u) and timeouts == 0:
                out.append(f"{u} {msg}: {n} copies without a retried store")
        return out

    def duplicates(self) -> int:
        """Acknowledged messages stored more than once (a store's reply was lost)."""
        boxes = {u: self.mailbox(u) for u in {u for u, _ in self.acked}}
        return sum(1 for (u, msg) in self.acked if boxes[u][msg] > self.replicas_of(u))

    def spread(self) -> dict[str, int]:
        """For each user, how many nodes hold its mail."""
        out: Counter[str] = Counter()
        for m in self.mail.values():
            for users in m.mail.values():
                for u, ids in users.items():
                    if ids:
                        out[u] += 1
        return dict(out)


# --- the UID sweep (issue 14 item 1 under every fault) -------------------------------

#: The fault mix of :func:`uid_seed` (pauses and heals twice as likely).
UID_FAULTS = ("crash", "restart", "partition", "bridge", "pause", "pause", "heal", "heal")

#: Violation classes, by the words of :class:`UidChecker` and :meth:`MailSim.final_problems`.
VIOLATION_KINDS = {
    "two messages under UID": "two messages under one UID",
    "listed under two UIDs": "one message under two UIDs",
    "reused": "UID reused",
    "now missing or changed": "UID changed or message hidden",
    "newly visible": "newly visible below a UID shown",
    "UIDNEXT went down": "UIDNEXT decreased",
    "outside 1..UIDNEXT": "UID at or above UIDNEXT",
    "hidden after the heal": "acknowledged message hidden after the heal",
    "refused after the heal": "read refused after the heal",
    "no answer after the heal": "read refused after the heal",
}


def violation_kind(problem: str) -> str:
    """The class of one problem line (see :data:`VIOLATION_KINDS`)."""
    for words, kind in VIOLATION_KINDS.items():
        if words in problem:
            return kind
    return "other"


def uid_seed(
    seed: int,
    *,
    nodes: int = 5,
    duration: float = 30.0,
    rate: float = 20.0,
    kinds: Sequence[str] = UID_FAULTS,
    replica_mix: tuple[int, ...] = (),
    fenced_replicas: bool = True,
) -> tuple[MailSim, list[str], list[str]]:
    """One seed: ``nodes`` nodes, 4 users each (``replica_mix``: their R in turn),
    ``rate`` deliveries/s (and a quarter of that in checked reads) for ``duration`` s
    of faults of ``kinds``; then heal, restart, wait, read everything everywhere.
    (sim, fault log, problems)."""
    sim = MailSim(nodes, seed, MailConfig(users_per_node=4, replica_mix=replica_mix))
    sim.fenced_replicas = fenced_replicas
    sim.converge()
    log = sim.chaos(duration, rate, max_add=0, kinds=kinds)
    sim.heal_all()
    return sim, log, sim.final_problems()


# --- measurements ----------------------------------------------------------------


#: :func:`measure`'s warm-up at a fifth of the rate, before the steady traffic.
WARMUP_S = 8.0


def measure(n: int, seed: int) -> dict[str, float]:
    """One run: boot, steady mail traffic, then one node crashes; per-node costs."""
    sim = MailSim(n, seed)
    sim.converge()
    sim.net.run_until(sim.net.now + 2.0)
    rate = 20.0 * n  # 20 deliveries/s per node, 5 retrievals/s per node
    # Warm-up at a fifth of the rate: the first message of a user on a node has a
    # majority record it (once per manager tenure, a disk write on n/2+1 nodes); at
    # the full rate from a cold start, 30 nodes would be asked ~1200 such records
    # (~19000 disk writes) in 2 s, more than their disks do, and the overload feeds
    # itself (timed-out stores, widening for imbalance, new holders to record).
    sim.run(WARMUP_S, rate / 5, rate / 20)
    sim.run(10.0, rate, rate / 4)
    sim.net.run_until(sim.net.now + 1.0)
    d_msgs, r_msgs = sim.msgs["delivery"], sim.msgs["retrieval"]
    d_n, r_n = sim.deliveries, sim.retrievals
    load_msgs = sim.msgs["load"]
    elapsed = sim.net.now
    # One failure, no traffic: detection, new map, hints.
    victim = random.Random(seed).choice(sorted(sim.mail))
    bytes0, reads0 = Counter(sim.hint_bytes), Counter(sim.dir_reads)
    calls0 = {k: Counter(v) for k, v in sim.calls_by.items()}
    t0 = sim.net.now
    sim.crash(victim)
    survivors = sim.up_nodes()
    epoch0 = sim.net.nodes[survivors[0]].view.epoch
    sim.converge()
    view_at = max(t for s in survivors for t, v in sim.net.nodes[s].views if v.epoch > epoch0)
    sim.net.run_until(sim.net.now + 3.0)
    problems = sim.fragment_problems() + sim.manager_problems()
    if problems:
        raise RuntimeError(f"n={n} seed={seed}: {problems[:3]}")
    hint_calls = [
        sim.calls_by.get(s, Counter())["reconfig"] - calls0.get(s, Counter())["reconfig"]
        for s in survivors
    ]
    hint_bytes = [sim.hint_bytes[s] - bytes0[s] for s in survivors]
    rebuild_ms = max(0.0, sim.last_soft_update - view_at) * 1000
    dir_reads = statistics.mean(sim.dir_reads[s] - reads0[s] for s in survivors)
    # The node comes back (it was away: it sends hints for everything it holds).
    calls1 = {k: Counter(v) for k, v in sim.calls_by.items()}
    sim.restart(victim)
    sim.converge()
    sim.net.run_until(sim.net.now + 3.0)
    problems = sim.fragment_problems() + sim.manager_problems() + sim.mailbox_problems()
    if problems:
        raise RuntimeError(f"n={n} seed={seed} after return: {problems[:3]}")

    def calls_since(node: str) -> int:
        before = calls1.get(node, Counter())["reconfig"]
        return sim.calls_by.get(node, Counter())["reconfig"] - before

    return {
        "return_calls_back": calls_since(victim),
        "return_calls_others": statistics.mean(calls_since(s) for s in survivors),
        "per_delivery": d_msgs / max(1, d_n),
        "per_retrieval": r_msgs / max(1, r_n),
        "load_msgs_per_node_s": load_msgs / n / elapsed,
        "detect": view_at - t0,
        "rebuild_ms": rebuild_ms,
        "hint_bytes_per_node": statistics.mean(hint_bytes),
        "hint_bytes_max": max(hint_bytes),
        "hint_calls_per_node": statistics.mean(hint_calls),
        "hint_calls_max": max(hint_calls),
        "dir_reads_per_node": dir_reads,
        "users": len(sim.users),
        "messages": len(sim.acked),
    }


def uid_sweep(
    seeds: Iterable[int],
    out: Callable[[str], None] = print,
    replica_mix: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Run :func:`uid_seed` over ``seeds``; print and return the figures."""
    started = time.perf_counter()
    bad: dict[int, list[str]] = {}
    kinds: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    acked = reads = refusals = n = 0
    for seed in seeds:
        sim, _, problems = uid_seed(seed, replica_mix=replica_mix)
        n += 1
        acked += len(sim.acked)
        reads += sim.checker.reads
        refusals += sim.checker.refusals
        faults.update(sim.faults_done)
        if problems:
            bad[seed] = problems
            kinds.update({violation_kind(p) for p in problems})
    minutes = (time.perf_counter() - started) / 60
    figures = {
        "seeds": n,
        "seeds_per_minute": n / minutes if minutes else 0.0,
        "acknowledged": acked,
        "reads": reads,
        "refused": refusals,
        "faults": dict(faults),
        "seeds_with_violations": sorted(bad),
        "violations_by_kind": dict(kinds),
    }
    out(json.dumps(figures, indent=1, sort_keys=True))
    for seed, problems in sorted(bad.items())[:20]:
        out(f"seed {seed}: {problems[0]}")
    return figures


def main(argv: Sequence[str] | None = None) -> None:
    """Print the per-delivery, per-retrieval and reconfiguration figures per cluster size."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[3, 10, 30])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument(
        "--uid-seeds",
        type=int,
        default=0,
        metavar="N",
        help="instead: run uid_seed for seeds 0..N-1, print seeds/minute and violations",
    )
    p.add_argument(
        "--replica-mix",
        type=int,
        nargs="+",
        default=[],
        metavar="R",
        help="with --uid-seeds: users' replicas in turn (e.g. 1 2 3; default all 1)",
    )
    args = p.parse_args(argv)
    if any(r < 1 for r in args.replica_mix):
        p.error("--replica-mix: replicas are at least 1")
    if args.uid_seeds:
        uid_sweep(range(args.uid_seeds), replica_mix=tuple(args.replica_mix))
        return
    cfg = MailConfig()
    print(
        f"{cfg.users_per_node} users and 20 deliveries/s + 5 retrievals/s per node for 10 s,"
        f" spread limit {cfg.spread_limit}, {cfg.n_buckets} buckets; then one node crashes."
        f" Medians over {args.seeds} seeds."
    )
    print(
        "nodes  msgs/delivery  msgs/retrieval  crash->view_s  view->rebuilt_ms"
        "  hint_calls/node(max)  hint_bytes/node(max)  dir_reads/node  load_msgs/node/s"
        "  return:calls(returner,others)"
    )
    for n in args.nodes:
        runs = [measure(n, s) for s in range(args.seeds)]

        def med(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(r[key] for r in runs)

        print(
            f"{n:5d}  {med('per_delivery'):13.2f}  {med('per_retrieval'):14.2f}"
            f"  {med('detect'):13.2f}  {med('rebuild_ms'):16.1f}"
            f"  {med('hint_calls_per_node'):12.1f} ({med('hint_calls_max'):3.0f})"
            f"  {med('hint_bytes_per_node'):12.0f} ({med('hint_bytes_max'):5.0f})"
            f"  {med('dir_reads_per_node'):14.1f}  {med('load_msgs_per_node_s'):16.2f}"
            f"  {med('return_calls_back'):9.0f} {med('return_calls_others'):5.1f}"
        )


if __name__ == "__main__":
    main()
