"""The ground floor of a user manager's core (:class:`ManagerState`): its soft
state and counters, who it may answer for (quorum, settled buckets, the read
lease), and the promises it made to other managers' read leases."""

from __future__ import annotations

from ..softstate import UserManagerState, bucket_of
from ._fences import (
    ALLOCATION_TTL,
    NUMBER_RETRY,
    READ_LEASE,
    fence_of,
    has_majority,
)
from ._hints import BucketHint
from ._horizon import HORIZON_AGE


class ManagerState:
    """A user manager's soft state, the read lease, and what it may answer."""

    def __init__(
        self,
        me: str,
        n_buckets: int,
        *,
        settle_timeout: float = 2.0,
        number_retry: float = NUMBER_RETRY,
    ) -> None:
        self.me = me
        self.n_buckets = n_buckets
        self.settle_timeout = settle_timeout
        self.number_retry = number_retry
        self.state = UserManagerState(me, n_buckets)
        self.view_epoch = 0
        self.members: set[str] = set()
        #: Every node ever seen in a view (persisted by the shell): the majority
        #: numbering needs is of these.
        self.known: set[str] = {me}
        #: Members of the previous install (None: never installed since boot).
        self.prev_live: set[str] | None = None
        self.uidnext: dict[str, int] = {}
        #: bucket -> members whose hint has not arrived yet.
        self.settling: dict[int, set[str]] = {}
        self.settle_at: dict[int, float] = {}
        #: Members that had not sent their hint when a bucket settled by timeout:
        #: no numbering in that bucket until they do (or leave the view).
        self.missing: dict[int, set[str]] = {}
        #: When to ask members that are missing (or away holders back in the view) for
        #: their hints again (their push or our pull may have given up: without this a
        #: bucket would stay uncertain until the next view).
        self.pull_missing_at: float | None = None
        self.early: list[tuple[str, BucketHint, int | None]] = []
        self.early_notes: list[tuple[str, str]] = []
        self.early_pending: list[tuple[str, str]] = []
        self.gaps: dict[int, int] = {}
        #: user -> node -> unnumbered messages there (as far as we heard).
        self.pending: dict[str, dict[str, int]] = {}
        self.numbering: set[tuple[str, str]] = set()
        self.number_at: float | None = None
        #: Per bucket: the highest UID mark any member reported: ours start there.
        self.floor: dict[int, int] = {}
        #: Per bucket: the mark a majority recorded for us in this tenure.
        self.granted: dict[int, int] = {}
        self.extending: set[int] = set()
        #: (user, node, fence) holder records asked for (in flight or done) and done.
        self.recorded: set[tuple[str, str, str]] = set()
        self.confirmed: set[tuple[str, str, str]] = set()
        self.to_pull: list[int] = []
        #: user -> first UID -> (end, expiry): allocations that may still land
        #: (:class:`Horizon`); a numbering's block is keyed the same way.
        self.allocated: dict[str, dict[int, tuple[int, float]]] = {}
        self.allocation_ttl = ALLOCATION_TTL
        #: user -> first UIDs of allocations the horizon dropped expired (a reader
        #: may since have been shown UIDs above them): a holder note for one of them
        #: comes too late for a 250 (:meth:`Reconstruction.confirm`).  Bounded.
        self.lapsed: dict[str, dict[int, None]] = {}
        self.lapsed_notes = 0
        #: user -> nodes a majority recorded as holders (from hints: any tenure).
        self.holders_seen: dict[str, set[str]] = {}
        #: bucket -> members whose own hint for it arrived since our last install.
        self.hint_from: dict[int, set[str]] = {}
        self.hints_received = 0
        self.numbered = 0
        self.pending_plans = 0
        #: The read lease (:data:`READ_LEASE`): certain until then; the views we
        #: confirmed to others, until when; no marks before ``marks_from`` (boot).
        self.read_until = 0.0
        #: The lease a majority's confirmation gives, and how long a reader may keep
        #: an answer (:data:`HORIZON_AGE` in mailsim; the node's session reuse).
        self.read_lease_s = READ_LEASE
        self.answer_ttl = HORIZON_AGE
        #: False: ``certain`` does not ask for the lease (a shell whose renewal loop
        #: does not run: MailCluster before startService, like its pause lease).
        self.read_leases = True
        #: view -> (until, bucket owners of that view's map).
        self.promises: dict[tuple[int, tuple[str, ...]], tuple[float, tuple[str, ...]]] = {}
        self.marks_from = 0.0
        self.marks_delayed = 0

    # --- reading -----------------------------------------------------------------

    def bucket(self, user: str) -> int:
        """``user``'s bucket."""
        return bucket_of(user, self.n_buckets)

    def fence(self, bucket: int) -> str:
        """The fence our allocations in ``bucket`` carry."""
        return fence_of(self.state.map, bucket)

    def quorum(self) -> bool:
        """Our view holds a majority of every node ever seen (:attr:`known`)."""
        return has_majority(self.members | {self.me}, self.known | {self.me})

    def certain(self, user: str, now: float | None = None) -> bool:
        """Do we know every node holding ``user``'s mail (majority, every hint in)?
        With ``now``: also our read lease holds (:meth:`read_lease`)."""
        b = self.bucket(user)
        return (
            self.quorum()
            and b not in self.settling
            and not self.missing.get(b)
            and (now is None or not self.read_leases or self.read_lease(now))
        )

    def may_number(self, user: str, lease: bool) -> bool:
        """May we hand out UIDs for ``user`` now?  As its manager, with a majority, the
        bucket settled, every member's hint in, and our lease holding."""
        b = self.bucket(user)
        return (
            self.state.manages(user)
            and b not in self.settling
            and not self.missing.get(b)
            and self.quorum()
            and lease
        )

    def numbers_leased(self, now: float) -> bool:
        """May UIDs be handed out at ``now``?  Only under a read lease a majority
        confirmed for our view (or alone, or with read leases off): a manager cut off by
        a partition or a bridge keeps its old granted mark, and numbering under it
        after the majority moved on reuses UIDs readers were shown (chaos seed 56)."""
        return not self.read_leases or self.alone() or now <= self.read_until

    def next_deadline(self) -> float | None:
        """When :meth:`tick` has work next (None: nothing timed)."""
        times = list(self.settle_at.values())
        if self.number_at is not None:
            times.append(self.number_at)
        if self.pull_missing_at is not None:
            times.append(self.pull_missing_at)
        return min(times) if times else None

    def kick(self, now: float, delay: float = 0.0) -> None:
        """Have the numbering loop run ``delay`` s from ``now`` (a pending sooner run
        stays; a run now replaces a later one)."""
        if self.number_at is not None and delay > 0:
            return
        self.number_at = now + delay

    # --- the read lease ------------------------------------------------------------

    def view_id(self) -> tuple[int, tuple[str, ...]]:
        """Our installed view: its epoch and members (two sides of a partition can
        commit the same epoch number with different members)."""
        return self.view_epoch, tuple(sorted(self.members))

    def alone(self) -> bool:
        """Alone in our known cluster: nobody can have replaced us."""
        return self.known <= {self.me}

    def read_lease(self, now: float) -> bool:
        """May an answer given at ``now`` be listed as complete?  Our lease must hold
        until the reader's listing is done (it drops answers older than
        :data:`HORIZON_AGE`)."""
        return self.alone() or now + self.answer_ttl <= self.read_until

    def read_granted(self, view: tuple[int, tuple[str, ...]], asked_at: float) -> None:
        """A majority confirmed ``view`` to a round we started at ``asked_at``."""
        if view == self.view_id():
            self.read_until = max(self.read_until, asked_at + self.read_lease_s)

    def grant_read(self, view: tuple[int, tuple[str, ...]], now: float) -> bool:
        """A manager asks whether we have its ``view``: if so we promise to record no
        mark for a map of another view before ``now + READ_LEASE``."""
        if view != self.view_id():
            return False
        self.promises[view] = (now + self.read_lease_s, tuple(self.state.map.owners))
        return True

    def booted(self, now: float) -> None:
        """The node (re)started at ``now`` with :attr:`known` read from its disk:
        promises made before a restart are lost, so no mark is recorded for the
        lease's length (a first start, knowing no other node, promised nothing)."""
        if not self.alone():
            self.marks_from = max(self.marks_from, now + self.read_lease_s)

    def marks_blocked(self, now: float) -> bool:
        """Could a mark be refused now (a restart's wait, or a lease we confirmed for
        another view still running)?  For status and tests waiting for a settled
        cluster."""
        if self.alone():
            return False
        here = self.view_id()
        return now < self.marks_from or any(
            v != here and until > now for v, (until, _) in self.promises.items()
        )

    def may_record_mark(self, bucket: int, now: float) -> bool:
        """May we record a UID mark for ``bucket`` (for our current map) now?  Not
        while a read lease we confirmed for another view, in whose map another node
        managed ``bucket``, can still be running (a manager that kept the bucket
        knows its own allocations: no wait)."""
        if self.alone():
            return True  # nobody else can hold a read lease
        for view, (until, _) in list(self.promises.items()):
            if until <= now:
                del self.promises[view]
        here = self.view_id()
        owner = self.state.map.owners[bucket]
        if now < self.marks_from or any(
            v != here and owners[bucket] != owner for v, (_, owners) in self.promises.items()
        ):
            self.marks_delayed += 1
            return False
        return True
