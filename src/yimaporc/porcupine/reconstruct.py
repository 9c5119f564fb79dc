"""Soft-state reconstruction and UID numbering of a user manager, sans-IO (issue 14).

One core, run by the node (:class:`~yimaporc.porcupine.cluster.ClusterUserManager`
and :class:`~yimaporc.porcupine.cluster.MailCluster` perform its actions over
AMP) and by the simulator (:mod:`yimaporc.porcupine.mailsim` performs them over
simulated RPCs).  docs/mail.md ("User managers and reconstruction", "UIDs under
partitions and pauses") gives the design; this module holds every decision:

- :meth:`Reconstruction.install`: a committed user map; returns what to send
  (:class:`SendHints`, :class:`PullHints`, :class:`PushProfiles`) and which
  settling buckets it released (:class:`Settled`);
- :meth:`Reconstruction.receive`: one bucket's hint (a :class:`BucketHint`,
  the one typed value of ``porcupine.hints``, with its codec);
- :meth:`Reconstruction.tick` / :meth:`Reconstruction.next_deadline`: settle
  timeouts and the numbering loop (:class:`Number` actions);
- :meth:`Reconstruction.take`: UIDs for a delivery (:class:`Taken`), PENDING,
  or :class:`NeedMark` (raise the bucket's mark on a majority first, tracked by
  :class:`MajorityWrite`);
- store-side rules every node's hard state follows (:func:`admit_fenced`).

Time comes in as ``now`` arguments, the lease as a ``lease`` flag; the core
never calls out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from ..cluster.buckets import BucketMap
from .softstate import UserManagerState, bucket_of
from .values import PENDING

__all__ = [
    "HORIZON_AGE",
    "NODE_ALLOCATION_TTL",
    "NODE_PLAN_TTL",
    "NODE_TIMED_ALLOCATION_TTL",
    "BucketHint",
    "Horizon",
    "MajorityWrite",
    "MalformedHint",
    "NeedMark",
    "Number",
    "PullHints",
    "PushProfiles",
    "Reconstruction",
    "SendHints",
    "Settled",
    "Taken",
    "UserHint",
    "admit_fenced",
    "admit_timed",
    "fence_of",
    "has_majority",
    "split_fence",
    "timed_fence",
]

#: With other nodes live, a rebuilt UID counter starts this far above the highest
#: UIDNEXT reported, so UIDs the previous manager handed to stores still in flight
#: (on any node's delivery proxy) are not reused.
UID_GAP = 32

#: How long a manager waits before trying again to number unnumbered mail it
#: could not number (no majority, a member's hint missing, a failed call).
NUMBER_RETRY = 1.0

#: A manager has a majority record this many UIDs beyond what it needs at a time
#: (one round per block per bucket); a bucket's next manager starts above it.
MARK_BLOCK = 256

#: A node numbers (as manager) and accepts fenced stores only while its own lease
#: holds: renewed every LEASE/4 s by the reactor, so a paused process (SIGSTOP, a
#: stall) finds it lapsed when it wakes.  After such a gap it stays without a
#: lease until it installs a new view or PAUSE_GRACE seconds pass (it may have
#: been replaced meanwhile; a new view tells it).
LEASE = 1.0
PAUSE_GRACE = 5.0

#: The read lease (issue 14, the last sweep seeds): a manager answers reads as
#: ``certain`` only while a majority of the known cluster confirmed, less than
#: READ_LEASE before (counted from when it asked), that they still have its view
#: (:meth:`Reconstruction.grant_read`); a node that confirmed records no UID mark
#: for a map of another view until READ_LEASE after its confirmation, nor for
#: READ_LEASE after it boots (it may have confirmed before a crash).  So no manager
#: of a newer view hands out a UID while a reader of an older one (a manager cut off
#: before failure detection) may still list.  Renewed every READ_RENEW.
READ_LEASE = 1.0
READ_RENEW = READ_LEASE / 4

#: The node's read lease is longer: its readers (``retrieval.UserMail``) keep a
#: manager's answer for ``fragments_ttl`` (1 s) within a session, so the manager is
#: certain only while its lease outlives that (:attr:`Reconstruction.answer_ttl`).
NODE_READ_LEASE = 2.0
NODE_ANSWER_TTL = 1.0

#: Every this many seconds a node reminds managers of its unnumbered mail.
SWEEP_INTERVAL = 3.0

MARK_TIMEOUT = 1.0

#: A majority write still undecided after this many seconds asks spare members in
#: place of the ones that have not answered yet (:meth:`MajorityWrite.hedge`): the
#: first ones asked are a bare majority, so one slow disk among them would make
#: every such write wait for it (and fail at MARK_TIMEOUT once its queue is long).
HEDGE_DELAY = MARK_TIMEOUT / 4

#: At most this many spares per hedge: an overloaded cluster is not asked for many
#: more writes than it already has queued.
HEDGE_MAX = 2

#: A failed pull (``porcupine.hints-request``) is retried this often, this far apart,
#: while the peer stays in the view and the view does not change.
PULL_TRIES = 5
PULL_RETRY = 0.5

#: At most this many unnumbered messages are numbered per call.
NUMBER_BATCH = 256

#: Hints from a view not installed yet that a manager keeps (one per sender and bucket).
MAX_EARLY_HINTS = 64 * 1024

#: Holder pairs read from one hint entry.
MAX_HOLDERS = 100_000


def fence_of(bmap: BucketMap, bucket: int) -> str:
    """The fence of ``bucket`` in ``bmap``: ``"owner@bucket-epoch"`` (see docs/mail.md)."""
    return f"{bmap.owners[bucket]}@{bmap.epochs[bucket]}"


def has_majority(members: Iterable[str], known: Iterable[str]) -> bool:
    """True if ``members`` hold more than half of the ``known`` cluster."""
    k = set(known)
    return len(set(members) & k) * 2 > len(k)


#: A fenced allocation older than this when its store is written is stored
#: unnumbered instead: the manager has handed out (and clients may have been shown)
#: higher UIDs meanwhile, and a late message must not appear below them (a proxy
#: paused or stalled between the plan and the store; mailsim found it).
PLAN_TTL = 0.5


def admit_fenced(
    uid: int,
    fence: str,
    current_fence: str | None,
    lease: bool,
    uidnext: int,
    age: float = 0.0,
) -> bool:
    """May a store carrying ``uid`` and ``fence`` (allocated ``age`` s ago) be numbered
    on a node whose own map gives the bucket ``current_fence`` and whose mailbox has
    ``uidnext``?  False: it is stored unnumbered (a stale or cut-off manager, a
    lapsed lease, a UID below what this mailbox already numbered, or an allocation
    older than :data:`PLAN_TTL`).  Unfenced UIDs (replicated stores, APPEND) are
    admitted as before."""
    if uid == PENDING:
        return False
    if not fence:
        return True
    return current_fence == fence and lease and uid >= uidnext and age <= PLAN_TTL


#: An allocation its manager heard nothing more of holds the visibility horizon back
#: this long: after :data:`PLAN_TTL` no store admits it numbered any more (so it can
#: no longer appear), whatever became of the delivery that asked for it.
ALLOCATION_TTL = PLAN_TTL

#: The node's allocations stay outstanding longer: its ``FragmentStore`` does not
#: check an allocation's age (the plan's time is not on the wire yet), so a store can
#: land as late as the proxy's call can: RpcClient's 10 s call timeout plus its 3 s
#: connect timeout, and some slack.  Readers find most allocations present well
#: before that; this only bounds how long a lost delivery holds the horizon back.
NODE_ALLOCATION_TTL = 15.0

#: A delivery's allocation in the node carries the manager's cluster time (timesync)
#: in its fence, ``"owner@epoch/at"`` (:func:`timed_fence`): the storing node admits
#: it numbered only while its own synced cluster clock says it is at most
#: NODE_PLAN_TTL old (:func:`admit_timed`; no synced clock: unnumbered), so the
#: manager holds it in the horizon only NODE_TIMED_ALLOCATION_TTL, not
#: NODE_ALLOCATION_TTL: the rest is room for the two clocks' error (the best
#: round trip to the time reference) and for the commit that follows the check.
NODE_PLAN_TTL = 1.0
NODE_TIMED_ALLOCATION_TTL = 3.0


def timed_fence(fence: str, at: float) -> str:
    """``fence`` with the allocation's cluster time ``at``."""
    return f"{fence}/{at:.3f}"


