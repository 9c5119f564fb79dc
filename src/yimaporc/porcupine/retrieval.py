"""The retrieval proxy (seed §2.3.2): one user's mail, over all their fragments.

:class:`RetrievalProxy` authenticates through the user's manager, learns the
fragment list, and hands out a :class:`UserMail`, which asks the mailbox
manager of each fragment node for digests, merges them, and routes fetches,
flag changes and deletions to the node holding each message.  When a node's
last message of the user goes, the node leaves the fragment list.

The IMAP mailbox tree (names, UIDVALIDITY, UID counters) lives on the user's
*home* fragment, this node in a cluster of one.  In a cluster (``cluster=True``)
the home is chosen by the cluster (``home_of``), the tree shown is the union of
the trees of the home and every fragment node (UIDVALIDITY the lowest, UIDNEXT
the highest of them), UIDs come from the user manager's per-user counter
(``reserve_uids``) so they ascend over all fragments, and a message stored on
several nodes under one UID (replicas) is listed once; see docs/mail.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, DeferredList, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from .interfaces import ILocalMailboxes, IMailboxManager, IUserManager
from .reconstruct import Horizon
from .values import (
    INBOX,
    PENDING,
    Digest,
    MailboxExists,
    MailboxInfo,
    MailUnavailable,
    NewMessage,
    NoSuchMailbox,
    Profile,
)

_log = Logger()

_T = TypeVar("_T")


class UserMail:
    """One authenticated user's view of their mail across fragments."""

    log = Logger()

    def __init__(
        self,
        address: str,
        home: str,
        users: IUserManager,
        mailboxes: Callable[[str], IMailboxManager],
        cluster: bool = False,
    ) -> None:
        self.address = address
        self.home = home
        self.users = users
        self.managers = mailboxes
        self.cluster = cluster
        # (mailbox, uid) -> further nodes holding a copy under the same UID
        self._copies: dict[tuple[str, int], list[str]] = {}
        #: With a clock, the fragment list is reused for ``fragments_ttl`` seconds
        #: (one IMAP command asks for mailboxes, then digests).
        self.now: Callable[[], float] | None = None
        self.fragments_ttl = 1.0
        self._node_cache: tuple[list[str], float] | None = None
        #: The last :meth:`_nodes` answer came from ``_node_cache`` (with its horizon).
        self._nodes_cached = False
        #: With replication (issue 8): each message is read from its least-loaded
        #: holder (``load_of``; another holder if that read fails), and a flag change
        #: or deletion goes to one holder, whose logged update reaches the others.
        self.replicated = False
        self.load_of: Callable[[str], float] | None = None
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
        #: Replication's hooks (``MailReplication``, issue 14): for a user with
        #: ``replicas >= 2``, APPEND and COPY store through the update log on R nodes
        #: like deliveries, and CREATE/RENAME/DELETE are logged mailbox objects that
        #: reach holders that are down now when they return.  Every frontend using
        #: this class gets that; None: plain stores at home.
        self.replica: Any = None

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

    def _home(self) -> IMailboxManager:
        return self.managers(self.home)

    def _nodes(self) -> Deferred[list[str]]:
        now = self.now() if self.now is not None else None
        if self._node_cache is not None and now is not None and self._node_cache[1] > now:
            self._nodes_cached = True
            return succeed(list(self._node_cache[0]))
        self._nodes_cached = False

        def merge(frags: tuple[str, ...]) -> list[str]:
            nodes = [self.home, *(n for n in frags if n != self.home)]
            self.uncertain = not self.users.certain(self.address)
            self.horizon = self.users.horizon_of(self.address)
            # Nodes that left the view holding mail: asked too (they fail while away).
            nodes += [n for n in self.users.away_of(self.address) if n not in nodes]
            if now is not None:
                self._node_cache = (nodes, now + self.fragments_ttl)
            return nodes

        return self.users.fragments(self.address).addCallback(merge)

    # --- the mailbox tree (home fragment) -----------------------------------

    def _ask_all(
        self, ask: Callable[[IMailboxManager], Deferred[Any]]
    ) -> Deferred[list[tuple[str, Any]]]:
        """``ask`` every node (home first); a fragment node that fails is left out
        (logged), a failing home fails the call."""

        def go(nodes: list[str]) -> Deferred[list[tuple[str, Any]]]:
            ds = [ask(self.managers(n)) for n in nodes]

            def done(results: list[tuple[bool, Any]]) -> list[tuple[str, Any]]:
                out = []
                self.unreachable = set()
                for n, (ok, got) in zip(nodes, results, strict=True):
                    if ok:
                        out.append((n, got))
                    elif n == self.home or isinstance(got.value, NoSuchMailbox):
                        got.raiseException()
                    else:
                        self.unreachable.add(n)
                        self.log.info(
                            "mail of {u} on {n} out of reach: {e}",
                            u=self.address,
                            n=n,
                            e=got.getErrorMessage(),
                        )
                return out

            return DeferredList(ds, consumeErrors=True).addCallback(done)

        return self._nodes().addCallback(go)

    def _trees(self) -> Deferred[list[tuple[str, list[MailboxInfo]]]]:
        return self._ask_all(lambda m: m.mailboxes(self.address))

    def mailboxes(self) -> Deferred[list[MailboxInfo]]:
        """Every mailbox with its counters (merged over the fragments in a cluster)."""
        if not self.cluster:
            return self._home().mailboxes(self.address)
        return self._trees().addCallback(self._tree_of)

    def _tree_of(self, trees: list[tuple[str, list[MailboxInfo]]]) -> Deferred[list[MailboxInfo]]:
        """The merged tree shown to the client, from each node's tree."""
        d = self._inbox_validity(_merge_trees(trees))
        d.addCallback(self._below_horizon_next)
        return d.addCallback(self._monotonic)

    def open_mailbox(
        self, mailbox: str, complete: bool = True
    ) -> Deferred[tuple[list[MailboxInfo], list[Digest]]]:
        """:meth:`mailboxes` and :meth:`digests` of ``mailbox`` together, as a SELECT,
        STATUS or POP3 login wants them, asking each fragment node once (``view``:
        one RPC per remote node where two calls took two)."""
        if not self.cluster:
            return self.mailboxes().addCallback(
                lambda infos: self.digests(mailbox, complete).addCallback(lambda ds: (infos, ds))
            )
        want = INBOX if mailbox.upper() == INBOX else mailbox

        def ask(m: IMailboxManager) -> Deferred[tuple[list[MailboxInfo], list[Digest] | None]]:
            return m.view(self.address, want)

        def split(
            results: list[tuple[str, tuple[list[MailboxInfo], list[Digest] | None]]],
        ) -> Deferred[tuple[list[MailboxInfo], list[Digest]]]:
            parts = []
            for node, (_, digests) in results:
                if digests is None:
                    if node == self.home:
                        raise NoSuchMailbox(f"no mailbox {want}")
                    digests = []  # a fragment node may lack a mailbox the home has
                parts.append((node, digests))
            merged = self._merge_parts(want, parts)

            def both(infos: list[MailboxInfo]) -> tuple[list[MailboxInfo], list[Digest]]:
                # after the tree: it notes mailboxes shown shorter than before
                return infos, self._check_complete(merged, want) if complete else merged

            return self._tree_of([(n, t) for n, (t, _) in results]).addCallback(both)

        return self._fresh_if_held(lambda: self._ask_all(ask).addCallback(split))

    def _below_horizon_next(
        self, infos: list[MailboxInfo]
    ) -> Deferred[list[MailboxInfo]] | list[MailboxInfo]:
        """UIDNEXT no higher than the horizon's bound: a client syncing from UIDNEXT
        would skip a UID still in flight when it lands.  The bound depends on which
        allocated UIDs are found: with allocations outstanding, INBOX (where
        deliveries and numbering go) is listed first; if that fails, the lowest
        outstanding UID counts as not found."""
        h = self.horizon
        if h is None:
            return infos

        def cap(bound: int) -> list[MailboxInfo]:
            return [attrs.evolve(i, uidnext=min(i.uidnext, bound)) for i in infos]

        if not h.outstanding:
            return cap(h.next)

        def found(_: list[Digest]) -> int:
            return self.bound

        def unknown(_: Failure) -> int:
            return h.bound(())

        return self._merged_digests(INBOX).addCallbacks(found, unknown).addCallback(cap)

    def _below_horizon(self, digests: list[Digest]) -> list[Digest]:
        """Of a merged listing, what the horizon lets a client see (docs/mail.md,
        "The visibility horizon"); when it holds some back, the next command asks
        the manager afresh instead of reusing the cached fragment list."""
        h = self.horizon
        if h is None:
            return digests
        bound = self.bound = h.bound(d.uid for d in digests)
        kept = [d for d in digests if d.uid < bound]
        if len(kept) < len(digests):
            self.held_back += len(digests) - len(kept)
            self._node_cache = None
        return kept

    def _inbox_validity(self, infos: list[MailboxInfo]) -> Deferred[list[MailboxInfo]]:
        """INBOX's UIDVALIDITY is the profile's creation second, the same on every node
        whichever fragments answer (a fragment's own value depends on when and where
        its INBOX row was made, and on that node's clock)."""

        def fix(profile: Profile | None) -> list[MailboxInfo]:
            if profile is not None and self.replicated:
                self.replicas = max(1, profile.replicas)
            if profile is None or profile.created < 1:
                return infos
            v = int(profile.created)
            return [attrs.evolve(i, uidvalidity=v) if i.name == INBOX else i for i in infos]

        return self.users.profile(self.address).addCallback(fix)

    def _monotonic(self, infos: list[MailboxInfo]) -> Deferred[list[MailboxInfo]]:
        """UIDNEXT at least what this node showed before (recorded on its disk)."""
        shown = self.shown
        if shown is None:
            return succeed(infos)

        def fix(top: dict[str, int]) -> list[MailboxInfo]:
            self.short = {i.name for i in infos if top.get(i.name, 0) > i.uidnext}
            return [attrs.evolve(i, uidnext=max(i.uidnext, top.get(i.name, 0))) for i in infos]

        marks = {i.name: (i.uidvalidity, i.uidnext) for i in infos}
        d: Deferred[dict[str, int]] = shown(self.address, marks)
        return d.addCallback(fix)

    def _holders(self, name: str) -> Deferred[list[str]]:
        """Nodes whose tree has mailbox ``name`` (exact)."""
        want = INBOX if name.upper() == INBOX else name
        return self._trees().addCallback(
            lambda trees: [n for n, infos in trees if any(i.name == want for i in infos)]
        )

    def create(self, name: str, absent: bool = False) -> Deferred[MailboxInfo]:
        """CREATE (on the home node; MailboxExists if any fragment has it).  ``absent``:
        the caller has just seen the merged tree without ``name`` (no fragment asked
        again)."""
        if not self.cluster:
            return self._home().create_mailbox(self.address, name)

        def check(holders: list[str]) -> Deferred[MailboxInfo]:
            if holders:
                raise MailboxExists(f"mailbox {name} already exists")
            return self._home().create_mailbox(self.address, name)

        d = check([]) if absent else self._holders(name.rstrip("/")).addCallback(check)
        return self._log_boxes(d, lambda: [(name.rstrip("/"), True, None, None)])

    def _on_holders(
        self, name: str, op: Callable[[IMailboxManager], Deferred[Any]]
    ) -> Deferred[None]:
        def run(holders: list[str]) -> Deferred[None]:
            if not holders:
                raise NoSuchMailbox(f"no mailbox {name}")
            ds = [op(self.managers(n)) for n in holders]
            return gatherResults(ds, consumeErrors=True).addCallbacks(lambda _: None, _unwrap)

        return self._holders(name).addCallback(run)

    def delete_mailbox(self, name: str) -> Deferred[None]:
        """DELETE (on every node holding the mailbox)."""
        if not self.cluster or name.upper() == INBOX:
            return self._home().delete_mailbox(self.address, name)
        d = self._on_holders(name, lambda m: m.delete_mailbox(self.address, name))
        return self._log_boxes(d, lambda: [(name, False, None, None)])

    def rename(self, old: str, new: str) -> Deferred[None]:
        """RENAME (on every node holding ``old``)."""
        if not self.cluster:
            return self._home().rename_mailbox(self.address, old, new)

        def check(holders: list[str]) -> Deferred[None]:
            if holders:
                raise MailboxExists(f"mailbox {new} already exists")
            return self._on_holders(old, lambda m: m.rename_mailbox(self.address, old, new))

        d = self._holders(new.rstrip("/")).addCallback(check)
        target = new.rstrip("/")
        return self._log_boxes(d, lambda: [(target, True, old, None), (old, False, None, target)])

    def _log_boxes(
        self,
        done: Deferred[Any],
        ops: Callable[[], list[tuple[str, bool, str | None, str | None]]],
    ) -> Deferred[Any]:
        """After a mailbox change made on the holders in reach: log it (replicated
        users) as mailbox objects to every holder, so one down now, or one that
        answered late, makes the same change when it is back.  The command's answer
        waits for the change to be durable in this node's log."""
        if self.replica is None or not self.cluster:
            return done

        def log(result: Any) -> Deferred[Any]:
            def go(r: int) -> Deferred[Any] | Any:
                if r < 2:
                    return result
                # the holders (home, fragments, away) and the R nodes new messages go to
                more = list(self.replica.choose(self.home, r))
                d = self._nodes().addCallback(
                    lambda ns: self.replica.box_ops(self.address, ops(), [self.home, *ns, *more])
                )
                return d.addCallback(lambda _: result)

            return self._replicas_of().addCallback(go)

        return done.addCallback(log)

    def _replicas_of(self) -> Deferred[int]:
        """The user's R (from the profile)."""

        def got(profile: Profile | None) -> int:
            if profile is not None:
                self.replicas = max(1, profile.replicas)
            return self.replicas

        return self.users.profile(self.address).addCallback(got)

    def subscribe(self, name: str, on: bool) -> Deferred[None]:
        """SUBSCRIBE / UNSUBSCRIBE."""
        if not self.cluster:
            return self._home().subscribe(self.address, name, on)
        return self._on_holders(name, lambda m: m.subscribe(self.address, name, on))

    # --- messages (every fragment) ------------------------------------------

    def digests(self, mailbox: str, complete: bool = False) -> Deferred[list[Digest]]:
        """The mailbox's messages over all fragments, by UID.  ``complete`` (SELECT,
        a POP3 login): ``MailUnavailable`` rather than a listing that lacks mail out
        of reach (a syncing client would take the missing ones as expunged)."""

        if self.cluster:
            d = self._merged_digests(mailbox)
            if complete:
                d.addCallback(self._check_complete, INBOX if mailbox.upper() == INBOX else mailbox)
            return d

        def ask(nodes: list[str]) -> Deferred[list[Digest]]:
            ds = [self.managers(n).digests(self.address, mailbox) for n in nodes]
            return gatherResults(ds, consumeErrors=True).addCallback(
                lambda parts: sorted((d for part in parts for d in part), key=lambda d: d.uid)
            )

        return self._nodes().addCallback(ask)

    def _check_complete(self, digests: list[Digest], mailbox: str) -> list[Digest]:
        why = self.incomplete(mailbox)
        if why:
            raise MailUnavailable(
                "[UNAVAILABLE] part of this mailbox is out of reach (" + "; ".join(why) + "),"
                " try again later"
            )
        return digests

    def _merged_digests(self, mailbox: str) -> Deferred[list[Digest]]:
        def tolerant(m: IMailboxManager) -> Deferred[list[Digest]]:
            # A fragment node may lack a mailbox the home has: nothing of it there.
            def missing(f: Failure) -> list[Digest]:
                f.trap(NoSuchMailbox)
                if m.node_id == self.home:
                    f.raiseException()
                return []

            return m.digests(self.address, mailbox).addErrback(missing)

        return self._fresh_if_held(
            lambda: self._ask_all(tolerant).addCallback(lambda p: self._merge_parts(mailbox, p))
        )

    def _fresh_if_held(self, listing: Callable[[], Deferred[_T]]) -> Deferred[_T]:
        """Run ``listing``; if the horizon that came with a *cached* fragment list held
        messages back (the manager's counter has moved on since, e.g. another session's
        APPEND), list once more with a fresh answer from the manager, so a command shows
        what landed before it rather than at the next command."""
        held = self.held_back
        d = listing()

        def again(out: _T) -> _T | Deferred[_T]:
            if self._nodes_cached and self.held_back > held:
                return listing()
            return out

        return d.addCallback(again)

    def _merge_parts(self, mailbox: str, parts: list[tuple[str, list[Digest]]]) -> list[Digest]:
        """One listing from each node's digests of ``mailbox``."""
        # Copies of one message (replicas) share UID, size and internal date:
        # listed once.  Two different messages under one UID (numbered on two
        # sides of a partition before either noticed, or older data) are never
        # both listed (a client cannot tell them apart: UID FETCH would pair
        # one's flags with the other's body): the oldest keeps the UID, the
        # others go back to unnumbered and their manager numbers them afresh,
        # above every UID shown (hidden only until then).
        seen: dict[int, list[Digest]] = {}
        for _, part in parts:
            for d in part:
                same = seen.setdefault(d.uid, [])
                # replicated copies share their key (the object's id) as well
                twin = next(
                    (
                        x
                        for x in same
                        if (x.size, x.internal_date) == (d.size, d.internal_date)
                        or (x.key == d.key and x.size == d.size)
                    ),
                    None,
                )
                if twin is not None and twin.node != d.node:
                    self._copies.setdefault((mailbox, d.uid), []).append(d.node)
                elif twin is None:
                    same.append(d)
        out = []
        for u in sorted(seen):
            keep, *extra = sorted(seen[u], key=lambda x: (x.internal_date, x.node, x.key))
            out.append(keep)
            for d in extra:
                self._renumber(mailbox, d)
        return self._below_horizon(out)

    def _renumber(self, mailbox: str, d: Digest) -> None:
        """``d`` shares its UID with another message: back to unnumbered on its node,
        and its manager told (fire and forget: the next listing tries again)."""
        self.log.warn(
            "{u}: two messages under UID {n}; the one on {node} is numbered afresh",
            u=self.address,
            n=d.uid,
            node=d.node,
        )
        self.renumbered += 1
        dd: Deferred[Any] = self.managers(d.node).demote(self.address, mailbox, d.uid, d.key)
        note = self.users.note_pending
        dd.addCallback(lambda ok: note(self.address, d.node) if ok else None)
        dd.addErrback(lambda f: self.log.warn("renumbering failed: {e}", e=f.getErrorMessage()))

    def _by_node(self, digests: Sequence[Digest], mailbox: str = "") -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for d in digests:
            out.setdefault(d.node, []).append(d.uid)
            for n in self._copies.get((mailbox, d.uid), ()):
                out.setdefault(n, []).append(d.uid)
        return out

    def _holders_of(self, mailbox: str, d: Digest) -> list[str]:
        """Nodes holding ``d`` (its copies too), the least loaded first."""
        nodes = list(dict.fromkeys([d.node, *self._copies.get((mailbox, d.uid), ())]))
        if self.load_of is not None and len(nodes) > 1:
            load_of = self.load_of
            nodes.sort(key=lambda n: load_of(n))  # stable: the listed node wins ties
        return nodes

    def _on_one_holder(
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

        return self._on_one_holder(
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
        if self.replicated:
            return self._on_one_holder(
                mailbox,
                digests,
                lambda m, uids: m.set_flags(self.address, mailbox, uids, flags, mode, **extra),
            ).addCallback(merge)
        ds = [
            self.managers(node).set_flags(self.address, mailbox, uids, flags, mode, **extra)
            for node, uids in self._by_node(digests, mailbox).items()
        ]
        return gatherResults(ds, consumeErrors=True).addCallback(merge)

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

        return self._nodes().addCallback(ask)

    def delete(self, mailbox: str, digests: Sequence[Digest]) -> Deferred[list[int]]:
        """Remove messages; nodes left with nothing of the user leave the fragment list."""
        if self.replicated:
            return self._delete_replicated(mailbox, digests)
        by_node = self._by_node(digests, mailbox)
        ds = [
            self.managers(node).delete(self.address, mailbox, uids)
            for node, uids in by_node.items()
        ]

        def done(parts: list[list[int]]) -> Deferred[list[int]]:
            self._node_cache = None
            checks = [self._maybe_leave(node) for node in by_node if node != self.home]
            removed = sorted({u for p in parts for u in p})
            return DeferredList(checks, consumeErrors=True).addCallback(_log_failures, removed)

        return gatherResults(ds, consumeErrors=True).addCallback(done)

    def _delete_replicated(self, mailbox: str, digests: Sequence[Digest]) -> Deferred[list[int]]:
        """One holder per message makes the deletion a logged update (tombstone)."""
        d = self._on_one_holder(
            mailbox, digests, lambda m, uids: m.delete(self.address, mailbox, uids)
        )

        def done(parts: list[list[int]]) -> list[int]:
            self._node_cache = None
            for dig in digests:
                self._copies.pop((mailbox, dig.uid), None)
            return sorted({u for p in parts for u in p})

        return d.addCallback(done)

    def _maybe_leave(self, node: str) -> Deferred[None]:
        def check(mboxes: list[MailboxInfo]) -> Deferred[None] | None:
            if sum(m.messages for m in mboxes) == 0:
                return self.users.remove_fragment(self.address, node)
            return None

        return self.managers(node).mailboxes(self.address).addCallback(check)

    def copy(self, mailbox: str, digests: Sequence[Digest], dest: str) -> Deferred[list[Digest]]:
        """COPY within each node's fragment (in a cluster: read, then store at home
        under fresh UIDs from the user manager)."""
        if self.cluster:
            return self.fetch(mailbox, digests).addCallback(self._copy_to_home, digests, dest)
        ds = [
            self.managers(node).copy(self.address, mailbox, uids, dest)
            for node, uids in self._by_node(digests).items()
        ]
        return gatherResults(ds, consumeErrors=True).addCallback(
            lambda parts: [d for p in parts for d in p]
        )

    def _copy_to_home(
        self, bodies: dict[int, bytes], digests: Sequence[Digest], dest: str
    ) -> Deferred[list[Digest]]:
        items = [(d, bodies[d.uid]) for d in digests if d.uid in bodies]
        if not items:
            return succeed([])

        def build(first: int, fence: str) -> list[NewMessage]:
            return [
                NewMessage(
                    self.address, dest, b, d.flags, d.internal_date, _nth_uid(first, i), fence
                )
                for i, (d, b) in enumerate(items)
            ]

        return self._reserve(len(items)).addCallback(
            lambda r: self._store_home(dest, build(*r), r[0])
        )

    def _reserve(self, count: int) -> Deferred[tuple[int, str]]:
        """UIDs for APPEND/COPY: ``(first, fence)``.  In a cluster, a fenced (and, with
        a synced clock, timed) allocation the manager tracks in the visibility horizon
        until the store's holder note confirms it (issue 14 item 4), like a delivery's;
        a node alone (its plan says "the storing node numbers": UID 0, no fence) takes
        them from the plain counter, unfenced."""
        d = self.users.delivery_plan(self.address, count)

        def got(p: tuple[tuple[str, ...], int, str]) -> Any:
            if p[1] == 0 and not p[2]:
                return self.users.reserve_uids(self.address, count).addCallback(lambda f: (f, ""))
            return (p[1], p[2])

        return d.addCallback(got)

    def _confirm(self, node: str, first: int) -> Deferred[Any]:
        """``add_fragment`` that also confirms the allocation starting at ``first``
        (it leaves the horizon; a manager with no horizon ignores ``first``)."""
        return self.users.add_fragment(self.address, node, first=first if first > 0 else 0)

    def _store_home(
        self, mailbox: str, msgs: list[NewMessage], first: int = 0
    ) -> Deferred[list[Digest]]:
        """Store at home (a replicated user: on R nodes through the update log);
        a mailbox another fragment has is created at home first.  ``first``: the
        reservation, confirmed to the manager with the holder note."""
        if self.replica is None or not self.cluster:
            return self._store_plain(mailbox, msgs, first)

        def go(r: int) -> Deferred[list[Digest]]:
            if r < 2:
                return self._store_plain(mailbox, msgs, first)
            return self._store_replicated(mailbox, msgs, r, first)

        return self._replicas_of().addCallback(go)

    def _store_replicated(
        self, mailbox: str, msgs: list[NewMessage], replicas: int, first: int = 0
    ) -> Deferred[list[Digest]]:
        """APPEND/COPY of a replicated user: each message one logged object on R nodes
        (the home first), answered once every live one of them holds it."""

        # Without a UID now (no majority: PENDING) the copies are stored unnumbered:
        # only the coordinator's is numbered later, the others take its UID.
        def check(holders: list[str]) -> Deferred[list[Digest]]:
            if not holders:
                raise NoSuchMailbox(f"no mailbox {mailbox}")
            nodes = self.replica.choose(self.home, replicas)
            ds = [self.replica.store(nodes, m, replicas) for m in msgs]
            return gatherResults(ds, consumeErrors=True).addCallbacks(stored, _unwrap)

        def stored(parts: list[list[Digest]]) -> Deferred[list[Digest]]:
            self._node_cache = None
            holders = dict.fromkeys(d.node for p in parts for d in p)
            adds = [self._confirm(n, first) for n in holders]
            firsts = [p[0] for p in parts if p]
            return DeferredList(adds, consumeErrors=True).addCallback(lambda _: firsts)

        if mailbox.upper() == INBOX:
            return check([self.home])
        return self._holders(mailbox).addCallback(check)

    def _store_plain(
        self, mailbox: str, msgs: list[NewMessage], first: int = 0
    ) -> Deferred[list[Digest]]:

        def missing(f: Failure) -> Deferred[list[Digest]]:
            f.trap(NoSuchMailbox)

            def create(holders: list[str]) -> Deferred[Any]:
                if not holders:
                    return f  # type: ignore[return-value]
                d = self._home().create_mailbox(self.address, mailbox)
                return d.addErrback(lambda g: g.trap(MailboxExists))

            d = self._holders(mailbox).addCallback(create)
            return d.addCallback(lambda _: self._home().store(msgs))

        d = self._home().store(msgs)
        if self.cluster:
            d.addErrback(missing)

        def stored(digests: list[Digest]) -> Deferred[list[Digest]]:
            self._node_cache = None
            d: Deferred[Any] = self._confirm(self.home, first)
            return d.addCallback(lambda _: digests)

        return d.addCallback(stored)

    def append(
        self, mailbox: str, body: bytes, flags: Sequence[str], date: float
    ) -> Deferred[Digest]:
        """APPEND: stored on the home fragment."""

        def store(r: tuple[int, str]) -> Deferred[Digest]:
            first, fence = r
            msg = NewMessage(self.address, mailbox, body, tuple(flags), date, first, fence)
            return self._store_home(mailbox, [msg], first).addCallback(lambda ds: ds[0])

        return self._reserve(1).addCallback(store)

    def append_many(
        self, mailbox: str, items: Sequence[tuple[bytes, Sequence[str], float]]
    ) -> Deferred[list[Digest]]:
        """MULTIAPPEND: ``(body, flags, date)`` stored on the home fragment in one
        store (every body written, then the index rows committed together), under
        consecutive reserved UIDs."""

        def build(first: int, fence: str) -> list[NewMessage]:
            return [
                NewMessage(self.address, mailbox, b, tuple(f), when, _nth_uid(first, i), fence)
                for i, (b, f, when) in enumerate(items)
            ]

        return self._reserve(len(items)).addCallback(
            lambda r: self._store_home(mailbox, build(*r), r[0])
        )


def _nth_uid(first: int, i: int) -> int:
    """The UID of the ``i``-th message of a reservation starting at ``first`` (0: the
    storing node numbers; PENDING stays PENDING)."""
    if first in (0, PENDING):
        return first
    return first + i


class RetrievalProxy:
    """Authenticates a POP3/IMAP login and opens that user's :class:`UserMail`."""

    def __init__(
        self,
        node_id: str,
        users: Callable[[str], IUserManager],
        mailboxes: Callable[[str], IMailboxManager],
        *,
        home_of: Callable[[str], str] | None = None,
        now: Callable[[], float] | None = None,
        replica: Any = None,
        load_of: Callable[[str], float] | None = None,
        local: ILocalMailboxes | None = None,
    ) -> None:
        self.node_id = node_id
        self.users = users
        self.mailboxes = mailboxes
        #: The user's home node: the cluster's choice (``home_of`` given: a cluster,
        #: fragments merged, UIDs from the user manager), else this node.
        self.home_of = home_of
        self.cluster = home_of is not None
        #: A clock for :attr:`UserMail.now` (fragment lists reused a moment).
        self.now = now
        #: Replication's hooks for APPEND/COPY and mailbox changes (``MailReplication``,
        #: see UserMail); with them each message is read from its least-loaded holder.
        self.replica = replica
        self.replicated = replica is not None
        self.load_of = load_of
        #: This node's own mailboxes (a cluster: they record the UIDNEXT shown).
        self.local = local

    def authenticate(self, address: str, password: str) -> Deferred[Profile]:
        """The profile, or ``BadCredentials``."""
        return self.users(address).authenticate(address, password)

    def open(self, address: str) -> UserMail:
        """The mail of an (already authenticated) user."""
        home = self.home_of(address) if self.home_of is not None else self.node_id
        mail = UserMail(address, home, self.users(address), self.mailboxes, self.cluster)
        mail.now = self.now
        mail.replicated = self.replicated
        mail.load_of = self.load_of
        mail.replica = self.replica
        if self.cluster:
            mail.local = self.node_id
            mail.shown = self.local.shown if self.local is not None else None
        return mail


def _merge_trees(trees: list[tuple[str, list[MailboxInfo]]]) -> list[MailboxInfo]:
    """One tree from the fragments': highest UIDNEXT, counts summed, the lowest
    UIDVALIDITY among the nodes holding messages in the mailbox (of all holders if
    none does), so an empty mailbox on a new home node does not change it, and as
    HIGHESTMODSEQ the highest given out, capped by the lowest bound (docs/mail.md,
    "Mod-sequences": every change made after the listing is above it)."""
    out: dict[str, MailboxInfo] = {}
    validity: dict[str, tuple[bool, int]] = {}
    highest: dict[str, int] = {}
    bound: dict[str, int] = {}
    for _, infos in trees:
        for i in infos:
            highest[i.name] = max(highest.get(i.name, 0), i.highestmodseq)
            if i.modseq_bound > 0:
                bound[i.name] = min(bound.get(i.name, i.modseq_bound), i.modseq_bound)
            key = (i.messages == 0, i.uidvalidity)  # holders with messages sort first
            validity[i.name] = min(validity.get(i.name, key), key)
            have = out.get(i.name)
            if have is None:
                out[i.name] = i
                continue
            out[i.name] = MailboxInfo(
                i.name,
                i.uidvalidity,
                max(have.uidnext, i.uidnext),
                have.messages + i.messages,
                have.unseen + i.unseen,
                have.subscribed and i.subscribed,
            )
    return [
        MailboxInfo(
            n,
            validity[n][1],
            out[n].uidnext,
            out[n].messages,
            out[n].unseen,
            out[n].subscribed,
            min(highest[n], bound.get(n, highest[n])),
            bound.get(n, 0),
        )
        for n in sorted(out)
    ]


def _unwrap(f: Failure) -> Failure:
    from twisted.internet.defer import FirstError

    if isinstance(f.value, FirstError):
        sub: Failure = f.value.subFailure
        return sub
    return f


def _log_failures(results: list[tuple[bool, Any]], value: Any) -> Any:
    """Log the failures a :class:`DeferredList` collected, then go on with ``value``."""
    for ok, result in results:
        if not ok:
            _log.failure("mailbox clean-up after delete failed", result)
    return value
