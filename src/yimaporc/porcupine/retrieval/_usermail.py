"""One authenticated user's mail: :class:`UserMail`, the state of a session's view
and what every layout shares (the fragment list, reads from one holder per
message, UID reservations, APPEND).  Where the mail is and how many copies it
has are its two strategies (:mod:`.interfaces`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from ...cluster.rpc import PeerUnavailable
from ..interfaces import IMailboxManager, IUserManager
from ..reconstruct import Horizon
from ..values import PENDING, Digest, MailboxInfo, NewMessage, Profile
from .interfaces import ICopyPolicy, IMailLayout

__all__ = ["APPEND_WAIT", "RESERVE_RETRY", "RESERVE_WAIT", "Retry", "UserMail", "nth_uid"]

#: APPEND/COPY whose user manager is out of reach ask again this often, for at most
#: RESERVE_WAIT seconds (about the failure detector's time to replace a silent
#: manager on a quiet cluster) before answering [UNAVAILABLE]: clients such as mbsync
#: take a NO to APPEND as final and never upload that message again.  mbsync's own
#: command timeout is 20 s.
RESERVE_RETRY = 0.5
RESERVE_WAIT = 10.0

#: A whole APPEND (the mailbox look-up, the reservation, the store) is tried again
#: for at most this long, counted from the command, while it fails before anything
#: was written (:meth:`UserMail.failover`): a paused manager costs a 10 s call
#: timeout, and the failure detector replaces it a few seconds later.  Below
#: mbsync's 20 s command timeout.
APPEND_WAIT = 16.0


class Retry(Exception):
    """``failure`` happened before anything was written: the attempt may be made
    again (:meth:`UserMail.failover`)."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.getErrorMessage())
        self.failure = failure