def split_fence(fence: str) -> tuple[str, float | None]:
    """``(fence, at)`` of a possibly timed fence (``at`` None: untimed or junk)."""
    base, sep, at = fence.partition("/")
    if not sep:
        return fence, None
    try:
        when = float(at)
    except ValueError:
        return base, float("-inf")  # junk: as if very old (stored unnumbered)
    return base, when if when == when else float("-inf")


def admit_timed(at: float | None, cluster_now: float | None) -> bool:
    """May a store numbered under an allocation made at cluster time ``at`` be
    written at ``cluster_now`` (None: this node's clock is not synced)?"""
    if at is None:
        return True
    return cluster_now is not None and cluster_now - at <= NODE_PLAN_TTL


@attrs.frozen
class Horizon:
    """The visibility horizon of one user, from its manager (issue 14 item 1, bug 3).

    ``outstanding``: the UID ranges ``[first, end)`` the manager handed out that may
    still land (a store or a numbering in flight, not confirmed, not expired);
    ``next``: the manager's counter (every UID handed out is below it).  A reader that
    lists the fragment nodes of the *same* answer shows only UIDs below
    :meth:`bound`, and a UIDNEXT no higher: an outstanding UID it does not find may
    still land on its node, and anything above it shown now would have it appear
    below a UID already shown.  Every UID below the bound is either on a node of that
    fragment list (a numbered store goes only to a listed or majority-recorded node)
    or will never be used, so what a reader shows grows only upwards.
    """

    outstanding: tuple[tuple[int, int], ...] = ()
    next: int = 1

    def bound(self, present: Iterable[int]) -> int:
        """Show nothing at or above this: the lowest outstanding UID not among
        ``present`` (the UIDs the reader found), else :attr:`next` (a UID handed out
        after this answer may be anywhere, so one found above ``next`` waits for the
        next answer)."""
        have = set(present)
        for first, end in sorted(self.outstanding):
            for uid in range(first, min(end, self.next)):
                if uid not in have:
                    return uid
        return self.next

    def encode(self) -> list[int]:
        """The flat JSON/AMP form: ``[next, first1, end1, first2, end2, ...]``."""
        return [self.next, *(x for r in self.outstanding for x in r)]

    @classmethod
    def decode(cls, obj: Any) -> Horizon | None:
        """Inverse of :meth:`encode`; None for a missing or malformed value (an older
        manager: no horizon, the reader shows what it finds)."""
        if not isinstance(obj, list) or not obj or len(obj) % 2 != 1:
            return None
        try:
            nums = [int(x) for x in obj]
        except (TypeError, ValueError):
            return None
        pairs = [(nums[i], nums[i + 1]) for i in range(1, len(nums), 2) if nums[i] < nums[i + 1]]
        return cls(_collapse(pairs, nums[0]), nums[0])


