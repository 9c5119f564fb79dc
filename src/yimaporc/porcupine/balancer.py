"""Porcupine's delivery load balancer (seed §5), sans-IO.

Every delivery proxy keeps its own :class:`LoadBalancer`: there is no central
service.  It learns other nodes' *load* from RPC replies and from a periodic
exchange (:meth:`LoadBalancer.observe`) and hears about failed calls
(:meth:`LoadBalancer.failed`).  For one message it picks the node(s) to store
on (:meth:`LoadBalancer.choose`), balancing load against *affinity*:

* the candidates are the user's current fragment nodes (they already hold the
  user's mail) that are live and have not failed recently;
* if there are fewer than ``max(spread_limit, replicas)`` of them, the least
  loaded other live nodes are added until there are (the user's spread grows,
  but never past the limit this way);
* the spread widens beyond the limit only under *failure* (the fragment nodes
  are down, so the free places are refilled from other nodes) or *imbalance*
  (the best candidate's load exceeds ``imbalance`` times the least loaded
  node's load plus :data:`IMBALANCE_SLACK`), when the cluster's least loaded
  nodes join the candidates;
* the ``replicas`` least loaded candidates win; ties are broken by a hash of
  node id, this balancer's node id and a per-call counter, so equal nodes take
  turns, deterministically.

A node whose load is unknown or older than ``stale_after`` seconds counts as
the average of the fresh figures.  Each choice adds one pending operation to
the chosen nodes' figures until their next report, so a burst of deliveries
between two load reports does not pile onto one node.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from zope.interface import implementer

from .interfaces import ILoadBalancer

#: How much lighter a node must be, in absolute pending operations, before
#: imbalance widens a user's spread (keeps tiny loads from counting as skew).
IMBALANCE_SLACK = 4.0

#: Weight of the recent operation rate (ops/s) in :func:`load_figure`.
RATE_WEIGHT = 0.1

#: Seconds a node is avoided after a failed call (unless it reports load again).
FAIL_AVOID = 10.0


def load_figure(pending: int, recent_rate: float = 0.0) -> float:
    """A node's load: its pending disk operations (seed §5), plus a little of its recent rate.

    ``pending`` is the number of disk operations queued or in progress (message
    stores, fetches, deletions); ``recent_rate`` the node's disk operations per
    second over the last few seconds, weighted by :data:`RATE_WEIGHT` (a node
    doing 10 ops/s counts as one more pending operation), which keeps a busy
    node that happens to be momentarily idle from looking free.  Never negative.
    """
    return max(0, pending) + RATE_WEIGHT * max(0.0, recent_rate)


@implementer(ILoadBalancer)
class LoadBalancer:
    """One node's view of everyone's load, and the store-node choice for deliveries."""

    def __init__(
        self,
        me: str,
        *,
        spread_limit: int = 2,
        imbalance: float = 2.0,
        stale_after: float = 30.0,
    ) -> None:
        if spread_limit < 1:
            raise ValueError("spread_limit must be at least 1")
        if imbalance < 1.0:
            raise ValueError("imbalance must be at least 1.0")
        self.me = me
        self.spread_limit = spread_limit
        self.imbalance = imbalance
        self.stale_after = stale_after
        self._loads: dict[str, tuple[float, float]] = {}  # node -> (reported load, when)
        self._picks: dict[str, int] = {}  # node -> our choices since its last report
        self._failed: dict[str, float] = {}  # node -> avoid until
        self._calls = 0
        self.widened_imbalance = 0
        self.widened_failure = 0
        #: This node's own load figure, read when choosing (``NodeLoad.load``: its
        #: stores in progress are counted there, so none are added as picks); None:
        #: known like any other node's (reports, else the average, plus picks).
        self.own_load: Callable[[], float] | None = None
        #: Choices where ``prefer`` went first though another candidate was lighter.
        self.preferred = 0

    def observe(self, node: str, load: float, now: float) -> None:
        """``node`` reported ``load`` (see :func:`load_figure`) at ``now``; it is reachable."""
        self._loads[node] = (max(0.0, float(load)), now)
        self._picks.pop(node, None)
        self._failed.pop(node, None)

    def failed(self, node: str, now: float) -> None:
        """A call to ``node`` failed at ``now``: avoid it for :data:`FAIL_AVOID` seconds."""
        self._failed[node] = now + FAIL_AVOID

    def load_of(self, node: str, now: float) -> float:
        """The load assumed for ``node``: its report (unknown or stale: the average of
        fresh reports) plus the messages we sent it since."""
        if node == self.me and self.own_load is not None:
            return max(0.0, float(self.own_load()))
        entry = self._loads.get(node)
        if entry is not None and now - entry[1] <= self.stale_after:
            base = entry[0]
        else:
            base = self._average(now)
        return base + self._picks.get(node, 0)

    def _average(self, now: float) -> float:
        fresh = [load for load, t in self._loads.values() if now - t <= self.stale_after]
        return sum(fresh) / len(fresh) if fresh else 0.0

    def _usable(self, node: str, now: float) -> bool:
        until = self._failed.get(node)
        return until is None or now >= until

    def choose(
        self,
        live: Sequence[str],
        fragments: Sequence[str],
        replicas: int,
        now: float,
        prefer: str | None = None,
    ) -> list[str]:
        """The ``replicas`` nodes to store the next message of a user on, best first.

        ``live`` are the current members, ``fragments`` the user's fragment list.
        Returns fewer nodes only if fewer live nodes exist (an empty list if none).
        ``prefer`` (the delivering node itself): it takes a free place of the spread
        before the least loaded others, unless imbalance would widen the spread
        against it, and it is chosen first among the candidates while its load is
        within :data:`IMBALANCE_SLACK` of the least loaded one's (a store there
        needs no call between nodes).
        """
        self._calls += 1
        members = list(dict.fromkeys(live))
        if replicas < 1 or not members:
            return []
        usable = [n for n in members if self._usable(n, now)]
        if not usable:
            # Every live node failed recently: trying one beats refusing mail.
            usable = members
        usable_set = set(usable)
        load = {n: self.load_of(n, now) for n in usable}
        salt = f"{self.me}:{self._calls}:".encode()

        def key(n: str) -> tuple[float, bytes, str]:
            return (load[n], hashlib.blake2b(salt + n.encode(), digest_size=8).digest(), n)

        held = list(dict.fromkeys(fragments))
        candidates = [n for n in held if n in usable_set]
        want = max(self.spread_limit, replicas)
        # Places held by fragment nodes that are down or failing are refilled:
        # this is the only way the spread grows past the limit, apart from imbalance.
        lost = sum(1 for n in held if n not in usable_set)
        others = sorted((n for n in usable if n not in candidates), key=key)
        room = want - len(candidates)
        fits = prefer is not None and prefer in usable_set
        if room > 0:
            fill = others[:room]
            if (
                fits
                and prefer in others
                and prefer not in fill
                and load[prefer] <= self.imbalance * load[others[0]] + IMBALANCE_SLACK
            ):
                fill = [prefer, *others[: room - 1]]
            if lost and len(held) + len(fill) > want:
                self.widened_failure += 1
            candidates += fill
            others = [n for n in others if n not in fill]
        if candidates and others:
            best = min(load[n] for n in candidates)
            floor = load[others[0]]
            if best > self.imbalance * floor + IMBALANCE_SLACK:
                self.widened_imbalance += 1
                candidates += [n for n in others[:replicas] if load[n] < best]
        ranked = sorted(candidates, key=key)
        if fits and prefer in ranked and ranked[0] != prefer:
            if load[prefer] <= load[ranked[0]] + IMBALANCE_SLACK:
                ranked.remove(prefer)
                ranked.insert(0, prefer)
                self.preferred += 1
        chosen = ranked[:replicas]
        for n in chosen:
            self._picks[n] = self._picks.get(n, 0) + 1
        return chosen

    def status(self) -> dict[str, Any]:
        """JSON-able view: settings, known loads, nodes being avoided, widening counts."""
        return {
            "me": self.me,
            "spread_limit": self.spread_limit,
            "imbalance": self.imbalance,
            "imbalance_slack": IMBALANCE_SLACK,
            "stale_after": self.stale_after,
            "loads": {
                n: {"load": round(v, 3), "seen": t, "picks": self._picks.get(n, 0)}
                for n, (v, t) in sorted(self._loads.items())
            },
            "avoiding": {n: until for n, until in sorted(self._failed.items())},
            "widened_imbalance": self.widened_imbalance,
            "widened_failure": self.widened_failure,
            "preferred": self.preferred,
        }