class UserMail:
    """One authenticated user's view of their mail across fragments."""

    log = Logger()

    def __init__(
        self,
        address: str,
        home: str,
        users: IUserManager,
        mailboxes: Callable[[str], IMailboxManager],
        layout: IMailLayout,
        copy_policy: ICopyPolicy,
        *,
        users_for: Callable[[str], IUserManager] | None = None,
        counts: Counter[str] | None = None,
    ) -> None:
        self.address = address
        self.home = home
        #: The manager found at login; with ``users_for`` it is looked up again on
        #: every use (:attr:`users`).
        self._users = users
        self._users_for = users_for
        self.managers = mailboxes
        #: Node-wide counters of what sessions were refused (shared by the node's
        #: sessions through :class:`~.RetrievalProxy`): ``validity_unknown``.
        self.counts: Counter[str] = counts if counts is not None else Counter()
        #: Where the mail is (:class:`~.HomeOnly`: this node alone).
        self.layout = layout
        #: How many copies a message has (:class:`~.SingleCopies`: one).
        self.copy_policy = copy_policy
        #: (mailbox, uid) -> further nodes holding a copy under the same UID
        self.twins: dict[tuple[str, int], list[str]] = {}
        #: With a clock, the fragment list is reused for ``fragments_ttl`` seconds
        #: (one IMAP command asks for mailboxes, then digests).
        self.now: Callable[[], float] | None = None
        #: With a reactor, a reservation whose manager is out of reach is asked again
        #: (:data:`RESERVE_WAIT`); ``counts["reserve_waits"]`` counts those waits.
        self.clock: IReactorTime | None = None
        self.fragments_ttl = 1.0
        self.node_cache: tuple[list[str], float] | None = None
        #: The last :meth:`nodes` answer came from ``node_cache`` (with its horizon).
        self.nodes_cached = False
        #: The serving node (cluster): it records the highest UIDNEXT it showed per
        #: mailbox, so UIDNEXT never goes back while a fragment is out of reach.
        self.local: str | None = None
        #: That node's record of them (``ILocalMailboxes.shown``; None: not kept).
        self.shown: Callable[[str, dict[str, tuple[int, int]]], Deferred[dict[str, int]]] | None = (
            None
        )
        #: Nodes holding some of this user's mail that did not answer (or that the
        #: manager knows left the view with mail): what is listed is incomplete.
        self.unreachable: set[str] = set()
        #: Mailboxes whose merged UIDNEXT was below one this node showed before.
        self.short: set[str] = set()
        #: The manager could not know every holder (no majority, hints missing).
        self.uncertain = False
        #: Messages sent back to be numbered afresh (two under one UID).
        self.renumbered = 0
        #: The manager's visibility horizon that came with the fragment list in use
        #: (issue 14 bug 3): nothing at or above an allocated UID not found yet is
        #: listed, nor a UIDNEXT above it.  None: an older manager, or no cluster.
        self.horizon: Horizon | None = None
        #: Messages found but held back by the horizon (listed at a later command).
        self.held_back = 0
        #: The bound the last listing was cut at (:meth:`Horizon.bound`).
        self.bound = 0
        #: With replication, the user's copies per message (from the profile): fewer
        #: holders out of reach than that leave every message a reachable copy.
        self.replicas = 1

    @property
    def users(self) -> IUserManager:
        """The user's manager now: the bucket's owner may change while a session lasts
        (a view change moves buckets), and a manager that lost the bucket answers
        [UNAVAILABLE] (``certain()``) where the new one answers (issue 18)."""
        if self._users_for is not None:
            return self._users_for(self.address)
        return self._users

    def incomplete(self, mailbox: str | None = None) -> list[str]:
        """Why the last listing (of ``mailbox``) may lack messages ([]: complete)."""
        out = (
            [f"mail on {n} out of reach" for n in sorted(self.unreachable)]
            if len(self.unreachable) >= self.replicas
            else []
        )
        if self.uncertain:
            out.append("no majority of the cluster in reach: other nodes may hold mail")
        out += [
            f"{m} lacks messages shown before"
            for m in sorted(self.short)
            if mailbox is None or m == mailbox
        ]
        return out

    def home_manager(self) -> IMailboxManager:
        """The mailbox manager of the user's home node."""
        return self.managers(self.home)

    def forget_nodes(self) -> None:
        """The fragment list may have changed: the next command asks the manager."""
        self.node_cache = None

    def nodes(self) -> Deferred[list[str]]:
        """The nodes holding the user's mail (home first), reused a moment with a clock."""
        now = self.now() if self.now is not None else None
        if self.node_cache is not None and now is not None and self.node_cache[1] > now:
            self.nodes_cached = True
            return succeed(list(self.node_cache[0]))
        self.nodes_cached = False
        # The manager asked is the one whose certainty, horizon and away list count:
        # ``self.users`` looked up again when the answer comes may be the bucket's new
        # owner after a map change (a proxy never asked: certain by default), which
        # made an old owner's empty, uncertain answer a complete listing (sim.mail
        # seed 49 with deliveries handed to managers).
        users = self.users

        def merge(frags: tuple[str, ...]) -> list[str]:
            nodes = [self.home, *(n for n in frags if n != self.home)]
            self.uncertain = not users.certain(self.address)
            self.horizon = users.horizon_of(self.address)
            # Nodes that left the view holding mail: asked too (they fail while away).
            nodes += [n for n in users.away_of(self.address) if n not in nodes]
            if now is not None:
                self.node_cache = (nodes, now + self.fragments_ttl)
            return nodes

        return users.fragments(self.address).addCallback(merge)

    def replicas_of(self) -> Deferred[int]:
        """The user's R (from the profile)."""

        def got(profile: Profile | None) -> int:
            if profile is not None:
                self.replicas = max(1, profile.replicas)
            return self.replicas

        return self.users.profile(self.address).addCallback(got)

    # --- the layout's part: the mailbox tree, listings, mailbox changes ------------

    def mailboxes(self) -> Deferred[list[MailboxInfo]]:
        """Every mailbox with its counters (merged over the fragments in a cluster)."""
        return self.layout.mailboxes(self)

    def open_mailbox(
        self, mailbox: str, complete: bool = True
    ) -> Deferred[tuple[list[MailboxInfo], list[Digest]]]:
        """:meth:`mailboxes` and :meth:`digests` of ``mailbox`` together, as a SELECT,
        STATUS or POP3 login wants them, asking each fragment node once (``view``:
        one RPC per remote node where two calls took two)."""
        return self.layout.open_mailbox(self, mailbox, complete)

    def create(self, name: str, absent: bool = False) -> Deferred[MailboxInfo]:
        """CREATE (on the home node; MailboxExists if any fragment has it).  ``absent``:
        the caller has just seen the merged tree without ``name`` (no fragment asked
        again)."""
        return self.layout.create(self, name, absent)

    def delete_mailbox(self, name: str) -> Deferred[None]:
        """DELETE (on every node holding the mailbox)."""
        return self.layout.delete_mailbox(self, name)

    def rename(self, old: str, new: str) -> Deferred[None]:
        """RENAME (on every node holding ``old``)."""
        return self.layout.rename(self, old, new)

    def subscribe(self, name: str, on: bool) -> Deferred[None]:
        """SUBSCRIBE / UNSUBSCRIBE."""
        return self.layout.subscribe(self, name, on)

    def digests(self, mailbox: str, complete: bool = False) -> Deferred[list[Digest]]:
        """The mailbox's messages over all fragments, by UID.  ``complete`` (SELECT,
        a POP3 login): ``MailUnavailable`` rather than a listing that lacks mail out
        of reach (a syncing client would take the missing ones as expunged)."""
        return self.layout.digests(self, mailbox, complete)

    def copy(
        self, mailbox: str, digests: Sequence[Digest], dest: str, deadline: float | None = None
    ) -> Deferred[list[Digest]]:
        """COPY within each node's fragment (in a cluster: read, then store at home
        under fresh UIDs from the user manager, whose reservation waits at most until
        ``deadline``)."""
        return self.layout.copy(self, mailbox, digests, dest, deadline)

    # --- messages: one holder per message --------------------------------------------

    def by_node(self, digests: Sequence[Digest], mailbox: str = "") -> dict[str, list[int]]:
        """The UIDs of ``digests`` per node holding them (every copy's node too)."""
        out: dict[str, list[int]] = {}
        for d in digests:
            out.setdefault(d.node, []).append(d.uid)
            for n in self.twins.get((mailbox, d.uid), ()):
                out.setdefault(n, []).append(d.uid)
        return out

    def _holders_of(self, mailbox: str, d: Digest) -> list[str]:
        """Nodes holding ``d`` (its copies too), in the copy policy's read order."""
        nodes = list(dict.fromkeys([d.node, *self.twins.get((mailbox, d.uid), ())]))
        return self.copy_policy.read_order(self, nodes) if len(nodes) > 1 else nodes

    def on_one_holder(
        self,
        mailbox: str,
        digests: Sequence[Digest],
        op: Callable[[IMailboxManager, list[int]], Deferred[Any]],
    ) -> Deferred[list[Any]]:
        """Run ``op`` for each message on one holder, the next holder if that fails;
        the results of the calls that succeeded (a message no holder answered for
        fails the whole call)."""
        plans = {d.uid: self._holders_of(mailbox, d) for d in digests}

        def round_(pending: dict[int, list[str]], results: list[Any]) -> Deferred[list[Any]]:
            by_node: dict[str, list[int]] = {}
            for uid, nodes in pending.items():
                by_node.setdefault(nodes[0], []).append(uid)
            items = list(by_node.items())
            ds = [op(self.managers(node), uids) for node, uids in items]

            def done(outcome: list[tuple[bool, Any]]) -> Deferred[list[Any]] | list[Any]:
                again: dict[int, list[str]] = {}
                for (node, uids), (ok, got) in zip(items, outcome, strict=True):
                    if ok:
                        results.append(got)
                        continue
                    for uid in uids:
                        rest = pending[uid][1:]
                        if not rest:
                            got.raiseException()
                        again[uid] = rest
                    self.log.warn(
                        "{u}: {n} failed ({e}); trying another replica",
                        u=self.address,
                        n=node,
                        e=got.getErrorMessage(),
                    )
                return round_(again, results) if again else results

            return DeferredList(ds, consumeErrors=True).addCallback(done)

        return round_(plans, []) if plans else succeed([])

    def fetch(self, mailbox: str, digests: Sequence[Digest]) -> Deferred[dict[int, bytes]]:
        """Bodies by UID, each from one node holding it (the least loaded one if loads
        are known), another holder if that read fails."""

        def merge(parts: list[dict[int, bytes]]) -> dict[int, bytes]:
            out: dict[int, bytes] = {}
            for p in parts:
                out.update(p)
            return out

        return self.on_one_holder(
            mailbox, digests, lambda m, uids: m.fetch(self.address, mailbox, uids)
        ).addCallback(merge)

    def set_flags(
        self,
        mailbox: str,
        digests: Sequence[Digest],
        flags: Sequence[str],
        mode: int,
        unchanged_since: int | None = None,
    ) -> Deferred[dict[int, tuple[str, ...]]]:
        """STORE on each node (with replication on one holder per message); the new
        flags by UID.  With ``unchanged_since`` (CONDSTORE) each node leaves alone, and
        out of the answer, its messages whose MODSEQ is above it."""

        def merge(parts: list[dict[int, tuple[str, ...]]]) -> dict[int, tuple[str, ...]]:
            out: dict[int, tuple[str, ...]] = {}
            for p in parts:
                out.update(p)
            return out

        # only when asked: a manager without CONDSTORE keeps its old signature
        extra = {} if unchanged_since is None else {"unchanged_since": unchanged_since}
        return self.copy_policy.set_flags(self, mailbox, digests, flags, mode, extra).addCallback(
            merge
        )

    def tombstones(self, mailbox: str) -> Deferred[dict[int, int]]:
        """``{uid: modseq}`` of the expunges of ``mailbox`` the fragment nodes remember
        (for a UID remembered on several nodes, the highest).  A node that does not
        answer adds nothing: QRESYNC then reports those UIDs as vanished, which is
        never wrong (see :mod:`._modseq`)."""

        def ask(nodes: list[str]) -> Deferred[dict[int, int]]:
            ds = [self.managers(n).tombstones(self.address, mailbox) for n in nodes]

            def merge(results: list[tuple[bool, Any]]) -> dict[int, int]:
                out: dict[int, int] = {}
                for ok, got in results:
                    if not ok:
                        continue
                    for uid, modseq in got.items():
                        out[uid] = max(out.get(uid, 0), modseq)
                return out

            return DeferredList(ds, consumeErrors=True).addCallback(merge)

        return self.nodes().addCallback(ask)

    def delete(self, mailbox: str, digests: Sequence[Digest]) -> Deferred[list[int]]:
        """Remove messages; nodes left with nothing of the user leave the fragment list."""
        return self.copy_policy.delete(self, mailbox, digests)

    # --- APPEND: UIDs reserved, stored as the layout says ------------------------------

    def failover(self, attempt: Callable[[float], Deferred[Any]]) -> Deferred[Any]:
        """``attempt(deadline)`` again every RESERVE_RETRY s, until APPEND_WAIT after
        the first, while it fails with :class:`Retry` (nothing written: a node out of
        reach that the failure detector will replace); other failures, and the last
        one, pass unwrapped.  Counts ``append_waits`` / ``append_wait_lapsed``."""
        clock = self.clock
        if clock is None:
            return attempt(0.0).addErrback(_unwrap)
        deadline = clock.seconds() + APPEND_WAIT

        def go() -> Deferred[Any]:
            return attempt(deadline).addErrback(again)

        def again(f: Failure) -> Any:
            if not f.check(Retry):
                return f
            if clock.seconds() + RESERVE_RETRY > deadline:
                self.counts["append_wait_lapsed"] += 1
                return _unwrap(f)
            self.counts["append_waits"] += 1
            return deferLater(clock, RESERVE_RETRY, go)

        return go()

    def reserve(self, count: int, deadline: float | None = None) -> Deferred[tuple[int, str]]:
        """UIDs for APPEND/COPY: ``(first, fence)``.  In a cluster, a fenced (and, with
        a synced clock, timed) allocation the manager tracks in the visibility horizon
        until the store's holder note confirms it (issue 14 item 4), like a delivery's;
        a node alone (its plan says "the storing node numbers": UID 0, no fence) takes
        them from the plain counter, unfenced."""
        clock = self.clock
        if deadline is None:
            deadline = clock.seconds() + RESERVE_WAIT if clock is not None else 0.0

        def got(p: tuple[tuple[str, ...], int, str]) -> Any:
            if p[1] == 0 and not p[2]:
                return self.users.reserve_uids(self.address, count).addCallback(lambda f: (f, ""))
            return (p[1], p[2])

        def attempt() -> Deferred[Any]:
            d: Deferred[Any] = self.users.delivery_plan(self.address, count).addCallback(got)
            return d.addErrback(again)

        def again(f: Failure) -> Any:
            # The manager is out of reach (killed, paused, cut off): the view change
            # gives the bucket a new one, which :attr:`users` finds.  A plan that did
            # reach it only allocated UIDs, which expire unused: asking again is safe.
            if clock is None or not f.check(PeerUnavailable):
                return f
            if clock.seconds() + RESERVE_RETRY > deadline:
                self.counts["reserve_wait_lapsed"] += 1
                return f
            self.counts["reserve_waits"] += 1
            return deferLater(clock, RESERVE_RETRY, attempt)

        return attempt()

    def confirm(self, node: str, first: int) -> Deferred[Any]:
        """``add_fragment`` that also confirms the allocation starting at ``first``
        (it leaves the horizon; a manager with no horizon ignores ``first``)."""
        return self.users.add_fragment(self.address, node, first=first if first > 0 else 0)

    def stored_at_home(self, d: Deferred[list[Digest]], first: int) -> Deferred[list[Digest]]:
        """After ``d``, a store at home: the fragment list is stale, and the holder note
        confirms the reservation starting at ``first``."""

        def stored(digests: list[Digest]) -> Deferred[list[Digest]]:
            self.forget_nodes()
            d: Deferred[Any] = self.confirm(self.home, first)
            return d.addCallback(lambda _: digests)

        return d.addCallback(stored)

    def append(
        self,
        mailbox: str,
        body: bytes,
        flags: Sequence[str],
        date: float,
        deadline: float | None = None,
    ) -> Deferred[Digest]:
        """APPEND: stored on the home fragment."""

        def store(r: tuple[int, str]) -> Deferred[Digest]:
            first, fence = r
            msg = NewMessage(self.address, mailbox, body, tuple(flags), date, first, fence)
            return self.layout.store(self, mailbox, [msg], first).addCallback(lambda ds: ds[0])

        return self.reserve(1, deadline).addCallback(store)

    def append_many(
        self,
        mailbox: str,
        items: Sequence[tuple[bytes, Sequence[str], float]],
        deadline: float | None = None,
    ) -> Deferred[list[Digest]]:
        """MULTIAPPEND: ``(body, flags, date)`` stored on the home fragment in one
        store (every body written, then the index rows committed together), under
        consecutive reserved UIDs."""

        def build(first: int, fence: str) -> list[NewMessage]:
            return [
                NewMessage(self.address, mailbox, b, tuple(f), when, nth_uid(first, i), fence)
                for i, (b, f, when) in enumerate(items)
            ]

        return self.reserve(len(items), deadline).addCallback(
            lambda r: self.layout.store(self, mailbox, build(*r), r[0])
        )


def _unwrap(f: Failure) -> Failure:
    return f.value.failure if isinstance(f.value, Retry) else f


def nth_uid(first: int, i: int) -> int:
    """The UID of the ``i``-th message of a reservation starting at ``first`` (0: the
    storing node numbers; PENDING stays PENDING)."""
    if first in (0, PENDING):
        return first
    return first + i
