"""This node's load figure and its exchange (moved out of ``cluster.py``).

Every store reply carries the storing node's load (disk work in progress there),
and every ``load_interval`` seconds each node swaps its load with a few random live
members (``porcupine.load``); both feed the delivery proxy's
:class:`~yimaporc.porcupine.balancer.LoadBalancer`.  :class:`NodeLoad` counts the
work and runs the exchange; :class:`CountingMailboxes` is this node's mailbox
manager with its disk work counted.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from ._passthrough import PassThroughMailboxes
from .balancer import load_figure
from .interfaces import ILoadBalancer, ILocalMailboxes
from .values import Digest, NewMessage

#: Peers each node swaps load figures with per ``load_interval`` (random ones), so
#: the exchange costs the same per node whatever the cluster's size.
LOAD_FANOUT = 3


class NodeLoad:
    """Disk work in progress on this node, the recent rate, and the periodic swap of
    load figures with a few live peers.

    ``exchange_with(peer, my_load) -> Deferred[their load]`` makes one swap (the
    cluster's ``porcupine.load`` call); ``live()`` names the current members.
    """

    def __init__(
        self,
        me: str,
        clock: IReactorTime,
        balancer: ILoadBalancer,
        live: Callable[[], list[str]],
        exchange_with: Callable[[str, float], Deferred[float]],
        rng: random.Random,
    ) -> None:
        self.me = me
        self.clock = clock
        self.balancer = balancer
        self.live = live
        self.exchange_with = exchange_with
        self.rng = rng
        self.inflight = 0
        #: More disk work waiting here, counted in the load (replication's queue).
        self.pending_work: list[Callable[[], int]] = []
        self._stores = 0
        self._rate = 0.0
        self._rate_since = float(clock.seconds())

    def load(self) -> float:
        """This node's load figure: disk work in progress here (stores, fetches,
        deletions, flag changes, and replicated updates waiting to be written), plus
        a little of the recent rate (:func:`~yimaporc.porcupine.balancer.load_figure`)."""
        extra = sum(f() for f in self.pending_work)
        return load_figure(self.inflight + extra, self._rate)

    def track(self, work: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        """Run ``work`` (disk work on this node), counted in the load while it runs."""
        self.inflight += 1
        self._stores += 1

        def done(result: Any) -> Any:
            self.inflight -= 1
            return result

        try:
            d = work()
        except BaseException:
            self.inflight -= 1
            raise
        return d.addBoth(done)

    def observe(self, node: str, load: float) -> None:
        """``node`` reported ``load`` (a store reply or an exchange)."""
        self.balancer.observe(node, load, float(self.clock.seconds()))

    def on_exchange(self, node: str, load: float) -> float:
        """A peer's half of the swap: note its figure, answer ours."""
        self.observe(node, load)
        return self.load()

    def exchange(self) -> None:
        """One round: update the rate, swap figures with up to :data:`LOAD_FANOUT`
        random live peers (a failed swap tells the balancer)."""
        now = float(self.clock.seconds())
        if now > self._rate_since:
            self._rate = self._stores / (now - self._rate_since)
        self._stores, self._rate_since = 0, now
        peers = [n for n in self.live() if n != self.me]
        for n in self.rng.sample(peers, min(LOAD_FANOUT, len(peers))):
            d = self.exchange_with(n, self.load())
            d.addCallbacks(
                lambda load, n=n: self.observe(n, load),
                lambda f, n=n: self.balancer.failed(n, float(self.clock.seconds())),
            )


class CountingMailboxes(PassThroughMailboxes):
    """This node's mailbox manager, counting stores in progress (the load figure)."""

    def __init__(self, inner: ILocalMailboxes, meter: NodeLoad) -> None:
        super().__init__(inner)
        self.meter = meter

    def store(self, messages: Sequence[NewMessage]) -> Deferred[list[Digest]]:
        """Store, counting it in :attr:`NodeLoad.inflight`."""
        return self.meter.track(lambda: self.inner.store(messages))

    # Retrievals, deletions and flag changes are disk work too (seed §5's load):
    # counted like stores while they run.  Everything else (the tree, listings,
    # expunge tombstones) passes through uncounted.

    def fetch(self, user: str, mailbox: str, uids: Sequence[int]) -> Deferred[dict[int, bytes]]:
        """Read bodies, counted in the load."""
        return self.meter.track(lambda: self.inner.fetch(user, mailbox, uids))

    def set_flags(
        self,
        user: str,
        mailbox: str,
        uids: Sequence[int],
        flags: Sequence[str],
        mode: int,
        unchanged_since: int | None = None,
    ) -> Deferred[dict[int, tuple[str, ...]]]:
        """Change flags, counted in the load."""
        return self.meter.track(
            lambda: self.inner.set_flags(user, mailbox, uids, flags, mode, unchanged_since)
        )

    def delete(self, user: str, mailbox: str, uids: Sequence[int]) -> Deferred[list[int]]:
        """Delete messages, counted in the load."""
        return self.meter.track(lambda: self.inner.delete(user, mailbox, uids))

    def copy(
        self, user: str, mailbox: str, uids: Sequence[int], dest: str
    ) -> Deferred[list[Digest]]:
        """Copy messages, counted in the load."""
        return self.meter.track(lambda: self.inner.copy(user, mailbox, uids, dest))