#: A reader shows a listing only if the horizon it was cut at is at most this old
#: (measured by the reader, from sending its request): a reader paused or slowed
#: between the manager's answer and its listing would hide what readers at a newer
#: horizon showed meanwhile; it asks again instead.
HORIZON_AGE = PLAN_TTL / 2


#: At most this many outstanding ranges per user are sent to a reader; beyond that
#: (a burst far above any real delivery rate) the highest ones are sent as one range
#: up to the counter: conservative, the reader shows less for a moment, never more.
MAX_OUTSTANDING = 256


def _collapse(ranges: Iterable[tuple[int, int]], top: int) -> tuple[tuple[int, int], ...]:
    ordered = sorted(ranges)
    if len(ordered) <= MAX_OUTSTANDING:
        return tuple(ordered)
    rest = ordered[MAX_OUTSTANDING - 1 :]
    end = max(top, *(e for _, e in rest))
    return (*ordered[: MAX_OUTSTANDING - 1], (rest[0][0], end))


# --- the hint: one typed value, one codec --------------------------------------------


class MalformedHint(ValueError):
    """A hint entry that is not ``[bucket, epoch, [[user, has_mail, uidnext, n]...],
    [record...], mark, [[user, node]...]]``."""


@attrs.frozen
class UserHint:
    """What one node's hard state says of one user: holds mail (numbered or not),
    its highest UIDNEXT (or the highest it ever showed), unnumbered messages."""

    user: str
    has_mail: bool
    uidnext: int
    unnumbered: int = 0


@attrs.frozen
class BucketHint:
    """One bucket's reconstruction hint from its sender's hard state, for the
    manager that holds ``epoch`` for the bucket.  ``records`` are profile records
    (checked by :meth:`~yimaporc.porcupine.profiledb.ProfileDB.merge`), ``mark``
    the highest UID mark recorded there, ``holders`` the (user, node) pairs a
    majority recorded as having held mail."""

    bucket: int
    epoch: int
    users: tuple[UserHint, ...] = ()
    records: tuple[Any, ...] = ()
    mark: int = 1
    holders: tuple[tuple[str, str], ...] = ()

    def encode(self) -> list[Any]:
        """The JSON form ``porcupine.hints`` carries (docs/wire.md)."""
        return [
            self.bucket,
            self.epoch,
            [[u.user, u.has_mail, u.uidnext, u.unnumbered] for u in self.users],
            [list(r) for r in self.records],
            self.mark,
            [list(h) for h in self.holders],
        ]

    @classmethod
    def decode(cls, obj: Any, n_buckets: int) -> BucketHint:
        """Inverse of :meth:`encode`; :class:`MalformedHint` if the head is bad.

        A malformed user item or holder pair is skipped, and so is one of another
        bucket; entries of older peers (no pending count, no mark, no holders) read
        with the defaults."""
        if not isinstance(obj, list) or len(obj) < 3:
            raise MalformedHint("a hint entry is a list of at least 3 items")
        try:
            bucket, epoch = int(obj[0]), int(obj[1])
        except (TypeError, ValueError) as e:
            raise MalformedHint("bucket and epoch must be integers") from e
        if not 0 <= bucket < n_buckets or not isinstance(obj[2], list):
            raise MalformedHint("bucket out of range or users not a list")
        users: list[UserHint] = []
        for item in obj[2]:
            try:
                user, has_mail, uidnext = str(item[0]), bool(item[1]), int(item[2])
                unnumbered = int(item[3]) if len(item) > 3 else 0
            except (IndexError, TypeError, ValueError, KeyError):
                continue
            if bucket_of(user, n_buckets) == bucket:
                users.append(UserHint(user, has_mail, uidnext, unnumbered))
        records = tuple(obj[3]) if len(obj) > 3 and isinstance(obj[3], list) else ()
        mark = 1
        if len(obj) > 4:
            try:
                mark = int(obj[4])
            except (TypeError, ValueError):
                mark = 1
        holders: list[tuple[str, str]] = []
        if len(obj) > 5 and isinstance(obj[5], list):
            for pair in obj[5][:MAX_HOLDERS]:
                try:
                    user, node = str(pair[0]), str(pair[1])
                except (IndexError, TypeError, KeyError):
                    continue
                if bucket_of(user, n_buckets) == bucket:
                    holders.append((user, node))
        return cls(bucket, epoch, tuple(users), records, mark, tuple(holders))


