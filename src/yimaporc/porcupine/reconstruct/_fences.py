"""The protocol's timings and its fences: the constants every manager and store
share, and the store-side rules every node's hard state follows
(:func:`admit_fenced`, :func:`admit_timed`)."""

from __future__ import annotations

from collections.abc import Iterable

from ...cluster.buckets import BucketMap
from ..values import PENDING

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


#: A manager's read that finds only its read lease lapsed waits at most this long
#: for the next renewal before answering uncertain (``ClusterUserManager.read_wait``):
#: a loaded node's renewal round trip can exceed the lease's 1 s margin (0.1-core
#: nodes at 4-8 nodes refused 10-30 % of POP3 sessions that way).
READ_WAIT = 2.0


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


#: A replicated user's delivery holds its allocation this long: its copies are
#: replicated before the holder note that confirms it, which takes longer than an
#: R=1 store.  A note that comes after the allocation left the horizon expired gets
#: no 250 (``Reconstruction.confirm``; a coordinator paused after committing its
#: copy, docs/chaos.md case B), so this bounds only how long a lost delivery holds
#: newer mail back, and how slow a replicated delivery may be before it answers 451.
REPLICATED_ALLOCATION_TTL = 2 * NODE_TIMED_ALLOCATION_TTL


#: How many lapsed allocations (expired before their holder note) a manager
#: remembers per user, and for how many users (oldest forgotten first).
LAPSED_PER_USER = 64
LAPSED_USERS = 4096


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
