"""The cluster user manager (moved out of ``cluster.py``).

:class:`ClusterUserManager` keeps its buckets' soft state in a
:class:`~yimaporc.porcupine.softstate.UserManagerState`: on each user-map change
it installs the new map, and every node sends the new managers of the fresh
buckets what its hard state says (``porcupine.hints``: users with mail, their
highest UIDNEXT, the bucket's profile records), one directory read per bucket.
A fresh bucket is *settling* until every live node has answered for it or
``settle_timeout`` passed; ``fragments`` and ``reserve_uids`` for its users wait
for that (profiles never wait: every node holds them all).  Hints carry the
sender's view epoch: one from a newer view waits for it, others count only on an
exact (owner, bucket epoch) match.  A node that was *away*
(:attr:`~yimaporc.cluster.bucketservice.BucketMapService.away`: booted, or its
previous view is not the one the commit was made from) sends hints for every
bucket and pulls (``porcupine.hints-request``) the buckets it manages that the
commit did not restamp from every member (docs/mail.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from ..cluster.buckets import BucketMap
from ._cluster_numbering import PendingNumbering
from ._cluster_wire import AllocationLapsed, HolderNotRecorded
from .profiledb import ProfileDB
from .reconstruct import (
    HEDGE_DELAY,
    MARK_TIMEOUT,
    NODE_ALLOCATION_TTL,
    NODE_ANSWER_TTL,
    NODE_READ_LEASE,
    NODE_TIMED_ALLOCATION_TTL,
    REPLICATED_ALLOCATION_TTL,
    Action,
    BucketHint,
    Horizon,
    MajorityWrite,
    NeedMark,
    Number,
    Reconstruction,
    Settled,
    Taken,
    split_fence,
    timed_fence,
)
from .usermap import N_BUCKETS, bucket_of
from .users import UserManager
from .values import (
    PENDING,
)

# The decisions live in the sans-IO core (the reconstruct package); this is its Twisted shell.


class ClusterUserManager(PendingNumbering, UserManager):
    """The user manager of this node's buckets: the Twisted shell of a
    :class:`~yimaporc.porcupine.reconstruct.Reconstruction` core.

    The core holds the fragment lists, the per-user UID counters (rebuilt from
    hints after every map change), settling, fences, marks and the unnumbered
    mail to number; this class runs its timers on ``clock``, turns its
    :class:`~yimaporc.porcupine.reconstruct.NeedMark` and
    :class:`~yimaporc.porcupine.reconstruct.Number` into calls (``mark_on``,
    ``holders_on``, ``number_on``, set by :class:`MailCluster`) and answers the
    :class:`IUserManager` methods with Deferreds that wait while a bucket settles.
    """

    log = Logger()

    def __init__(
        self,
        node_id: str,
        profiles: ProfileDB,
        clock: Any,
        *,
        settle_timeout: float = 2.0,
    ) -> None:
        super().__init__(node_id, profiles)
        self.clock = clock
        self.core = Reconstruction(node_id, N_BUCKETS, settle_timeout=settle_timeout)
        self.core.allocation_ttl = NODE_ALLOCATION_TTL
        #: The least hold of a replicated user's allocation (its coordinator may be
        #: paused with its copy committed until the failure detector drops it).
        self.replicated_ttl = REPLICATED_ALLOCATION_TTL
        self.core.read_lease_s = NODE_READ_LEASE
        self.core.answer_ttl = NODE_ANSWER_TTL
        self.core.read_leases = False  # MailCluster.startService turns it on
        #: This node's synced cluster time, None while not synced (MailCluster).
        self.cluster_now: Callable[[], float | None] = lambda: None
        self.state = self.core.state
        self._timer: IDelayedCall | None = None
        self._waiters: dict[int, list[Deferred[None]]] = {}
        self._extending: dict[int, list[Deferred[None]]] = {}
        self.mark_timeout = MARK_TIMEOUT
        #: ``number_on(node, user, fence, first, count) -> Deferred[(done, left, top)]``.
        self.number_on: Callable[..., Deferred[tuple[int, int, int]]] | None = None
        #: ``mark_on(node, bucket, fence, mark, seen) -> Deferred[bool]`` (MailCluster;
        #: the callee's mark before the call goes into ``seen[0]``, max).
        self.mark_on: Callable[..., Deferred[bool]] | None = None
        #: ``holders_on(node, bucket, fence, [(user, node)...]) -> Deferred[bool]``.
        self.holders_on: Callable[..., Deferred[bool]] | None = None
        #: holder records being written: their waiters (a second delivery waits too)
        self._recording: dict[tuple[str, str, str], list[Deferred[bool]]] = {}
        #: This node's lease (MailCluster's pause detector); True without one.
        self.lease_ok: Callable[[], bool] = lambda: True
        #: Sends the core asked for, when no ``perform_sends`` is set (MailCluster
        #: sets it, to carry them out over AMP).
        self.outbox: list[Action] = []
        self.perform_sends: Callable[[list[Action]], None] | None = None
        #: A read that finds only the read lease lapsed (a majority, the bucket
        #: settled, every hint in) waits up to this many seconds for the next
        #: renewal (:meth:`read_renewed`) instead of answering ``certain=False`` at
        #: once: on a loaded node a renewal's round trip can outlast the lease's
        #: margin, and a refused session is worse than a slower one.  0: no wait.
        self.read_wait = 0.0
        #: Reads that waited for a renewal, and those still uncertain after it.
        self.read_waits = 0
        self.read_wait_lapsed = 0
        self._lease_waiters: list[Deferred[None]] = []

    # The core's state, under the names the status page and tests use.
    settling = property(lambda self: self.core.settling)
    missing = property(lambda self: self.core.missing)
    pending = property(lambda self: self.core.pending)
    uidnext = property(lambda self: self.core.uidnext)
    floor = property(lambda self: self.core.floor)
    granted = property(lambda self: self.core.granted)
    members = property(lambda self: self.core.members)
    view_epoch = property(lambda self: self.core.view_epoch)
    to_pull = property(lambda self: self.core.to_pull)
    hints_received = property(lambda self: self.core.hints_received)
    numbered = property(lambda self: self.core.numbered)
    pending_plans = property(lambda self: self.core.pending_plans)

    @property
    def known(self) -> set[str]:
        """Every node ever seen in a view (persisted by MailCluster)."""
        return self.core.known

    @known.setter
    def known(self, value: set[str]) -> None:
        self.core.known = value

    @property
    def number_retry(self) -> float:
        """Seconds before numbering is tried again after it could not proceed."""
        return self.core.number_retry

    @number_retry.setter
    def number_retry(self, value: float) -> None:
        self.core.number_retry = value

    def _now(self) -> float:
        return float(self.clock.seconds())

    def _perform(self, actions: list[Action]) -> None:
        """Wake what the core released and keep one timer at its next deadline."""
        for a in actions:
            if isinstance(a, Settled):
                for d in self._waiters.pop(a.bucket, []):
                    d.callback(None)
            elif isinstance(a, Number):
                self._number(a)
            elif self.perform_sends is not None:
                self.perform_sends([a])
            else:
                self.outbox.append(a)
        self._rearm()

    def _rearm(self) -> None:
        due = self.core.next_deadline()
        if self._timer is not None and self._timer.active():
            if due is not None and self._timer.getTime() == max(due, self._now()):
                return
            self._timer.cancel()
        self._timer = None
        if due is not None:
            self._timer = self.clock.callLater(max(0.0, due - self._now()), self._tick)

    def _tick(self) -> None:
        self._timer = None
        before = {b: set(m) for b, m in self.core.settling.items()}
        actions = self.core.tick(
            self._now(), lease=self.lease_ok(), number=self.number_on is not None
        )
        for a in actions:
            if isinstance(a, Settled) and before.get(a.bucket):
                self.log.info(
                    "user map: bucket {b} settled without hints from {m}",
                    b=a.bucket,
                    m=sorted(before[a.bucket]),
                )
        self._perform(actions)

    def install(
        self, new_map: BucketMap, live: Iterable[str], *, view: int = 0, away: bool = False
    ) -> set[int]:
        """Adopt ``new_map`` (committed in view epoch ``view``); the buckets that became
        ours and fresh start settling; returns the fresh buckets.  What to send
        lands in :attr:`outbox` (see :meth:`Reconstruction.install`)."""
        fresh = new_map.fresh(self.core.state.map)
        self._perform(self.core.install(new_map, live, view=view, away=away, now=self._now()))
        return fresh

    def take_outbox(self) -> list[Action]:
        """The sends queued by the last installs (emptied)."""
        out, self.outbox = self.outbox, []
        return out

    def receive(self, sender: str, hint: BucketHint, view: int | None = None) -> bool:
        """Merge one bucket's hint (decoded by the ``porcupine.hints`` command's
        :class:`~._cluster_wire.HintList`) from ``sender``, sent in view ``view`` (see
        :meth:`Reconstruction.receive`); True if it counted.  (Tests that write hints
        as they travel: :func:`yimaporc.testing.hints.apply_hint`.)"""
        before = self.core.hints_received
        self._perform(self.core.receive(sender, hint, view, now=self._now()))
        return self.core.hints_received > before

    def add_fragment(self, address: str, node: str, first: int | None = 0) -> Deferred[None]:
        """See :class:`IUserManager`. A note for a user we do not manage comes from a
        proxy whose map is newer (or older) than ours: it is also kept until our next
        map install, then applied again if the user is ours, so a note that arrives
        just before we install the map that gives us the bucket (and resets it) is
        not lost.  ``first`` (> 0): the delivery allocated at ``first`` is stored on
        ``node`` (numbered there, now in the fragment list, or unnumbered: it will
        never land under that UID), so it leaves the visibility horizon."""
        address = address.lower()
        added = self.core.add_fragment(address, node)
        # (AMP passes a missing optional argument as None.)  A note after the
        # allocation lapsed: the copy is recorded all the same (it is stored, and
        # visible), but the delivery answers 451, not 250.
        late = bool(first and first > 0 and not self.core.confirm(address, first))
        done: Deferred[None] = succeed(None)
        if added:
            # A node holds this user's mail for the first time: a majority records
            # it before the delivery's 250, so a later manager knows it even while
            # the node is out of reach (reads then say so, they do not shrink).
            recorded = self._record_holder(address, node)
            done = recorded.addCallback(self._holder_recorded, address, node)
        if late:
            done.addCallback(self._lapsed, address, first)
        return done

    @staticmethod
    def _lapsed(_: object, address: str, first: int | None) -> None:
        raise AllocationLapsed(
            f"the allocation of UID {first} for {address} lapsed before its holder note"
        )

    def add_holder(self, address: str, node: str, first: int, fence: str) -> Deferred[str]:
        """See :class:`IUserManager`: :meth:`add_fragment`, then the plan's timed
        allocation at ``first`` renewed with a fresh time in its fence (the record
        can outlast NODE_PLAN_TTL under load, and the store would then take it
        unnumbered: a UID gap).  Empty when the allocation expired or the bucket's
        fence changed meanwhile (the store goes unnumbered, as without a record)."""
        address = address.lower()

        def renewed(_: object) -> str:
            base, at = split_fence(fence)
            if not base:
                return fence
            if not self.state.manages(address) or base != self.core.fence(
                self.core.bucket(address)
            ):
                return ""
            if at is None:
                return fence
            now = self.cluster_now()
            if now is None or not self.core.renew(
                address, first, self._now(), NODE_TIMED_ALLOCATION_TTL
            ):
                return ""
            return timed_fence(base, now)

        return self.add_fragment(address, node, 0).addCallback(renewed)

    def _holder_recorded(self, ok: bool, address: str, node: str) -> None:
        """Fail :meth:`add_fragment` (the delivery answers 451, not 250) when no
        majority recorded the holder: the reconstruction would not find it."""
        if not ok:
            raise HolderNotRecorded(f"no majority recorded {node} as holder of {address}")

    def settled(self, address: str) -> Deferred[None]:
        """Fires once ``address``'s bucket is not settling (at once if it is not)."""
        b = bucket_of(address)
        if b not in self.core.settling:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.setdefault(b, []).append(d)
        return d

    def fragments(self, address: str) -> Deferred[tuple[str, ...]]:
        """See :class:`IUserManager` (waits while the bucket settles, then for a read
        lease renewal if only the lease keeps the answer from being certain)."""
        d = self.settled(address).addCallback(lambda _: self._leased(address))
        return d.addCallback(lambda _: super(ClusterUserManager, self)
                             .fragments(address))  # fmt: skip

    def _leased(self, address: str) -> Deferred[None]:
        """Fires at once unless only a lapsed read lease would make the answer about
        ``address`` uncertain; then at the next renewal or after :attr:`read_wait`
        (the answer is judged then, as at any other moment: no weaker)."""
        user = address.lower()
        now = self._now()
        core = self.core
        if (
            self.read_wait <= 0
            or not core.read_leases
            or core.read_lease(now)
            or not core.state.manages(user)
            or not core.certain(user)
        ):
            return succeed(None)
        self.read_waits += 1
        d: Deferred[None] = Deferred()
        self._lease_waiters.append(d)

        def expire() -> None:
            if d in self._lease_waiters:
                self._lease_waiters.remove(d)
                self.read_wait_lapsed += 1
                d.callback(None)

        timer = self.clock.callLater(self.read_wait, expire)

        def cancel(r: None) -> None:
            if timer.active():
                timer.cancel()
            return r

        return d.addCallback(cancel)

    def read_renewed(self) -> None:
        """A read lease round succeeded: the reads waiting for it go on, if it holds."""
        if not self._lease_waiters or not self.core.read_lease(self._now()):
            return
        waiters, self._lease_waiters = self._lease_waiters, []
        for d in waiters:
            d.callback(None)

    def away_of(self, address: str) -> tuple[str, ...]:
        """Nodes that held ``address``'s mail when they left the view."""
        return tuple(sorted(self.state.away_list(address.lower())))

    def certain(self, address: str) -> bool:
        """Do we know every node holding ``address``'s mail?  Only with a majority
        (the holder records are on one), every member's hint in, and our read lease
        holding; a manager in a minority partition cannot tell what the other side
        holds, also before its failure detection noticed.  Nor can a node that does not
        manage the address's bucket under its map: a session looks its manager up on
        every call (``UserMail.users``), but a call resolved just before the map moved
        the bucket away lands here, where the soft state for it is empty (sim.mail
        seeds 203, 214 of the 5-node shape: an INBOX shown empty)."""
        user = address.lower()
        return self.core.state.manages(user) and self.core.certain(
            user, float(self.clock.seconds())
        )

    def horizon_of(self, address: str) -> Horizon:
        """What a reader may show of ``address``'s mail with the fragment list of this
        moment (:meth:`Reconstruction.horizon`, issue 14 bug 3)."""
        return self.core.horizon(address.lower(), self._now())

    def quorum(self) -> bool:
        """Our view holds a majority of every node ever seen (:attr:`known`)."""
        return self.core.quorum()

    def may_number(self, address: str) -> bool:
        """May we hand out UIDs for ``address`` now?  (:meth:`Reconstruction.may_number`)."""
        return self.core.may_number(address, self.lease_ok())

    def fence(self, address: str) -> str:
        """The fence our allocations for ``address`` carry."""
        return self.core.fence(bucket_of(address))

    def _take(
        self,
        address: str,
        count: int,
        unfenced: bool = False,
        again: bool = True,
        numbering: bool = False,
        track: bool = True,
        ttl: float | None = None,
    ) -> Deferred[tuple[int, str]]:
        """``count`` UIDs for ``address`` below the bucket's granted mark (extended
        first, by a majority, when they would not fit), or PENDING.  ``track``: the
        allocation holds the visibility horizon back until found or expired."""
        got = self.core.take(
            address,
            count,
            lease=self.lease_ok(),
            unfenced=unfenced,
            again=again,
            numbering=numbering,
            now=self._now(),
            track=track,
            ttl=ttl,
        )
        if isinstance(got, Taken):
            return succeed((got.first, got.fence))
        if not isinstance(got, NeedMark):
            return succeed((PENDING, ""))
        d = self._extend(got)
        return d.addCallback(
            lambda _: self._take(
                address, count, unfenced, again=False, numbering=numbering, track=track, ttl=ttl
            )
        )

    def _extend(self, need: NeedMark) -> Deferred[None]:
        """Raise a bucket's mark on a majority of the known cluster (each member
        records it durably, if our fence is its current one); fires (never fails)
        once that is done or has failed."""
        if not self.core.mark_write(need):
            out: Deferred[None] = Deferred()
            self._extending.setdefault(need.bucket, []).append(out)
            return out
        waiters: list[Deferred[None]] = []
        self._extending[need.bucket] = waiters
        mark_on = self.mark_on
        seen = [1]  # the marks the asked nodes had (their answers carry them)

        def done(granted: bool) -> None:
            if not granted:
                self.log.info(
                    "bucket {b}: no majority for UID mark {m}", b=need.bucket, m=need.target
                )
            self.core.mark_done(need, granted, seen[0])
            self._extending.pop(need.bucket, None)
            for d in waiters:
                d.callback(None)

        if mark_on is None:  # no cluster wiring (a bare manager in tests)
            done(True)
            return succeed(None)

        def write(node: str) -> Deferred[bool]:
            assert mark_on is not None
            return mark_on(node, need.bucket, need.fence, need.target, seen)

        return self._on_majority(write).addCallback(done)

    def _record_holder(self, address: str, node: str) -> Deferred[bool]:
        """Have a majority record that ``node`` holds mail for ``address`` (so a later
        manager knows it even while ``node`` is out of reach); never fails: True once
        recorded (or not ours to record: the core says when), False when no majority
        recorded it.  A second caller while the write runs waits for its outcome."""
        holders_on = self.holders_on
        if holders_on is None:
            return succeed(True)
        key = (address, node, self.core.fence(self.core.bucket(address)))
        running = self._recording.get(key)
        if running is not None:
            waiter: Deferred[bool] = Deferred()
            running.append(waiter)
            return waiter
        todo = self.core.record_holder(address, node, self.lease_ok())
        if todo is None:  # recorded in this tenure, or we may not number
            return succeed(True)
        b, fence = todo
        key = (address, node, fence)
        waiters: list[Deferred[bool]] = []
        self._recording[key] = waiters

        def write(n: str) -> Deferred[bool]:
            assert holders_on is not None
            return holders_on(n, b, fence, [(address, node)])

        def recorded(ok: bool) -> bool:
            self._recording.pop(key, None)
            self.core.holder_recorded(address, node, fence, ok)  # a failed one: again later
            for w in waiters:
                w.callback(ok)
            return ok

        return self._on_majority(write).addCallback(recorded)

    def _on_majority(self, write: Callable[[str], Deferred[bool]]) -> Deferred[bool]:
        """``write(node)`` on the nodes a :class:`MajorityWrite` names; fires True once
        a majority succeeded, False when that can no longer happen or after
        ``mark_timeout``."""
        vote = MajorityWrite(self.node_id, self.core.members, self.core.known)
        first: Deferred[bool] = Deferred()

        def finish() -> None:
            if vote.result is not None and not first.called:
                first.callback(vote.result)

        def answer(ok: bool) -> None:
            nxt = vote.answer(ok)
            if nxt is not None:
                ask(nxt)
            finish()

        def ask(node: str) -> None:
            write(node).addCallbacks(answer, lambda f: answer(False))

        def expire() -> None:
            if not first.called:
                first.callback(False)

        def hedge() -> None:
            for node in vote.hedge():
                ask(node)

        timer = self.clock.callLater(self.mark_timeout, expire)
        hedger = self.clock.callLater(min(HEDGE_DELAY, self.mark_timeout), hedge)

        def cancel(result: bool) -> bool:
            for t in (timer, hedger):
                if t.active():
                    t.cancel()
            return result

        first.addCallback(cancel)
        for node in vote.first:
            ask(node)
        finish()
        return first

    def reserve_uids(self, address: str, count: int) -> Deferred[int]:
        """The first of ``count`` fresh UIDs for ``address``, or PENDING when we may
        not number (waits while the bucket settles); unfenced (APPEND, COPY)."""
        address = address.lower()
        # APPEND/COPY: not tracked in the horizon (their store is to a mailbox a
        # reader of another one never finds: it would hold that one back).
        d = self.settled(address).addCallback(lambda _: self._take(address, count, track=False))
        return d.addCallback(lambda r: r[0])

    def reserve_fenced(self, address: str, count: int) -> Deferred[tuple[int, str]]:
        """:meth:`reserve_uids` with the fence the stores must carry."""
        address = address.lower()
        return self.settled(address).addCallback(lambda _: self._take(address, count, track=False))

    def delivery_plan(
        self, address: str, count: int, unfenced: bool = False, replicas: int = 1
    ) -> Deferred[tuple[tuple[str, ...], int, str]]:
        """The fragment list, the first of ``count`` reserved UIDs (PENDING when we may
        not number) and their fence (waits while the bucket settles).  ``unfenced``:
        a UID from the counter even without a majority, no fence (docs/mail.md:
        known limits).  ``replicas`` > 1 (a replicated user's delivery): the
        allocation holds readers back at least REPLICATED_ALLOCATION_TTL."""
        address = address.lower()
        # With a synced cluster clock the allocation carries its time: stores check
        # its age, so it leaves the horizon after NODE_TIMED_ALLOCATION_TTL, unless
        # the copies of a replicated delivery may still follow the first one.
        timed = not unfenced and self.cluster_now() is not None
        ttl = NODE_TIMED_ALLOCATION_TTL if timed else None
        if replicas > 1:
            ttl = max(ttl or self.core.allocation_ttl, self.replicated_ttl)

        def plan(taken: tuple[int, str]) -> tuple[tuple[str, ...], int, str]:
            first, fence = taken
            at = self.cluster_now() if timed and fence else None  # the take's own turn
            if at is not None:
                fence = timed_fence(fence, at)
            # Only holders a majority recorded: the proxy records any other node it
            # stores on first, and stores unnumbered if that fails (a numbered copy
            # on a node no later manager knows of would appear after the heal below
            # UIDs shown meanwhile; sim.mail seed 65, the chaos test's below_seen).
            wired = fence and self.holders_on is not None  # (a bare manager records nothing)
            unrecorded = self.core.unrecorded(address) if wired else set()
            frags = [n for n in self.state.fragment_list(address) if n not in unrecorded]
            return tuple(sorted(frags)), first, fence

        d = self.settled(address).addCallback(
            lambda _: self._take(address, count, unfenced, ttl=ttl)
        )
        return d.addCallback(plan)

    def status(self) -> dict[str, Any]:
        """Counts for the status page."""
        return {
            "managed_buckets": len(self.state.map.buckets_of(self.node_id)),
            "settling_buckets": len(self.core.settling),
            "users_with_mail": len(self.state.fragments),
            "hints_received": self.core.hints_received,
            "early_hints": len(self.core.early),
            "quorum": self.quorum(),
            "known_nodes": len(self.core.known | {self.node_id}),
            "unnumbered": sum(sum(v.values()) for v in self.core.pending.values()),
            "numbered": self.core.numbered,
            "pending_plans": self.core.pending_plans,
            # holder notes after their allocation lapsed (the delivery answered 451)
            "lapsed_notes": self.core.lapsed_notes,
        }