def decode_hints(entries: Any, n_buckets: int) -> list[BucketHint]:
    """Every well-formed entry of a ``porcupine.hints`` list (others dropped)."""
    out: list[BucketHint] = []
    for e in entries if isinstance(entries, list) else ():
        try:
            out.append(BucketHint.decode(e, n_buckets))
        except MalformedHint:
            continue
    return out


# --- actions -----------------------------------------------------------------------


@attrs.frozen
class SendHints:
    """Read our hard state of ``buckets`` and send each manager (of ``bmap``) its part,
    tagged with view ``view``."""

    bmap: BucketMap
    buckets: tuple[int, ...]
    view: int


@attrs.frozen
class PullHints:
    """Ask ``peer`` for its hints of ``buckets`` (we were away), in view ``view``."""

    peer: str
    buckets: tuple[int, ...]
    view: int


@attrs.frozen
class PushProfiles:
    """Anti-entropy: send every profile record to ``nodes`` (they came into view)."""

    nodes: tuple[str, ...]


@attrs.frozen
class Settled:
    """``bucket`` stopped settling: wake what waits for it."""

    bucket: int


@attrs.frozen
class Number:
    """Number up to ``count`` of ``user``'s unnumbered messages on ``node``: take UIDs
    (:meth:`Reconstruction.take`), then ``number_pending`` there and report with
    :meth:`Reconstruction.number_done` / :meth:`Reconstruction.number_failed`."""

    user: str
    node: str
    count: int


Action = SendHints | PullHints | PushProfiles | Settled | Number


@attrs.frozen
class Taken:
    """UIDs ``first``.. for a store, carrying ``fence`` ("" unfenced)."""

    first: int
    fence: str


@attrs.frozen
class NeedMark:
    """The UIDs do not fit below ``bucket``'s granted mark: raise it to ``target`` on
    a majority (:meth:`Reconstruction.mark_write`), then take again."""

    bucket: int
    fence: str
    target: int


class MajorityWrite:
    """Which nodes to ask for a durable write that must reach a majority of the known
    cluster: ourselves and the next members after us (spread), the rest only when
    one refuses or fails.  :attr:`result` becomes True once a majority agreed, False
    once that can no longer happen; a caller's timeout decides otherwise."""

    def __init__(self, me: str, members: Iterable[str], known: Iterable[str]) -> None:
        k = set(known) | {me}
        self.need = len(k) // 2 + 1
        others = sorted((set(members) & k) - {me})
        at = sum(1 for n in others if n < me)
        others = others[at:] + others[:at]
        self.first: tuple[str, ...] = (me, *others[: self.need - 1])
        self._spare = others[self.need - 1 :]
        self._left = len(self.first)
        self._ok = 0
        self.result: bool | None = None

    def answer(self, ok: bool) -> str | None:
        """One asked node answered (or failed: ``ok`` False); the next node to ask."""
        if self.result is not None:
            return None
        self._left -= 1
        if ok:
            self._ok += 1
            if self._ok >= self.need:
                self.result = True
                return None
        elif self._spare:
            self._left += 1
            return self._spare.pop(0)
        if self._left == 0:
            self.result = False
        return None

    def hedge(self) -> list[str]:
        """Spares to ask now because asked nodes are slow to answer (called once, after
        :data:`HEDGE_DELAY`): one per missing answer, at most :data:`HEDGE_MAX`.  A
        slow node's late answer still counts."""
        if self.result is not None:
            return []
        missing = min(self.need - self._ok, self._left, HEDGE_MAX, len(self._spare))
        extra = self._spare[:missing]
        del self._spare[:missing]
        self._left += len(extra)
        return extra


# --- the core -----------------------------------------------------------------------


