"""The hint exchange of the soft-state reconstruction (moved out of ``cluster.py``).

On each user-map change every node sends the new managers of the fresh buckets what
its hard state says (``porcupine.hints``: users with mail, their highest UIDNEXT,
the bucket's profile records, its UID mark and holder records), one directory read
per bucket; a node that was *away* also pulls (``porcupine.hints-request``) the
buckets it manages from every member.  :class:`HintExchange` carries out those
sends and answers both commands; the decisions are the reconstruction core's
(:mod:`~yimaporc.porcupine.reconstruct`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..cluster.buckets import BucketMap
from ._cluster_commands import Hints, HintsRequest, ProfilePut
from ._cluster_profiles import ProfileReplicator
from ._cluster_users import ClusterUserManager
from .profiledb import ProfileDB, Record
from .reconstruct import (
    PULL_RETRY,
    PULL_TRIES,
    Action,
    BucketHint,
    PullHints,
    PushProfiles,
    SendHints,
    UserHint,
)
from .usermap import N_BUCKETS

if TYPE_CHECKING:
    from .fragments import FragmentStore


class HintExchange:
    """Sends this node's hints, pulls others', pushes profile records for
    anti-entropy, and answers ``porcupine.hints`` / ``porcupine.hints-request``.

    ``call(node, command, **kw)`` runs a command on a member; ``live()`` names the
    view's members; ``view_epoch()`` is this node's view epoch; ``run_blocking(f,
    *args)`` runs disk reads off the reactor.
    """

    log = Logger()

    def __init__(
        self,
        me: str,
        clock: IReactorTime,
        call: Callable[..., Deferred[Any]],
        live: Callable[[], list[str]],
        view_epoch: Callable[[], int],
        user_manager: ClusterUserManager,
        replicator: ProfileReplicator,
        fragment_store: FragmentStore,
        profiles: ProfileDB,
        run_blocking: Callable[..., Deferred[Any]],
    ) -> None:
        self.me = me
        self.reactor = clock
        self.call = call
        self.live = live
        self.view_epoch = view_epoch
        self.user_manager = user_manager
        self.replicator = replicator
        self.fragment_store = fragment_store
        self.profiles = profiles
        self.run_blocking = run_blocking
        self.hint_rounds: list[dict[str, Any]] = []
        #: (peer, bucket, view) of pulls in flight, and the buckets not asked again
        #: because one was (the core asks again for away holders at once, while the
        #: install's pull of the same buckets is unanswered).
        self.pulling: set[tuple[str, int, int]] = set()
        self.pulls_joined = 0

    def perform(self, actions: list[Action]) -> None:
        """Carry out the reconstruction core's sends over AMP."""
        for a in actions:
            if isinstance(a, SendHints):
                self.send_hints(a.bmap, set(a.buckets), a.view)
            elif isinstance(a, PullHints):
                self.pull_hints(a.peer, list(a.buckets), a.view)
            elif isinstance(a, PushProfiles):
                self.push_all_profiles(list(a.nodes))

    def push_all_profiles(self, nodes: list[str]) -> Deferred[None]:
        """Anti-entropy for nodes that (re)appeared: every profile record we hold.

        Only the lowest-id node of each side of a join sends, so a join costs one
        copy of the profile table per side, not one per node."""

        def send(by_bucket: dict[int, list[Record]]) -> Deferred[Any]:
            records = [r for rs in by_bucket.values() for r in rs]
            ds = [self.call(n, ProfilePut, records=records) for n in nodes if n != self.me]
            return DeferredList(ds, consumeErrors=True)

        d = self.profiles.records_in_buckets(list(range(N_BUCKETS))).addCallback(send)
        d.addErrback(lambda f: self.log.failure("profile anti-entropy push failed", f))
        return d.addCallback(lambda _: None)

    def _hint_entries(self, bmap: BucketMap, buckets: list[int]) -> Deferred[list[BucketHint]]:
        """Our hard state of ``buckets`` as hints (one directory read and one profile
        query per bucket), epochs from ``bmap``."""
        store = self.fragment_store

        def read() -> list[tuple[int, dict[str, tuple[bool, int, int]], int, list[list[str]]]]:
            return [
                (b, store.uid_marks(b), store.bucket_mark(b), store.bucket_holders(b))
                for b in buckets
            ]

        d1 = self.run_blocking(read)
        d2 = self.profiles.records_in_buckets(buckets)

        def build(results: list[Any]) -> list[BucketHint]:
            (_, marks), (_, records) = results
            return [
                BucketHint(
                    b,
                    bmap.epochs[b],
                    tuple(UserHint(u, m, n, p) for u, (m, n, p) in sorted(users.items())),
                    tuple(tuple(r) for r in records.get(b, [])),
                    mark,
                    tuple((str(h[0]), str(h[1])) for h in holders),
                )
                for b, users, mark, holders in marks
            ]

        d = DeferredList([d1, d2], fireOnOneErrback=True, consumeErrors=True)
        return d.addCallback(build)

    def send_hints(
        self, new: BucketMap, buckets: set[int], view: int | None = None
    ) -> Deferred[None]:
        """Read our hard state of ``buckets`` and send each new manager its part,
        tagged with our view epoch ``view`` (default: the current one)."""
        started = float(self.reactor.seconds())
        order = sorted(b for b in buckets if new.owners[b])
        sent_in = self.view_epoch() if view is None else view

        def send(hints: list[BucketHint]) -> Deferred[None]:
            per: dict[str, list[BucketHint]] = {}
            for h in hints:
                per.setdefault(new.owners[h.bucket], []).append(h)
            ds = []
            for manager, mine in per.items():
                if manager == self.me:
                    ds.append(self._apply_hints(self.me, mine, sent_in))
                else:
                    ds.append(self._push(manager, mine, sent_in))
            self.hint_rounds.append(
                {"epoch": max(new.epochs), "buckets": len(order), "managers": len(per)}
            )
            del self.hint_rounds[:-20]

            def done(results: list[tuple[bool, Any]]) -> None:
                failed = [m for m, (ok, _) in zip(per, results, strict=True) if not ok]
                if failed:
                    self.log.warn("hints to {m} failed", m=failed)
                self.log.info(
                    "user map: hints for {n} buckets sent to {k} managers in {t:.3f}s",
                    n=len(order),
                    k=len(per),
                    t=float(self.reactor.seconds()) - started,
                )

            return DeferredList(ds, consumeErrors=True).addCallback(done)

        d = self._hint_entries(new, order).addCallback(send)
        d.addErrback(lambda f: self.log.failure("sending reconstruction hints failed", f))
        return d

    def _push(
        self, manager: str, hints: list[BucketHint], view: int, tries: int = PULL_TRIES
    ) -> Deferred[Any]:
        """One ``porcupine.hints`` call; on failure resent (``PULL_TRIES`` times,
        ``PULL_RETRY`` s apart) while ``manager`` is live and our map still gives it
        those buckets at those epochs."""

        def failed(f: Failure) -> Failure:
            still = self.user_manager.core.still_wanted(manager, hints)
            if tries > 1 and still and manager in self.live():
                self.reactor.callLater(PULL_RETRY, self._repush, manager, still, view, tries - 1)
            return f

        d = self.call(manager, Hints, sender=self.me, hints=hints, view=view)
        return d.addErrback(failed)

    def _repush(self, manager: str, hints: list[BucketHint], view: int, tries: int) -> None:
        d = self._push(manager, hints, view, tries)
        d.addErrback(
            lambda f: self.log.warn("hints to {m} failed: {e}", m=manager, e=f.getErrorMessage())
        )

    def pull_hints(
        self, peer: str, buckets: list[int], view: int, tries: int = PULL_TRIES
    ) -> Deferred[None]:
        """Ask ``peer`` for its hints of ``buckets`` (ours; we were away) and merge the
        answer as a hint for our current map. Retried (``PULL_TRIES`` times,
        ``PULL_RETRY`` s apart) while ``peer`` is a member and the view is ``view``.
        Buckets whose pull from ``peer`` in ``view`` is in flight are not asked again:
        that answer (or its failure's retry) serves them."""
        um = self.user_manager
        asked = [b for b in buckets if (peer, b, view) not in self.pulling]
        self.pulls_joined += len(buckets) - len(asked)
        if not asked:
            return succeed(None)
        keys = {(peer, b, view) for b in asked}
        self.pulling |= keys

        def got(r: dict[str, Any]) -> Deferred[Any]:
            ours = um.core.pulled(peer, r["hints"], asked)
            return self._apply_hints(peer, ours, um.core.view_epoch)

        def failed(f: Failure) -> None:
            still = um.core.pull_again(peer, asked, view)
            if tries > 1 and still:
                self.reactor.callLater(PULL_RETRY, self.pull_hints, peer, still, view, tries - 1)
            else:
                self.log.warn("pulling hints from {p} failed: {e}", p=peer, e=f.getErrorMessage())

        def landed(result: Any) -> Any:
            self.pulling -= keys
            return result

        d = self.call(peer, HintsRequest, sender=self.me, buckets=asked)
        return d.addCallbacks(got, failed).addBoth(landed).addCallback(lambda _: None)

    def on_hints_request(self, sender: str, buckets: tuple[int, ...]) -> Deferred[dict[str, Any]]:
        """``porcupine.hints-request``: our hints of ``buckets`` (checked by
        :class:`~._cluster_wire.BucketList`)."""
        d = self._hint_entries(self.user_manager.state.map, list(buckets))
        return d.addCallback(lambda hints: {"hints": hints})

    def _apply_hints(
        self, sender: str, hints: list[BucketHint], view: int | None = None
    ) -> Deferred[dict[str, Any]]:
        records: list[Any] = [r for h in hints for r in h.records]  # checked by ProfileDB.merge

        def apply(_: object) -> dict[str, Any]:
            for h in hints:
                self.user_manager.receive(sender, h, view)
            return {}

        d: Deferred[Any] = self.replicator.receive(records) if records else succeed(None)
        d.addErrback(lambda f: self.log.failure("merging hinted profiles failed", f))
        return d.addCallback(apply)

    def on_hints(
        self, sender: str, hints: list[BucketHint], view: int | None = None
    ) -> Deferred[dict[str, Any]]:
        """``porcupine.hints``: merge ``sender``'s hints (decoded by
        :class:`~._cluster_wire.HintList`, malformed entries dropped)."""
        return self._apply_hints(sender, hints, view)
