"""Porcupine across nodes (seed §2-3): :class:`MailCluster`, the cluster wiring.

:class:`MailCluster` turns the :class:`~yimaporc.porcupine.service.MailService`
of each ``porcupine-node`` into one mail service.  Its parts live in their own
modules, re-exported here:

- ``_cluster_wire``: the values the commands carry and their codecs;
- ``_cluster_commands``: the AMP commands (``porcupine.um.*``, ``porcupine.mb.*``,
  hints, profiles, load, UID marks and holders);
- ``_cluster_remote``: :class:`RemoteUserManager`, :class:`RemoteMailboxManager`
  (the same interfaces as the local managers, over AMP) and
  :func:`register_handlers`;
- ``_cluster_users``: :class:`ClusterUserManager`, the Twisted shell of the
  reconstruction core (soft state rebuilt from hints after every map change);
- ``_cluster_profiles``: :class:`ProfileReplicator`, the one profile write path;
- ``_cluster_load``: this node's load figure and its periodic exchange;
- ``_cluster_lease``: :class:`ClusterLease` (mixed into :class:`MailCluster`): the
  lease (pause detection), the read lease and the nodes ever seen.

This module routes (``users_for``, ``mailboxes_for``, ``home_of``), carries out the reconstruction core's sends (hints, pulls,
profile anti-entropy) and persists the nodes ever seen.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from ..cluster.buckets import BucketMap
from ..cluster.interfaces import IBucketMap
from ..cluster.rpc import PeerUnavailable
from ._cluster_commands import (
    COMMANDS,
    DlDeliver,
    Hints,
    HintsRequest,
    LoadExchange,
    MbStore,
    MbView,
    ProfilePut,
    ReadLease,
    UidHolders,
    UidMark,
)
from ._cluster_hints import HintExchange
from ._cluster_lease import ClusterLease
from ._cluster_load import LOAD_FANOUT, CountingMailboxes, NodeLoad
from ._cluster_profiles import ProfileReplicator
from ._cluster_remote import RemoteMailboxManager, RemoteUserManager, register_handlers
from ._cluster_users import ClusterUserManager
from ._cluster_wire import (
    ERRORS,
    AllocationLapsed,
    DeliveryDeferred,
    DeliveryRefused,
    HolderNotRecorded,
    Json,
    _digest_in,
    _digest_out,
    pack_messages,
    storage_full,
    unpack_messages,
)
from .balancer import LoadBalancer
from .interfaces import (
    ILoadBalancer,
    ILocalMailboxes,
    IMailboxManager,
    IMailTopology,
    IUserManager,
)
from .profiledb import Record
from .reconstruct import (
    LEASE,
    PAUSE_GRACE,
    READ_WAIT,
    SWEEP_INTERVAL,
    UID_GAP,
    Action,
    fence_of,
    has_majority,
)
from .softstate import bucket_of as _raw_bucket_of
from .storage import MailStorage
from .usermap import N_BUCKETS, bucket_of, normalise

if TYPE_CHECKING:
    from ..cluster.interfaces import IClusterNode
    from .replication.mail import MailReplication
from .values import (
    Digest,
    NewMessage,
)

__all__ = [
    "COMMANDS",
    "ERRORS",
    "LOAD_FANOUT",
    "UID_GAP",
    "AllocationLapsed",
    "ClusterUserManager",
    "Hints",
    "HintsRequest",
    "HolderNotRecorded",
    "Json",
    "MailCluster",
    "MbStore",
    "MbView",
    "NewMessage",
    "NodeLoad",
    "ProfilePut",
    "ProfileReplicator",
    "ReadLease",
    "RemoteMailboxManager",
    "RemoteUserManager",
    "UidHolders",
    "UidMark",
    "fence_of",
    "has_majority",
    "pack_messages",
    "register_handlers",
    "unpack_messages",
]


@implementer(IMailTopology)
class MailCluster(ClusterLease, Service):
    """Makes a node's mail one part of the cluster's mail service: the
    :class:`~.interfaces.IMailTopology` a clustered ``MailService`` is built with."""

    log = Logger()

    def __init__(
        self,
        storage: MailStorage,
        node: IClusterNode,
        buckets: IBucketMap,
        *,
        replication: MailReplication | None = None,
        balancer: ILoadBalancer | None = None,
        load_interval: float = 2.0,
        poll_interval: float = 5.0,
        settle_timeout: float = 2.0,
        rng: random.Random | None = None,
        read_wait: float = READ_WAIT,
    ) -> None:
        self.storage = storage
        self.node = node
        self.buckets = buckets
        self.reactor = storage.reactor
        self.me: str = node.node_id
        self.load_interval = load_interval
        self.rng = rng or random.Random()
        self.calls: Counter[str] = Counter()
        self.balancer: ILoadBalancer = balancer if balancer is not None else LoadBalancer(self.me)
        #: This node's load figure and its periodic exchange.
        self.meter = NodeLoad(
            self.me, self.reactor, self.balancer, self.live, self._swap_load, self.rng
        )
        if isinstance(self.balancer, LoadBalancer):  # its own load: read live, exact
            self.balancer.own_load = self.meter.load
        if replication is not None:  # updates waiting to be written here are load too
            self.meter.pending_work.append(replication.backlog)
        self.user_manager = ClusterUserManager(
            self.me, storage.profiles, self.reactor, settle_timeout=settle_timeout
        )
        self.user_manager.read_wait = read_wait
        self.user_manager.number_on = self._number_on
        self.user_manager.perform_sends = self.perform
        self.user_manager.mark_on = self._mark_on
        self.user_manager.holders_on = self._holders_on
        node.registry.register(UidHolders, self._on_holders)
        node.registry.register(UidMark, self._on_mark)
        node.registry.register(ReadLease, self._on_read_lease)
        self.read_renewals = 0
        self.lease = LEASE
        self.pause_grace = PAUSE_GRACE
        self._lease_until = float("inf")  # no detector before startService
        self._last_tick: float | None = None
        self._paused_at: float | None = None
        self.pauses = 0
        self.full_disk_refusals = 0
        self._lease_loop: LoopingCall | None = None
        self._sweep_loop: LoopingCall | None = None
        self.user_manager.lease_ok = self.lease_ok
        storage.fragment_store.fence_ok = self.lease_ok
        self.user_manager.cluster_now = self.cluster_now
        storage.fragment_store.cluster_now = self.cluster_now
        self._known_path = Path(storage.data_dir) / "mail" / "known-nodes"
        self.user_manager.known |= self._read_known()
        self.user_manager.core.booted(float(self.reactor.seconds()))
        self._alone = self.user_manager.known <= {self.me}
        # With replication, profile writes and this node's mailboxes go through its log.
        push = replication.push_profiles if replication is not None else self._push_profiles
        self.replicator = ProfileReplicator(storage.profiles, self._forget, push)
        self._boxes: ILocalMailboxes = (
            replication.mailboxes if replication is not None else storage.mailbox_manager
        )
        self._local_mailboxes = CountingMailboxes(self._boxes, self.meter)
        self._remote_users: dict[str, RemoteUserManager] = {}
        self._remote_boxes: dict[str, RemoteMailboxManager] = {}
        self._loop: LoopingCall | None = None
        self._poll: LoopingCall | None = None
        self.poll_interval = poll_interval
        #: The reconstruction's sends and answers (hints, pulls, profile anti-entropy).
        self.hints = HintExchange(
            self.me,
            self.reactor,
            self.call,
            self.live,
            lambda: int(self.node.view.epoch),
            self.user_manager,
            self.replicator,
            storage.fragment_store,
            storage.profiles,
            storage.run_blocking,
        )
        register_handlers(
            node.registry,
            lambda: self.user_manager,
            lambda: self._local_mailboxes,
            load=self.load,
            stores=self.store_here,
        )
        node.registry.register(Hints, self.hints.on_hints)
        node.registry.register(HintsRequest, self.hints.on_hints_request)
        node.registry.register(ProfilePut, self._on_profiles)
        node.registry.register(LoadExchange, self._on_load)
        buckets.subscribe(self._map_changed)

    # --- routing --------------------------------------------------------------

    def live(self) -> list[str]:
        """Node ids of the current view (this node if the view is empty)."""
        ids = list(self.node.view.node_ids)
        return ids if ids else [self.me]

    def _address_of(self, node_id: str) -> str | None:
        m = self.node.view.member(node_id)
        return None if m is None else str(m.address)

    def call(self, node_id: str, command: type[amp.Command], /, **kw: Any) -> Deferred[Any]:
        """Run ``command`` on ``node_id`` (counted in :attr:`calls`)."""
        address = self._address_of(node_id)
        if address is None:
            return fail(PeerUnavailable(f"{node_id} is not a member"))
        name = command.commandName
        self.calls[name.decode() if isinstance(name, bytes) else str(name)] += 1
        return self.node.rpc.call(address, command, **kw)

    def users_for(self, address: str) -> IUserManager:
        """The user manager of ``address``'s bucket: ours, or an AMP proxy to its owner."""
        owner = self.buckets.owner(bucket_of(address))
        if not owner or owner == self.me:
            return self.user_manager
        proxy = self._remote_users.get(owner)
        if proxy is None:
            proxy = self._remote_users[owner] = RemoteUserManager(
                owner, self.call, self.reactor.seconds
            )
        return proxy

    def mailboxes_for(self, node_id: str) -> IMailboxManager:
        """The mailbox manager of ``node_id``: ours, or an AMP proxy (the replication seam)."""
        if node_id == self.me:
            return self._local_mailboxes
        proxy = self._remote_boxes.get(node_id)
        if proxy is None:
            proxy = self._remote_boxes[node_id] = RemoteMailboxManager(
                node_id, self.call, self._observe
            )
        return proxy

    def home_of(self, address: str) -> str:
        """The node holding ``address``'s mailbox tree: the first live node by
        rendezvous hash of (address, node) (moves only when membership changes)."""
        live = self.live()
        return max(live, key=lambda n: _raw_bucket_of(f"{address.lower()}|{n}", 1 << 31))

    def holders_of(self, address: str) -> set[str]:
        """Every live node: a fragment list may lag (a deletion asks them all)."""
        return set(self.live())

    def forget(self, address: str) -> None:
        """A profile changed: drop every cached copy here."""
        self._forget(address)

    def known_nodes(self) -> set[str]:
        """Every node ever seen in a view (persisted in ``known-nodes``)."""
        return set(self.user_manager.known)

    def _forget(self, address: str) -> None:
        """A profile changed: drop every cached copy here."""
        self.user_manager.forget(address)
        for proxy in self._remote_users.values():
            proxy.forget(address)

    # --- deliveries handed to the manager ---------------------------------------

    def manager_lease(self, address: str) -> bool | None:
        """None unless this node manages ``address``; then whether it may hand out
        its UIDs now (the majority-confirmed read lease,
        ``ManagerState.numbers_leased``).  A delivery planned here checks it again
        before its 250 (``DeliveryProxy``): paused in between, another manager may
        have numbered above the plan's UID and readers shown it."""
        um = self.user_manager
        user = address.lower()
        if not um.state.manages(user):
            return None
        return um.core.numbers_leased(float(self.reactor.seconds()))

    def forward_delivery(
        self, node: str, address: str, body: bytes, when: float
    ) -> Deferred[list[Digest]]:
        """Have ``node`` (``address``'s manager) deliver ``body`` (``DlDeliver``)."""
        d = self.call(node, DlDeliver, user=address, body=body, when=when)
        return d.addCallback(lambda r: [_digest_in(v) for v in r["digests"]])

    def serve_deliveries(self, deliver: Callable[[str, bytes, float], Deferred[Any]]) -> None:
        """Answer ``DlDeliver`` with ``deliver(address, body, when)`` (the node's
        ``DeliveryProxy.deliver_forwarded``); its SMTP refusals and failed calls cross
        as :class:`DeliveryRefused` and :class:`DeliveryDeferred`."""

        def failed(f: Failure) -> Failure:
            err: Any = f.value
            if f.check(smtp.SMTPServerError):
                resp = (
                    err.resp.decode("utf-8", "replace") if isinstance(err.resp, bytes) else err.resp
                )
                return Failure(DeliveryRefused(f"{err.code} {resp}"))
            if f.check(PeerUnavailable) and not f.check(HolderNotRecorded, DeliveryDeferred):
                return Failure(DeliveryDeferred(f.getErrorMessage()))
            return f

        def handler(user: str, body: bytes, when: float) -> Deferred[dict[str, Any]]:
            d = maybeDeferred(lambda: deliver(normalise(user), body, when))
            return d.addCallbacks(lambda got: {"digests": [_digest_out(x) for x in got]}, failed)

        self.node.registry.register(DlDeliver, handler)

    # --- load -------------------------------------------------------------------

    def load(self) -> float:
        """This node's load figure (:meth:`NodeLoad.load`)."""
        return self.meter.load()

    def store_here(self, messages: Sequence[NewMessage]) -> Deferred[list[Digest]]:
        """Store on this node's disk, counting it in the load figure."""
        return self.track(lambda: self._boxes.store(messages))

    def track(self, work: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        """Run ``work`` (disk work on this node), counted in the load while it runs."""
        return self.meter.track(work)

    def _observe(self, node: str, load: float) -> None:
        self.meter.observe(node, load)

    def _on_load(self, node: str, load: float) -> dict[str, Any]:
        return {"load": self.meter.on_exchange(node, load)}

    def _swap_load(self, node: str, load: float) -> Deferred[float]:
        d = self.call(node, LoadExchange, node=self.me, load=load)
        return d.addCallback(lambda r: float(r["load"]))

    def _exchange_load(self) -> None:
        self.meter.exchange()

    # --- profiles ------------------------------------------------------------------

    def _push_profiles(self, records: list[Record]) -> Deferred[Any]:
        peers = [n for n in self.live() if n != self.me]
        ds = [self.call(n, ProfilePut, records=records) for n in peers]

        def lost(f: Failure, n: str) -> None:
            self.log.warn("profile push to {n} failed: {e}", n=n, e=f.getErrorMessage())

        for n, d in zip(peers, ds, strict=True):
            d.addErrback(lost, n)
        return DeferredList(ds, consumeErrors=True)

    def _on_profiles(self, records: list[Record]) -> Deferred[dict[str, Any]]:
        # Checked by RecordList (a malformed record dropped), again by ProfileDB.merge.
        return self.replicator.receive(records).addCallback(lambda _: {})

    # --- numbering --------------------------------------------------------------------

    def remind_pending(self) -> int:
        """Tell the current manager of every user with unnumbered mail here (a note
        from the delivery may have gone to a manager that was replaced); how many."""
        users = sorted(self.storage.fragment_store.pending_users)
        for user in users:
            # the next sweep tries again
            self.users_for(user).note_pending(user, self.me).addErrback(lambda f: None)
        return len(users)

    def _number_on(
        self, node: str, user: str, fence: str, first: int, count: int
    ) -> Deferred[tuple[int, int, int]]:
        return self.mailboxes_for(node).number_pending(user, fence, first, count)

    def _mark_on(
        self, node: str, bucket: int, fence: str, mark: int, seen: list[int] | None = None
    ) -> Deferred[bool]:
        """Ask ``node`` to record ``mark``; the mark it had goes into ``seen[0]`` (max)."""

        def got(r: dict[str, Any]) -> bool:
            if seen is not None and r.get("seen") is not None:
                seen[0] = max(seen[0], int(r["seen"]))
            return bool(r["ok"])

        if node == self.me:
            return self._on_mark(bucket, fence, mark).addCallback(got)
        d = self.call(node, UidMark, bucket=bucket, fence=fence, mark=mark)
        return d.addCallback(got)

    def _holders_on(
        self, node: str, bucket: int, fence: str, holders: Sequence[tuple[str, str]]
    ) -> Deferred[bool]:
        if node == self.me:
            return self._record_holders(bucket, fence, holders)
        d = self.call(node, UidHolders, bucket=bucket, fence=fence, holders=holders)
        return d.addCallback(lambda r: bool(r["ok"]))

    def _record_holders(
        self, bucket: int, fence: str, holders: Sequence[tuple[str, str]]
    ) -> Deferred[bool]:
        pairs = list(holders)
        store = self.storage.fragment_store
        d: Deferred[bool] = self.storage.run_blocking(store.record_holders, bucket, fence, pairs)
        return d.addErrback(self._full_disk, False)

    def _on_holders(
        self, bucket: int, fence: str, holders: tuple[tuple[str, str], ...]
    ) -> Deferred[dict[str, Any]]:
        if not 0 <= bucket < N_BUCKETS:  # (the pairs: checked by HolderList)
            raise amp.MalformedAmpBox("bad holders")
        return self._record_holders(bucket, fence, holders).addCallback(lambda ok: {"ok": ok})

    def _raise_mark(self, bucket: int, fence: str, mark: int) -> Deferred[tuple[bool, int]]:
        store = self.storage.fragment_store

        def raise_() -> tuple[bool, int]:
            before = store.bucket_mark(bucket)
            return store.raise_mark(bucket, fence, mark), before

        d: Deferred[tuple[bool, int]] = self.storage.run_blocking(raise_)
        return d.addErrback(self._full_disk, (False, 0))

    def _full_disk(self, f: Failure, answer: Any) -> Any:
        """A holder record or UID mark this node cannot write (its disk or SQLite is
        full) is *not recorded*, an answer the majority round expects, not an
        undeclared error (a traceback at both ends); counted as ``full_disk_refusals``."""
        if not storage_full(f.value):
            return f
        self.full_disk_refusals += 1
        self.log.warn("cannot record a holder or UID mark: {e}", e=f.getErrorMessage())
        return answer

    def _on_mark(self, bucket: int, fence: str, mark: int) -> Deferred[dict[str, Any]]:
        if not 0 <= bucket < N_BUCKETS:
            raise amp.MalformedAmpBox("bucket number out of range")
        if not self.user_manager.core.may_record_mark(bucket, float(self.reactor.seconds())):
            # a read lease we confirmed for another view may still run (a reader of
            # the bucket's old manager may still list): no UIDs for its new one yet
            return succeed({"ok": False})
        d = self._raise_mark(bucket, fence, mark)
        return d.addCallback(lambda r: {"ok": r[0], "seen": r[1]})

    # --- reconstruction ------------------------------------------------------------

    def _map_changed(self, old: BucketMap, new: BucketMap, fresh: set[int]) -> None:
        live = set(self.live())
        view = int(self.node.view.epoch)
        self._remember(live)
        if self._paused_at is not None:  # the view we were waiting for after a pause
            self._paused_at = None
            if self._last_tick is not None:
                self._lease_until = float(self.reactor.seconds()) + self.lease
        # Before any hint read (they run later, on the pool): a store fenced by a
        # manager this map no longer names now goes PENDING (fragments.py).
        self.storage.fragment_store.set_fences({b: fence_of(new, b) for b in range(len(new))})
        # Away (IBucketMap.was_away): booted, or our previous view is not the one
        # the coordinator committed from.
        um = self.user_manager
        away = um.core.prev_live is None or self.buckets.was_away()
        um.install(new, live, view=view, away=away)
        self.perform(um.take_outbox())

    def perform(self, actions: list[Action]) -> None:
        """Carry out the reconstruction core's sends over AMP (:class:`HintExchange`)."""
        self.hints.perform(actions)

    # --- service ---------------------------------------------------------------------

    def poll_open_mailboxes(self) -> int:
        """Have every IMAP mailbox open here look for new mail (it may have been
        stored on another node, whose change notice only reaches its own sessions).
        Only with other nodes live; returns how many were polled."""
        if len(self.live()) < 2:
            return 0
        keys = list(self.storage.registry.boxes)
        for user, mailbox in keys:
            self.storage.registry.changed(user, mailbox)
        return len(keys)

    def startService(self) -> None:
        """Start the periodic load exchange and the IMAP poll."""
        super().startService()
        self._loop = LoopingCall(self._exchange_load)
        self._loop.clock = self.reactor
        self._loop.start(self.load_interval, now=False)
        self._poll = LoopingCall(self.poll_open_mailboxes)
        self._poll.clock = self.reactor
        self._poll.start(self.poll_interval, now=False)
        self._lease_loop = LoopingCall(self._tick)
        self._lease_loop.clock = self.reactor
        self.user_manager.core.read_leases = True  # renewed by the tick from now on
        self._lease_loop.start(self.lease / 4, now=True)
        self._sweep_loop = LoopingCall(self.remind_pending)
        self._sweep_loop.clock = self.reactor
        self._sweep_loop.start(SWEEP_INTERVAL, now=False)

    def stopService(self) -> None:
        """Stop the periodic calls."""
        for loop in (self._loop, self._poll, self._lease_loop, self._sweep_loop):
            if loop is not None and loop.running:
                loop.stop()
        super().stopService()

    def status(self) -> dict[str, Any]:
        """Cluster mail figures for ``status --json``."""
        return {
            "mail_cluster": {
                **self.user_manager.status(),
                "pauses": self.pauses,
                # holder records and UID marks refused because this node's disk is full
                "full_disk_refusals": self.full_disk_refusals,
                # stores of a plan older than NODE_PLAN_TTL here (kept unnumbered)
                "late_allocations": self.storage.fragment_store.late_allocations,
                "lease": self.lease_ok(),
                "read_lease": {
                    "holds": self.user_manager.core.read_lease(float(self.reactor.seconds())),
                    "renewals": self.read_renewals,
                    "reads_waited": self.user_manager.read_waits,
                    "reads_lapsed": self.user_manager.read_wait_lapsed,
                    "marks_delayed": self.user_manager.core.marks_delayed,
                    "marks_blocked": self.user_manager.core.marks_blocked(
                        float(self.reactor.seconds())
                    ),
                },
                "rpc_calls": dict(self.calls),
                "load": self.load(),
                "balancer": self.balancer.status(),
                "hint_rounds": self.hints.hint_rounds[-5:],
                # buckets not pulled again while their pull was in flight
                "pulls_joined": self.hints.pulls_joined,
            }
        }
