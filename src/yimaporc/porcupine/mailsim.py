"""A deterministic simulator of a Porcupine cluster: ``python -m yimaporc.porcupine.mailsim``.

Many mail nodes run in one process on the virtual clock of
:class:`yimaporc.sim.network.SimNetwork`, so membership is the real TRM core
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
import json
import random
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from ..cluster import wire
from ..cluster.buckets import BucketMap
from ..cluster.membership import TrmConfig, View
from ..sim.network import Faults, SimNetwork, SimNode
from .balancer import LoadBalancer, load_figure
from .softstate import Hint, UserManagerState, bucket_of, hints_for

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
    """One node's mail service: hard state (survives crashes) and soft state (does not)."""

    node_id: str
    n_buckets: int
    mail: dict[int, dict[str, set[str]]] = attrs.field(factory=dict)  # bucket -> user -> ids
    map: BucketMap = attrs.field(default=BucketMap.empty(N_BUCKETS))  # cached on disk
    um: UserManagerState | None = None
    lb: LoadBalancer | None = None
    early: list[tuple[str, int, int, int, Any]] = attrs.field(factory=list)  # notes ahead
    view_epoch: int = 0
    members: frozenset[str] = frozenset()
    incarnation: int = 0
    up: bool = False
    disk_free: float = 0.0
    cpu_free: float = 0.0
    disk_busy: float = 0.0  # seconds of disk work queued so far
    cpu_busy: float = 0.0  # seconds of CPU work queued so far
    pending: int = 0
    stores: int = 0
    exchanging: int = -1  # incarnation whose load exchange loop runs

    def users_with_mail(self, bucket: int) -> list[str]:
        """One directory read: users of ``bucket`` this node holds mail for."""
        return [u for u, ids in self.mail.get(bucket, {}).items() if ids]

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
        """Boot (or reboot) a node from its disk; its commits carry the user map."""
        self.owner._booting(node_id)
        super().start(node_id)
        core = self.nodes[node_id].core
        assert core is not None
        mail = self.owner.mail[node_id]

        def attach(old: View, members: tuple[wire.Member, ...], epoch: int) -> bytes:
            new_map = mail.map.reassign([m.node_id for m in members], epoch)
            return pack_commit(old, new_map)

        core.attachment_for = attach


def pack_commit(old: View, new_map: BucketMap) -> bytes:
    """The commit attachment: the coordinator's previous view (epoch, coordinator), then
    the map (as :class:`~yimaporc.cluster.bucketservice.BucketMapService` ships it).

    A member whose own previous view differs was *away* (another partition, a
    reboot, a commit the coordinator did not see): what it and the coordinator's
    group know about each other's mail may differ, see :meth:`MailSim._on_view`.
    """
    head = f"{old.epoch} {old.coordinator}\n".encode()
    return head + new_map.serialize()


