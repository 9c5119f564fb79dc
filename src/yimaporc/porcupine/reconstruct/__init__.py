"""Soft-state reconstruction and UID numbering of a user manager, sans-IO (issue 14).

One core, run by the node (:class:`~yimaporc.porcupine.cluster.ClusterUserManager`
and :class:`~yimaporc.porcupine.cluster.MailCluster` perform its actions over
AMP) and by the simulator (the bench's mail cost model (``bench/mailmodel/mailsim.py``) performs them over
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

The package, floor by floor: ``_fences`` (timings, fences, the store-side rules),
``_horizon`` (:class:`Horizon`), ``_hints`` (the hint and its codec), ``_actions``
(what the core asks of its shell, :class:`MajorityWrite`); the core itself,
:class:`Reconstruction`, in three floors: ``_state`` (soft state, quorum, the read
lease), ``_hinting`` (maps installed, hints received, holder notes) and ``_core``
(UIDs, marks, the horizon, the numbering loop).
"""

from ._actions import (
    Action,
    MajorityWrite,
    NeedMark,
    Number,
    PullHints,
    PushProfiles,
    SendHints,
    Settled,
    Taken,
)
from ._core import (
    Reconstruction,
)
from ._fences import (
    ALLOCATION_TTL,
    HEDGE_DELAY,
    HEDGE_MAX,
    LAPSED_PER_USER,
    LAPSED_USERS,
    LEASE,
    MARK_BLOCK,
    MARK_TIMEOUT,
    MAX_EARLY_HINTS,
    MAX_HOLDERS,
    NODE_ALLOCATION_TTL,
    NODE_ANSWER_TTL,
    NODE_PLAN_TTL,
    NODE_READ_LEASE,
    NODE_TIMED_ALLOCATION_TTL,
    NUMBER_BATCH,
    NUMBER_RETRY,
    PAUSE_GRACE,
    PLAN_TTL,
    PULL_RETRY,
    PULL_TRIES,
    READ_LEASE,
    READ_RENEW,
    READ_WAIT,
    REPLICATED_ALLOCATION_TTL,
    SWEEP_INTERVAL,
    UID_GAP,
    admit_fenced,
    admit_timed,
    fence_of,
    has_majority,
    split_fence,
    timed_fence,
)
from ._hints import (
    BucketHint,
    MalformedHint,
    UserHint,
    decode_hints,
)
from ._horizon import (
    HORIZON_AGE,
    MAX_OUTSTANDING,
    Horizon,
)

__all__ = [
    "ALLOCATION_TTL",
    "HEDGE_DELAY",
    "HEDGE_MAX",
    "HORIZON_AGE",
    "LAPSED_PER_USER",
    "LAPSED_USERS",
    "LEASE",
    "MARK_BLOCK",
    "MARK_TIMEOUT",
    "MAX_EARLY_HINTS",
    "MAX_HOLDERS",
    "MAX_OUTSTANDING",
    "NODE_ALLOCATION_TTL",
    "NODE_ANSWER_TTL",
    "NODE_PLAN_TTL",
    "NODE_READ_LEASE",
    "NODE_TIMED_ALLOCATION_TTL",
    "NUMBER_BATCH",
    "NUMBER_RETRY",
    "PAUSE_GRACE",
    "PLAN_TTL",
    "PULL_RETRY",
    "PULL_TRIES",
    "READ_LEASE",
    "READ_RENEW",
    "READ_WAIT",
    "REPLICATED_ALLOCATION_TTL",
    "SWEEP_INTERVAL",
    "UID_GAP",
    "Action",
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
    "decode_hints",
    "fence_of",
    "has_majority",
    "split_fence",
    "timed_fence",
]