class Reconstruction:
    """A user manager's soft state, its reconstruction and its UID counters."""

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

    def next_deadline(self) -> float | None:
        """When :meth:`tick` has work next (None: nothing timed)."""
        times = list(self.settle_at.values())
        if self.number_at is not None:
            times.append(self.number_at)
        if self.pull_missing_at is not None:
            times.append(self.pull_missing_at)
        return min(times) if times else None

    # --- install -------------------------------------------------------------------

    def install(
        self,
        new_map: BucketMap,
        live: Iterable[str],
        *,
        view: int = 0,
        away: bool = False,
        now: float = 0.0,
    ) -> list[Action]:
        """Adopt ``new_map`` (committed in view epoch ``view``).

        ``away``: our previous view is not the one the coordinator committed from
        (it rebooted, sat in another partition, or installed a commit the
        coordinator never saw); the first install since boot sends every bucket's
        hints in any case (no manager knows what we hold).  Returns the
        hints to send (every bucket when away, else the fresh ones and those of
        managers that came into view), the pulls (away: the buckets we manage that
        this commit did not restamp, from every member), the profile push (the
        lowest-id node of the old view, to nodes that came) and the buckets whose
        settling ended."""
        alive = set(live)
        booted = self.prev_live is None
        old_map = self.state.map
        self.hint_from.clear()
        fresh = self.state.install(new_map, alive)
        self.view_epoch, self.members = view, alive
        out: list[Action] = []
        mine = set(new_map.buckets_of(self.me))
        for user in list(self.uidnext):
            b = self.bucket(user)
            if b not in mine or b in fresh:
                del self.uidnext[user]
        for b in list(self.floor):
            if b not in mine or b in fresh:
                del self.floor[b]
        # A granted block ends at every view change: the first UIDs after one take a
        # majority write, whose answers bring any higher mark another side's manager
        # recorded while we kept the bucket's map entry (a merge can hand it back to us
        # unchanged, with no member new to our view: mailsim seed 475).
        self.granted.clear()
        for b in list(self.settling):
            if b not in mine or b in fresh:
                out.extend(self._settle(b, now))
        for b in list(self.missing):
            if b not in mine or b in fresh:
                del self.missing[b]
            else:
                self.missing[b] &= alive
                if not self.missing[b]:
                    del self.missing[b]
        for user in list(self.pending):
            if not self.state.manages(user):
                del self.pending[user]
        for user in list(self.allocated):
            if self.bucket(user) not in mine or self.bucket(user) in fresh:
                del self.allocated[user]  # a later manager's fences settle those
        for user in list(self.holders_seen):
            if self.bucket(user) not in mine or self.bucket(user) in fresh:
                del self.holders_seen[user]  # the new map's hints bring them again
            else:
                # A recorded holder that leaves the view is away, also when it never
                # was in the fragment list (it was a member when the record came in a
                # hint, and left before its own hint did: mailsim seed 17).
                for node in self.holders_seen[user] - alive:
                    self.state.note_holder(user, node, alive)
        for b in sorted(fresh & mine):
            self.gaps[b] = UID_GAP if len(alive) > 1 else 0
            self._start_settling(b, alive, now)
        # Members that were not in our previous view may have stored and numbered
        # under another side's manager of our buckets (a merge can give a bucket back
        # to us at our old epoch, so it is not fresh): our buckets settle again until
        # their hints (with that side's UID marks) are in.
        if not booted:
            assert self.prev_live is not None
            came_in = alive - self.prev_live - {self.me}
            if came_in:
                for b in sorted(mine - fresh):
                    waiting = self.settling.setdefault(b, set())
                    waiting |= came_in
                    self.settle_at.setdefault(b, now + self.settle_timeout)
        self.to_pull = []
        if away and len(alive) > 1:
            self.to_pull = sorted(b for b in mine if new_map.epochs[b] != view)
            for b in self.to_pull:
                self.gaps[b] = UID_GAP
                if b not in fresh:
                    self._start_settling(b, alive, now)
        early, self.early = self.early, []
        for sender, hint, sent_in in early:
            out.extend(self.receive(sender, hint, sent_in, now=now))
        notes, self.early_notes = self.early_notes, []
        for user, node in notes:
            if self.state.manages(user) and node in alive:
                self.state.add_fragment(user, node)
        late, self.early_pending = self.early_pending, []
        for user, node in late:
            if self.state.manages(user) and node in alive:
                self.note_pending(user, node, now)
        # What to send (MailCluster._map_changed before issue 14 item 4).
        if away or booted:
            send = set(range(len(new_map)))  # no manager knows what we hold
        else:
            assert self.prev_live is not None
            came = alive - self.prev_live
            send = set(new_map.fresh(old_map)) | {
                b for b in range(len(new_map)) if new_map.owners[b] in came
            }
        prev = self.prev_live or {self.me}
        self.prev_live = alive
        order = tuple(sorted(b for b in send if new_map.owners[b]))
        if order:
            out.append(SendHints(new_map, order, view))
        if self.to_pull:
            for peer in sorted(alive - {self.me}):
                out.append(PullHints(peer, tuple(self.to_pull), view))
        # Holders that are back in the view stay away (reads of their users refused)
        # until their hint arrives; they may see no change and send none: ask them.
        back: dict[str, set[int]] = {}
        for user, nodes in self.state.away.items():
            for n in nodes & alive:
                back.setdefault(n, set()).add(self.bucket(user))
        for peer in sorted(back):
            wanted = tuple(sorted(back[peer] - set(self.to_pull)))
            if wanted and peer != self.me:
                out.append(PullHints(peer, wanted, view))
                if self.pull_missing_at is None:
                    self.pull_missing_at = now + self.settle_timeout
            elif peer == self.me:
                for b in back[peer]:
                    self.state.back(b, peer)
        came = alive - prev
        if came and prev & alive and self.me == min(prev & alive):
            out.append(PushProfiles(tuple(sorted(came))))
        return out

    def _start_settling(self, bucket: int, alive: set[str], now: float) -> None:
        self.settling[bucket] = set(alive)
        self.settle_at[bucket] = now + self.settle_timeout

    def _settle(self, bucket: int, now: float) -> list[Action]:
        self.settling.pop(bucket, None)
        self.settle_at.pop(bucket, None)
        if self.pending:
            self.kick(now)
        return [Settled(bucket)]

    # --- hints -----------------------------------------------------------------------

    def receive(
        self, sender: str, hint: BucketHint, view: int | None = None, *, now: float = 0.0
    ) -> list[Action]:
        """Merge one bucket's hint from ``sender``, sent in view epoch ``view``.

        Bucket epochs are not ordered across partitions (a merged map can keep an
        older lineage's entry), view epochs are: a hint from a newer view than ours
        is kept and replayed when we install that view; otherwise it counts only if
        our map has the same (owner, epoch) entry and the sender is a member (else it
        is dropped: its sender sees the bucket fresh and sends again).  ``view``
        None (an older peer) is taken as our own view."""
        b = hint.bucket
        if not 0 <= b < len(self.state.map):
            return []
        if view is not None and view > self.view_epoch:
            if len(self.early) < MAX_EARLY_HINTS:
                self.early.append((sender, hint, view))
            return []
        if (self.state.map.owners[b], self.state.map.epochs[b]) != (self.me, hint.epoch):
            return []
        if sender != self.me and sender not in self.members:
            return []
        self.hints_received += 1
        self.state.back(b, sender)
        gap = self.gaps.get(b, 0)
        for u in hint.users:
            if self.bucket(u.user) != b:
                continue
            if u.has_mail:
                self.state.add_fragment(u.user, sender)
            self.uidnext[u.user] = max(self.uidnext.get(u.user, 1), u.uidnext + gap)
            if u.unnumbered > 0:
                self.pending.setdefault(u.user, {})[sender] = u.unnumbered
            else:
                self.pending.get(u.user, {}).pop(sender, None)
        self.floor[b] = max(self.floor.get(b, 1), hint.mark)
        everyone = self.members | {self.me}
        heard = self.hint_from.setdefault(b, set())
        heard.add(sender)
        for user, node in hint.holders:
            if self.bucket(user) == b:
                self.state.note_holder(user, node, everyone)
                self.holders_seen.setdefault(user, set()).add(node)
                if (
                    node in everyone
                    and node != self.me
                    and node not in heard
                    and node not in self.state.fragment_list(user)
                ):
                    # A recorded holder in our view whose own hint has not come (a
                    # bridge can keep it from us while we kept the bucket: it stored
                    # and numbered under another side's manager, mailsim seed 197):
                    # away until its hint arrives, which we pull.
                    self.state.away.setdefault(user, set()).add(node)
                    if self.pull_missing_at is None:
                        self.pull_missing_at = now
        out: list[Action] = []
        late = self.missing.get(b)
        if late is not None:
            late.discard(sender)
            if not late:
                del self.missing[b]
        waiting = self.settling.get(b)
        if waiting is not None:
            waiting.discard(sender)
            if not waiting:
                out.extend(self._settle(b, now))
        if self.pending:
            self.kick(now)
        return out

    def pulled(
        self, peer: str, hints: Sequence[BucketHint], asked: Iterable[int]
    ) -> list[BucketHint]:
        """A pull's answer from ``peer``, as hints for our current map: its current hard
        state counts for whatever map we hold now (only buckets asked and ours)."""
        want = set(asked)
        bmap = self.state.map
        return [
            attrs.evolve(h, epoch=bmap.epochs[h.bucket])
            for h in hints
            if h.bucket in want and 0 <= h.bucket < len(bmap) and bmap.owners[h.bucket] == self.me
        ]

    def still_wanted(self, manager: str, hints: Sequence[BucketHint]) -> list[BucketHint]:
        """Of hints we sent ``manager``, those our current map still gives it at those
        epochs (a failed push is resent only for them)."""
        bmap = self.state.map
        return [
            h for h in hints if (bmap.owners[h.bucket], bmap.epochs[h.bucket]) == (manager, h.epoch)
        ]

    def pull_again(self, peer: str, buckets: Sequence[int], view: int) -> list[int]:
        """Buckets of a failed pull worth asking ``peer`` again (none once the view
        changed or ``peer`` left it)."""
        if self.view_epoch != view or peer not in self.members:
            return []
        return [b for b in buckets if self.state.map.owners[b] == self.me]

    # --- notes from deliveries ---------------------------------------------------------

    def add_fragment(self, user: str, node: str) -> bool:
        """A delivery stored mail for ``user`` on ``node``; True if we manage ``user``.
        A note for a user we do not manage (a proxy's map differs from ours) is kept
        until our next install and applied again then."""
        self.state.add_fragment(user, node)
        if not self.state.manages(user):
            if len(self.early_notes) < MAX_EARLY_HINTS:
                self.early_notes.append((user, node))
            return False
        return True

    def record_holder(self, user: str, node: str, lease: bool) -> tuple[int, str] | None:
        """Should a majority record that ``node`` holds ``user``'s mail (once per
        tenure)?  The (bucket, fence) to write, or None."""
        b = self.bucket(user)
        fence = self.fence(b)
        key = (user, node, fence)
        if key in self.recorded or not self.may_number(user, lease):
            return None
        if len(self.recorded) > 100_000:
            self.recorded.clear()
            self.confirmed.clear()
        self.recorded.add(key)
        return b, fence

    def holder_ok(self, user: str, node: str) -> bool:
        """Has a majority recorded, in this tenure, that ``node`` holds ``user``'s mail?
        A message gets a UID on a node only then (mail numbered on a node a later
        manager cannot know of would show up after the heal below UIDs shown)."""
        return (user, node, self.fence(self.bucket(user))) in self.confirmed

    def unrecorded(self, user: str) -> set[str]:
        """Nodes of ``user``'s fragment list no majority is known to have recorded as
        holders (added by a delivery's note or a hint's ``has_mail``, their record not
        confirmed yet): a numbered store goes there only after its record (else a
        manager on the other side of a partition, not knowing it, could show higher
        UIDs and this one would appear below them after the heal; mailsim seed 18)."""
        fence = self.fence(self.bucket(user))
        known = self.holders_seen.get(user, set())
        return {
            n
            for n in self.state.fragment_list(user)
            if n not in known and (user, n, fence) not in self.confirmed
        }

    def holder_recorded(self, user: str, node: str, fence: str, ok: bool) -> None:
        """The outcome of a :meth:`record_holder` write (a failed one is tried again)."""
        if not ok:
            self.recorded.discard((user, node, fence))
        else:
            if len(self.confirmed) > 100_000:
                self.confirmed.clear()
            self.confirmed.add((user, node, fence))

    def note_pending(self, user: str, node: str, now: float = 0.0) -> None:
        """A message for ``user`` was stored unnumbered on ``node``: ``node`` holds the
        user's mail, so it is in the fragment list too (the store's own note may be
        missing: a store that timed out after reaching the node still happens there,
        and the node's reminder is then the only word of it)."""
        if self.state.manages(user):
            self.state.add_fragment(user, node)
            have = self.pending.setdefault(user, {})
            have[node] = max(1, have.get(node, 0))
            self.kick(now)
        elif len(self.early_pending) < MAX_EARLY_HINTS:
            self.early_pending.append((user, node))  # our map may be behind

    # --- UIDs --------------------------------------------------------------------------

    def take(
        self,
        user: str,
        count: int,
        *,
        lease: bool,
        unfenced: bool = False,
        again: bool = True,
        numbering: bool = False,
        now: float = 0.0,
        track: bool = True,
        ttl: float | None = None,
    ) -> Taken | NeedMark | int:
        """``count`` UIDs for ``user`` below the bucket's granted mark, PENDING when we
        may not number, or :class:`NeedMark` (``again`` False: PENDING instead).

        While a numbering of ``user``'s waiting mail is in flight, a delivery
        (``numbering`` False) gets PENDING too: its UID would be above the block being
        numbered, and shown before that block lands (the pause test found it).

        Every UID range handed out is *outstanding* (:meth:`horizon`) until
        :meth:`confirm`, a numbering's answer, or :attr:`allocation_ttl` after ``now``
        (``track`` False: not at all; the node's APPEND/COPY, docs/mail.md; ``ttl``:
        another expiry, for allocations whose age the store checks)."""
        b = self.bucket(user)
        if not numbering and not unfenced and any(u == user for u, _ in self.numbering):
            self.pending_plans += 1
            return PENDING
        if not self.may_number(user, lease):
            if unfenced and self.state.manages(user):
                first = max(self.uidnext.get(user, 1), self.floor.get(b, 1))
                self.uidnext[user] = first + max(1, count)
                if track:
                    self._allocate(user, first, first + max(1, count), now, ttl)
                return Taken(first, "")
            self.pending_plans += 1
            return PENDING
        first = max(self.uidnext.get(user, 1), self.floor.get(b, 1))
        end = first + max(1, count)
        if end <= self.granted.get(b, 0):
            self.uidnext[user] = end
            if track:
                self._allocate(user, first, end, now, ttl)
            return Taken(first, "" if unfenced else self.fence(b))
        if not again:
            self.pending_plans += 1
            return PENDING
        return NeedMark(b, self.fence(b), end + MARK_BLOCK)

    def _allocate(
        self, user: str, first: int, end: int, now: float, ttl: float | None = None
    ) -> None:
        life = self.allocation_ttl if ttl is None else ttl
        self.allocated.setdefault(user, {})[first] = (end, now + life)

    def confirm(self, user: str, first: int) -> None:
        """The allocation starting at ``first`` landed (its store answered) or never
        will (abandoned): it no longer holds ``user``'s horizon back."""
        mine = self.allocated.get(user)
        if mine is not None:
            mine.pop(first, None)
            if not mine:
                del self.allocated[user]

    def horizon(self, user: str, now: float) -> Horizon:
        """What a reader may show of ``user``'s mail (:class:`Horizon`), with the
        fragment list of the same moment; expired allocations are dropped."""
        mine = self.allocated.get(user)
        if mine:
            for first, (_, expires) in list(mine.items()):
                if expires < now:
                    del mine[first]
            if not mine:
                del self.allocated[user]
        ranges = [(f, e) for f, (e, _) in (mine or {}).items()]
        top = self.uidnext.get(user, 1)
        return Horizon(_collapse(ranges, top), top)

    def mark_write(self, need: NeedMark) -> bool:
        """Start raising a mark; False if a raise of this bucket is already running
        (wait for its :meth:`mark_done`)."""
        if need.bucket in self.extending:
            return False
        self.extending.add(need.bucket)
        return True

    def mark_done(self, need: NeedMark, granted: bool, seen: int = 1) -> None:
        """A majority recorded ``need.target`` (``granted``) or could not.  ``seen``:
        the highest mark the asked nodes had before (their answers carry it): our UIDs
        start at or above it, whatever our hints said (a merge can give a bucket back
        to its old manager at its old entry while another side's manager numbered in
        it; mailsim seed 475)."""
        self.extending.discard(need.bucket)
        if self.fence(need.bucket) != need.fence:
            return
        self.floor[need.bucket] = max(self.floor.get(need.bucket, 1), seen)
        if granted:
            self.granted[need.bucket] = max(self.granted.get(need.bucket, 0), need.target)

    # --- numbering what waits -----------------------------------------------------------

    def kick(self, now: float, delay: float = 0.0) -> None:
        """Have the numbering loop run ``delay`` s from ``now`` (a pending sooner run
        stays; a run now replaces a later one)."""
        if self.number_at is not None and delay > 0:
            return
        self.number_at = now + delay

    def tick(self, now: float, *, lease: bool, number: bool = True) -> list[Action]:
        """Everything due at ``now``: settle timeouts, then the numbering loop
        (``number`` False: a shell that cannot number skips a due round)."""
        out: list[Action] = []
        for b in sorted(b for b, t in self.settle_at.items() if t <= now):
            missing = self.settling.get(b)
            if missing:
                self.missing[b] = set(missing)
                if self.pull_missing_at is None:
                    self.pull_missing_at = now
            out.extend(self._settle(b, now))
        if self.pull_missing_at is not None and self.pull_missing_at <= now:
            self.pull_missing_at = None
            per: dict[str, set[int]] = {}
            for b, peers in self.missing.items():
                if self.state.map.owners[b] == self.me:
                    for peer in peers & self.members - {self.me}:
                        per.setdefault(peer, set()).add(b)
            for user, nodes in self.state.away.items():  # back, hint not in yet
                for peer in nodes & self.members - {self.me}:
                    per.setdefault(peer, set()).add(self.bucket(user))
            for peer in sorted(per):
                out.append(PullHints(peer, tuple(sorted(per[peer])), self.view_epoch))
            if per:
                self.pull_missing_at = now + self.settle_timeout
        if self.number_at is not None and self.number_at <= now:
            self.number_at = None
            if not number:
                return out
            blocked = False
            for user in list(self.pending):
                for node, n in list(self.pending.get(user, {}).items()):
                    if any(u == user for u, _ in self.numbering):
                        continue  # one numbering per user at a time (blocks in order)
                    if node not in self.members or not self.may_number(user, lease):
                        blocked = True
                        continue
                    self.numbering.add((user, node))
                    out.append(Number(user, node, min(max(1, n), NUMBER_BATCH)))
            if blocked or self.numbering:
                self.kick(now, self.number_retry)
        return out

    def settled_by_timeout(self, bucket: int) -> set[str]:
        """Members whose hint had not arrived when ``bucket`` settled by timeout."""
        return set(self.missing.get(bucket, ()))

    def number_cancelled(self, user: str, node: str, now: float) -> None:
        """A :class:`Number` got no UIDs (lost the right, or no mark): later."""
        self.numbering.discard((user, node))
        self.kick(now, self.number_retry)

    def number_done(
        self,
        user: str,
        node: str,
        numbered: int,
        left: int,
        top: int,
        now: float,
        first: int | None = None,
    ) -> bool:
        """``node`` numbered ``numbered`` messages, ``left`` still wait, its highest
        UIDNEXT is ``top``.  True if a majority should record ``node`` as a holder.
        ``first``: the block's first UID, confirmed (the numbered ones are on ``node``,
        the rest of the block is never used)."""
        self.numbering.discard((user, node))
        if first is not None:
            self.confirm(user, first)
        self.numbered += numbered
        if not self.state.manages(user):
            return False
        self.uidnext[user] = max(self.uidnext.get(user, 1), top)
        # The node held unnumbered mail of ``user``: it holds mail, numbered now or by
        # an earlier call whose answer was lost (then ``numbered`` is 0 here).
        self.state.add_fragment(user, node)
        if left:
            self.pending.setdefault(user, {})[node] = left
            self.kick(now, 0.0 if numbered else self.number_retry)
        else:
            self.pending.get(user, {}).pop(node, None)
            if not self.pending.get(user):
                self.pending.pop(user, None)
            else:
                self.kick(now)  # the user's next node at once (one numbering at a time)
        return bool(numbered)

    def number_failed(self, user: str, node: str, now: float) -> None:
        """A :class:`Number` call failed: later."""
        self.numbering.discard((user, node))
        self.kick(now, self.number_retry)