def unpack_commit(data: bytes) -> tuple[tuple[int, str], BucketMap]:
    """Inverse of :func:`pack_commit`."""
    head, _, rest = data.partition(b"\n")
    epoch, _, coordinator = head.decode().partition(" ")
    return (int(epoch), coordinator), BucketMap.parse(rest)


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
        self.last_soft_update = 0.0
        self._next_msg = 0
        self._parsed: dict[bytes, tuple[tuple[int, str], BucketMap]] = {}
        self.away_installs = 0
        self._n_started = 0
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
        m.um = UserManagerState(node_id, self.config.n_buckets)
        m.lb = LoadBalancer(node_id, spread_limit=self.config.spread_limit)
        m.early = []
        m.pending = 0
        m.disk_free = self.net.now
        m.cpu_free = self.net.now

    def crash(self, node_id: str) -> None:
        """Stop a node: soft state and queued disk work are lost, hard state stays."""
        self.net.crash(node_id)
        m = self.mail[node_id]
        m.incarnation += 1
        m.up = False
        m.um = None
        m.lb = None
        m.early = []
        m.pending = 0

    def restart(self, node_id: str) -> None:
        """Boot a crashed node from its disk."""
        self.net.start(node_id)

    def live(self, node_id: str) -> tuple[str, ...]:
        """The members of ``node_id``'s current view."""
        return self.net.nodes[node_id].view.node_ids

    def up_nodes(self) -> list[str]:
        """Nodes that run."""
        return [n for n, m in self.mail.items() if m.up]

    # --- plumbing ---------------------------------------------------------------

    def _count(self, src: str, purpose: str) -> None:
        self.msgs[purpose] += 1
        self.sent_by.setdefault(src, Counter())[purpose] += 1

    def _rpc(
        self,
        src: MailNode,
        dst_id: str,
        purpose: str,
        work: Callable[[MailNode, Callable[[Any], None]], None],
        on_reply: Callable[[Any], None],
        on_fail: Callable[[], None],
    ) -> None:
        """Call ``work`` at ``dst_id``; it answers through its callback; replies carry load."""
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

        def timeout() -> None:
            if not state["done"] and src.up and src.incarnation == inc:
                state["done"] = True
                on_fail()

        self.net.at(self.net.now + self.config.rpc_timeout, timeout)
        self._count(src.node_id, purpose)
        self.calls_by.setdefault(src.node_id, Counter())[purpose] += 1

        def arrive() -> None:
            if dst is None or not dst.up or not self.net.connected(src.node_id, dst_id):
                return
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

                self.net.at(self.net.now + self._latency(), back)

            self._cpu(dst, self._rpc_cpu, lambda: work(dst, respond))

        self.net.at(self.net.now + self._latency(), arrive)

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

    def _note(self, m: MailNode, kind: str, bucket: int, epoch: int, view: int, item: Any) -> None:
        """A hint or fragment note reached manager ``m``: its sender held view ``view``, in
        whose map ``m`` manages ``bucket`` since ``epoch``.

        Bucket epochs are not ordered across partitions (a merged map may keep an
        older lineage's entries), view epochs are: a note from a newer view waits
        for that view here; otherwise it counts only if our map has the same entry
        and the sender is a member.  What is dropped is resent by its sender, for
        whom the bucket will be fresh.
        """
        if m.um is None:
            return
        if view > m.view_epoch:
            m.early.append((kind, bucket, epoch, view, item))
            return
        if (m.um.map.owners[bucket], m.um.map.epochs[bucket]) != (m.node_id, epoch):
            return
        sender = item.sender if kind == "hint" else item[1]
        if sender not in m.members:
            return
        if kind == "hint":
            m.um.apply_hint(item)
        else:
            m.um.add_fragment(item[0], sender)
        self.last_soft_update = self.net.now

    def _on_view(self, node: SimNode, old: View, new: View) -> None:
        """Install the committed map; send hints; an away manager pulls what it may lack."""
        m = self.mail[node.node_id]
        if new.attachment:
            # Every member parses the same commit: do it once (construct is slow).
            cached = self._parsed.get(new.attachment)
            if cached is None:
                cached = unpack_commit(new.attachment)
                self._parsed = {new.attachment: cached}
            coordinator_was, new_map = cached
            away = coordinator_was != (old.epoch, old.coordinator)
        else:
            new_map = m.map.reassign(new.node_ids, new.epoch)  # booted: a group of one
            away = True
        previous, m.map = m.map, new_map
        m.view_epoch, m.members = new.epoch, frozenset(new.node_ids)
        if m.um is not None:
            m.um.install(new_map, new.node_ids)
            early, m.early = m.early, []
            for kind, b, e, v, item in early:
                self._note(m, kind, b, e, v, item)
        if away:
            self.away_installs += 1
        # A node that was away cannot know which managers lack its mail: all buckets.
        fresh = range(len(new_map)) if away else new_map.fresh(previous)
        with_mail = [b for b in fresh if m.mail.get(b)]
        self.dir_reads[m.node_id] += len(with_mail)
        per: dict[str, list[Hint]] = {}
        for manager, hint in hints_for(
            m.node_id, new_map, with_mail, m.users_with_mail, lambda b: {}, lambda u: False
        ):
            per.setdefault(manager, []).append(hint)
        for manager, hints in sorted(per.items()):
            self._send_hints(m, m.incarnation, manager, hints)
        if away and m.um is not None:
            # Buckets we manage that this commit did not restamp: the others saw no
            # change and send nothing, but our soft state followed another history.
            stale = [b for b in new_map.buckets_of(m.node_id) if new_map.epochs[b] != new.epoch]
            if stale:
                for peer in sorted(m.members - {m.node_id}):
                    self._pull(m, m.incarnation, peer, stale)

    def _pull(self, m: MailNode, inc: int, peer: str, buckets: list[int]) -> None:
        """Ask ``peer`` which users of ``buckets`` it holds mail for (resent while needed)."""
        if not m.up or m.incarnation != inc or m.um is None or peer not in m.members:
            return
        um = m.um
        wanted = [b for b in buckets if um.map.owners[b] == m.node_id]
        if not wanted:
            return
        self.hint_bytes[m.node_id] += len(json.dumps(wanted))

        def work(dst: MailNode, respond: Callable[[Any], None]) -> None:
            held = {b: sorted(dst.users_with_mail(b)) for b in wanted}
            held = {b: users for b, users in held.items() if users}
            self.dir_reads[dst.node_id] += len(wanted)
            self.hint_bytes[dst.node_id] += len(json.dumps(held))
            respond(held)

        def got(held: dict[int, list[str]]) -> None:
            for b, users in held.items():
                hint = Hint(peer, b, um.map.epochs[b], tuple(users))
                self._note(m, "hint", b, hint.epoch, m.view_epoch, hint)

        def retry() -> None:
            self.net.at(
                self.net.now + self.config.retry_after,
                lambda: self._pull(m, inc, peer, wanted),
            )

        self._rpc(m, peer, "reconfig", work, got, retry)

    def _send_hints(self, m: MailNode, inc: int, manager: str, hints: list[Hint]) -> None:
        if not m.up or m.incarnation != inc:
            return
        # Only what the current map still asks for (a newer map sends its own hints).
        hints = [
            h
            for h in hints
            if (m.map.owners[h.bucket], m.map.epochs[h.bucket]) == (manager, h.epoch)
        ]
        if not hints:
            return
        view = m.view_epoch
        if manager == m.node_id:
            for h in hints:
                self._note(m, "hint", h.bucket, h.epoch, view, h)
            return
        body = json.dumps([m.node_id, [[h.bucket, h.epoch, list(h.users)] for h in hints]])
        self.hint_bytes[m.node_id] += len(body)

        def work(dst: MailNode, respond: Callable[[Any], None]) -> None:
            for h in hints:
                self._note(dst, "hint", h.bucket, h.epoch, view, h)
            respond(None)

        def retry() -> None:
            self.net.at(
                self.net.now + self.config.retry_after,
                lambda: self._send_hints(m, inc, manager, hints),
            )

        self._rpc(m, manager, "reconfig", work, lambda _: None, retry)

    def _tell_manager(self, m: MailNode, inc: int, user: str) -> None:
        """``m`` now holds mail for ``user``: tell the user's manager (the map m knows)."""
        if not m.up or m.incarnation != inc:
            return
        b = self._bucket(user)
        manager, epoch, view = m.map.owners[b], m.map.epochs[b], m.view_epoch
        if not manager:
            return

        def work(dst: MailNode, respond: Callable[[Any], None]) -> None:
            self._note(dst, "add", b, epoch, view, (user, m.node_id))
            respond(None)

        def retry() -> None:
            if (m.map.owners[b], m.map.epochs[b]) == (manager, epoch):
                self.net.at(
                    self.net.now + self.config.retry_after,
                    lambda: self._tell_manager(m, inc, user),
                )

        self._rpc(m, manager, "delivery", work, lambda _: None, retry)

    def _fragments_of(self, dst: MailNode, user: str) -> list[str] | None:
        if dst.um is None or not dst.um.manages(user):
            return None
        return sorted(dst.um.fragment_list(user))

    # --- delivery and retrieval --------------------------------------------------

    def pick_user(self) -> str:
        """A recipient: uniform, or ``hot_share`` of the time one of the first ``hot_users``."""
        c = self.config
        if c.hot_users and self.rng.random() < c.hot_share:
            return self.users[self.rng.randrange(c.hot_users)]
        return self.users[self.rng.randrange(len(self.users))]

    def deliver(self, proxy: str, user: str, done: Callable[[bool], None] | None = None) -> None:
        """An SMTP client hands ``proxy`` a message for ``user``; ``done(acked)`` at the end."""
        p = self.mail[proxy]
        if not p.up:
            return
        self._next_msg += 1
        d = _Delivery(user, f"m{self._next_msg}", proxy, p.incarnation, done=done)
        self.deliveries += 1

        def got(frags: list[str] | None) -> None:
            d.fragments = list(frags or [])
            self._store(d)

        def work(dst: MailNode, respond: Callable[[Any], None]) -> None:
            respond(self._fragments_of(dst, user))

        def session() -> None:
            manager = p.map.owners[self._bucket(user)]
            if not manager:
                self._store(d)
                return
            self._rpc(p, manager, "delivery", work, got, lambda: self._store(d))

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
        targets = p.lb.choose(self.live(p.node_id), d.fragments, self.config.replicas, self.net.now)
        if not targets:
            self._give_up(d)
            return
        b = self._bucket(d.user)
        replicated = self.config.replicas > 1
        cpu = self.config.cpu
        cpu_s = (cpu.store + (cpu.log if replicated else 0.0)) if cpu else 0.0
        # one round of stores, to every target; the delivery is acked when all reply
        attempt = {"left": len(targets), "failed": False}

        def work(dst: MailNode, respond: Callable[[Any], None]) -> None:
            def write() -> None:
                users = dst.mail.setdefault(b, {})
                first = not users.get(d.user)
                users.setdefault(d.user, set()).add(d.msg_id)
                dst.stores += 1
                if first:
                    self._tell_manager(dst, dst.incarnation, d.user)
                if replicated:  # the replica's update-log entry is durable too
                    self._disk(dst, lambda: respond(True), self.config.log_disk_time)
                else:
                    respond(True)

            self._cpu(dst, cpu_s, lambda: self._disk(dst, write))

        def ok(_: Any) -> None:
            attempt["left"] -= 1
            if attempt["left"] == 0 and not attempt["failed"]:
                self.acked[(d.user, d.msg_id)] = d.timeouts
                if d.done is not None:
                    d.done(True)

        for target in targets:

            def failed(target: str = target) -> None:
                if p.lb is not None:
                    p.lb.failed(target, self.net.now)
                if not attempt["failed"]:
                    attempt["failed"] = True
                    d.timeouts += 1
                    self._store(d)

            self._rpc(p, target, "delivery", work, ok, failed)

    def retrieve(
        self, proxy: str, user: str, done: Callable[[list[str]], None] | None = None
    ) -> None:
        """A POP/IMAP client at ``proxy`` lists ``user``'s mailbox (digests from every fragment)."""
        p = self.mail[proxy]
        if not p.up:
            return
        self.retrievals += 1
        manager = p.map.owners[self._bucket(user)]
        b = self._bucket(user)
        if not manager:
            return

        def gather(frags: list[str] | None) -> None:
            frags = list(frags or [])
            got: list[str] = []
            left = {"n": len(frags)}
            if not frags and done is not None:
                done([])

            def one(ids: Any) -> None:
                got.extend(ids or [])
                left["n"] -= 1
                if left["n"] == 0 and done is not None:
                    done(sorted(set(got)))

            for f in frags:

                def work(dst: MailNode, respond: Callable[[Any], None]) -> None:
                    self._disk(dst, lambda: respond(sorted(dst.mail.get(b, {}).get(user, ()))))

                self._rpc(p, f, "retrieval", work, one, lambda: one([]))

        def ask(dst: MailNode, respond: Callable[[Any], None]) -> None:
            respond(self._fragments_of(dst, user))

        self._rpc(p, manager, "retrieval", ask, gather, lambda: None)

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
        """Start the periodic load swap on every running node (call again after boots)."""
        for n in self.up_nodes():
            m = self.mail[n]
            if m.exchanging != m.incarnation:
                m.exchanging = m.incarnation
                self._exchange(n, m.incarnation)

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

    def chaos(self, duration: float, deliveries_per_s: float, *, max_add: int = 2) -> list[str]:
        """Mail traffic while nodes crash, restart, join and partitions come and go."""
        log: list[str] = []
        end = self.net.now + duration
        added = 0
        while self.net.now < end:
            step = min(self.rng.uniform(1.0, 4.0), end - self.net.now)
            self.run(step, deliveries_per_s, deliveries_per_s / 4)
            action = self.rng.choice(["crash", "crash", "restart", "add", "partition", "heal"])
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
                self.net.partition(ids[:cut], ids[cut:])
                log.append(f"{self.net.now:.2f} partition {cut}/{len(ids) - cut}")
            elif action == "heal":
                self.net.heal()
                log.append(f"{self.net.now:.2f} heal")
        return log

    def heal_all(self, settle: float = 3.0) -> None:
        """Heal partitions, restart crashed nodes, converge, let reconstruction finish."""
        self.net.heal()
        for n in sorted(set(self.mail) - set(self.up_nodes())):
            self.restart(n)
        self.converge()
        self.start_exchange()
        self.net.run_until(self.net.now + settle)
        self.converge()

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
        """Within each component, managers' fragment lists equal the members' hard state."""
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
                if holders.get(u, set()) != lists.get(u, set()):
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
            elif n > self.config.replicas and timeouts == 0:
                out.append(f"{u} {msg}: {n} copies without a retried store")
        return out

    def duplicates(self) -> int:
        """Acknowledged messages stored more than once (a store's reply was lost)."""
        boxes = {u: self.mailbox(u) for u in {u for u, _ in self.acked}}
        return sum(1 for (u, msg) in self.acked if boxes[u][msg] > self.config.replicas)

    def spread(self) -> dict[str, int]:
        """For each user, how many nodes hold its mail."""
        out: Counter[str] = Counter()
        for m in self.mail.values():
            for users in m.mail.values():
                for u, ids in users.items():
                    if ids:
                        out[u] += 1
        return dict(out)


# --- measurements ----------------------------------------------------------------


def measure(n: int, seed: int) -> dict[str, float]:
    """One run: boot, steady mail traffic, then one node crashes; per-node costs."""
    sim = MailSim(n, seed)
    sim.converge()
    sim.net.run_until(sim.net.now + 2.0)
    rate = 20.0 * n  # 20 deliveries/s per node, 5 retrievals/s per node
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


def main(argv: Sequence[str] | None = None) -> None:
    """Print the per-delivery, per-retrieval and reconfiguration figures per cluster size."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[3, 10, 30])
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args(argv)
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
