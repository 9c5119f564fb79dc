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
from zope.interface import implementer

from .balancer import load_figure
from .interfaces import ILoadBalancer, ILocalMailboxes
from .values import Digest, MailboxInfo, NewMessage

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
        clock: Any,
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


@implementer(ILocalMailboxes)
class CountingMailboxes:
    """This node's mailbox manager, counting stores in progress (the load figure)."""

    def __init__(self, inner: ILocalMailboxes, meter: NodeLoad) -> None:
        self.inner = inner
        self.meter = meter
        self.node_id = inner.node_id

    def store(self, messages: Sequence[NewMessage]) -> Deferred[list[Digest]]:
        """Store, counting it in :attr:`NodeLoad.inflight`."""
        return self.meter.track(lambda: self.inner.store(messages))

    # Retrievals, deletions and flag changes are disk work too (seed §5's load):
    # counted like stores while they run.

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

    def tombstones(self, user: str, mailbox: str) -> Deferred[dict[int, int]]:
        """Expunges remembered (a read: not counted in the load)."""
        return self.inner.tombstones(user, mailbox)

    def delete(self, user: str, mailbox: str, uids: Sequence[int]) -> Deferred[list[int]]:
        """Delete messages, counted in the load."""
        return self.meter.track(lambda: self.inner.delete(user, mailbox, uids))

    def copy(
        self, user: str, mailbox: str, uids: Sequence[int], dest: str
    ) -> Deferred[list[Digest]]:
        """Copy messages, counted in the load."""
        return self.meter.track(lambda: self.inner.copy(user, mailbox, uids, dest))

    # --- passed through unchanged ----------------------------------------------------

    def mailboxes(self, user: str) -> Deferred[list[MailboxInfo]]:
        """See :class:`IMailboxManager`."""
        return self.inner.mailboxes(user)

    def create_mailbox(self, user: str, name: str) -> Deferred[MailboxInfo]:
        """See :class:`IMailboxManager`."""
        return self.inner.create_mailbox(user, name)

    def delete_mailbox(self, user: str, name: str) -> Deferred[None]:
        """See :class:`IMailboxManager`."""
        return self.inner.delete_mailbox(user, name)

    def rename_mailbox(self, user: str, old: str, new: str) -> Deferred[None]:
        """See :class:`IMailboxManager`."""
        return self.inner.rename_mailbox(user, old, new)

    def subscribe(self, user: str, name: str, subscribed: bool) -> Deferred[None]:
        """See :class:`IMailboxManager`."""
        return self.inner.subscribe(user, name, subscribed)

    def digests(self, user: str, mailbox: str) -> Deferred[list[Digest]]:
        """See :class:`IMailboxManager`."""
        return self.inner.digests(user, mailbox)

    def view(
        self, user: str, mailbox: str
    ) -> Deferred[tuple[list[MailboxInfo], list[Digest] | None]]:
        """See :class:`IMailboxManager`."""
        return self.inner.view(user, mailbox)

    def remove_user(self, user: str) -> Deferred[None]:
        """See :class:`IMailboxManager`."""
        return self.inner.remove_user(user)

    def users_in_bucket(self, bucket: int) -> Deferred[list[str]]:
        """See :class:`IMailboxManager`."""
        return self.inner.users_in_bucket(bucket)

    def demote(self, user: str, mailbox: str, uid: int, key: str) -> Deferred[bool]:
        """See :class:`IMailboxManager`."""
        return self.inner.demote(user, mailbox, uid, key)

    def shown(self, user: str, marks: dict[str, tuple[int, int]]) -> Deferred[dict[str, int]]:
        """See :class:`ILocalMailboxes`."""
        return self.inner.shown(user, marks)

    def number_pending(
        self, user: str, fence: str, first: int, count: int
    ) -> Deferred[tuple[int, int, int]]:
        """See :class:`IMailboxManager`."""
        return self.inner.number_pending(user, fence, first, count)
