"""A user's mail as fragments over the cluster (:class:`Fragmented`).

The IMAP mailbox tree (names, UIDVALIDITY, UID counters) lives on the user's
*home* node, chosen by the cluster (``home_of``); the tree shown is the union of
the trees of the home and every fragment node (UIDVALIDITY the lowest, UIDNEXT
the highest of them, :mod:`._listing`), UIDs come from the user manager's
per-user counter so they ascend over all fragments, and a message stored on
several nodes under one UID (replicas) is listed once; see docs/mail.md.  With
replication's hooks (``replica``: ``MailReplication``, issue 14), for a user with
``replicas >= 2`` APPEND and COPY store through the update log on R nodes like
deliveries, and CREATE/RENAME/DELETE are logged mailbox objects that reach
holders that are down now when they return.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from ..interfaces import IMailboxManager
from ..values import INBOX, Digest, MailboxExists, MailboxInfo, NewMessage, NoSuchMailbox
from ._listing import (
    ask_all,
    check_complete,
    fresh_if_held,
    merge_parts,
    merged_digests,
    merged_tree,
    trees,
)
from ._merge import unwrap
from ._usermail import nth_uid
from .interfaces import IMailLayout

if TYPE_CHECKING:
    from ..interfaces import ILocalMailboxes
    from ..replication.mail import MailReplication
    from ._usermail import UserMail

__all__ = ["Fragmented"]

#: A mailbox change as replication logs it: (name, exists, renamed from, renamed to).
BoxOp = tuple[str, bool, str | None, str | None]


@implementer(IMailLayout)
class Fragmented:
    """The :class:`IMailLayout` of a cluster: fragments merged, the tree at home."""

    def __init__(
        self,
        home_of: Callable[[str], str],
        *,
        now: Callable[[], float] | None = None,
        replica: MailReplication | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self._home_of = home_of
        #: A clock for :attr:`UserMail.now` (fragment lists reused a moment).
        self.now = now
        #: A reactor for :attr:`UserMail.clock` (reservations wait out a lost manager).
        self.clock = clock
        #: Replication's hooks for APPEND/COPY and mailbox changes (``MailReplication``);
        #: None: plain stores at home, mailbox changes not logged.
        self.replica = replica

    def home_of(self, address: str) -> str:
        """See :class:`IMailLayout`: the cluster's choice."""
        return self._home_of(address)

    def opened(self, mail: UserMail, node_id: str, local: ILocalMailboxes | None) -> None:
        """See :class:`IMailLayout`: the clock, and this node's record of the UIDNEXT
        it showed."""
        mail.now = self.now
        mail.clock = self.clock
        mail.local = node_id
        mail.shown = local.shown if local is not None else None

    # --- listings --------------------------------------------------------------------

    def mailboxes(self, mail: UserMail) -> Deferred[list[MailboxInfo]]:
        """See :class:`IMailLayout`: the merged tree."""
        return trees(mail).addCallback(lambda per_node: merged_tree(mail, per_node))

    def open_mailbox(
        self, mail: UserMail, mailbox: str, complete: bool
    ) -> Deferred[tuple[list[MailboxInfo], list[Digest]]]:
        """See :class:`IMailLayout`: one ``view`` per node, merged."""
        want = INBOX if mailbox.upper() == INBOX else mailbox

        def ask(m: IMailboxManager) -> Deferred[tuple[list[MailboxInfo], list[Digest] | None]]:
            return m.view(mail.address, want)

        def split(
            results: list[tuple[str, tuple[list[MailboxInfo], list[Digest] | None]]],
        ) -> Deferred[tuple[list[MailboxInfo], list[Digest]]]:
            parts = []
            home_lacks = False
            for node, (_, digests) in results:
                if digests is None:
                    home_lacks = home_lacks or node == mail.home
                    digests = []  # a fragment node may lack a mailbox the home has
                parts.append((node, digests))
            if home_lacks and all(d is None for _, (_, d) in results):
                raise NoSuchMailbox(f"no mailbox {want}")
            merged = merge_parts(mail, want, parts)

            def both(infos: list[MailboxInfo]) -> tuple[list[MailboxInfo], list[Digest]]:
                # after the tree: it notes mailboxes shown shorter than before
                return infos, check_complete(mail, merged, want) if complete else merged

            def tree(_: object = None) -> Deferred[tuple[list[MailboxInfo], list[Digest]]]:
                return merged_tree(
                    mail, [(n, t) for n, (t, _) in results], (want, merged)
                ).addCallback(both)

            if not home_lacks:
                return tree()
            # Created on another node while the home was out of the view (that node
            # was home then), listed since but unselectable here, and CREATE answered
            # ALREADYEXISTS: clients such as mbsync and offlineimap then failed every
            # run and never uploaded that folder's mail.  The home gets it now (an
            # empty mailbox there does not change the merged UIDVALIDITY).
            mail.counts["home_mailbox_repairs"] += 1
            d = mail.home_manager().create_mailbox(mail.address, want)
            return d.addErrback(lambda g: g.trap(MailboxExists)).addCallback(tree)

        return fresh_if_held(mail, lambda: ask_all(mail, ask).addCallback(split))

    def digests(self, mail: UserMail, mailbox: str, complete: bool) -> Deferred[list[Digest]]:
        """See :class:`IMailLayout`: the merged listing."""
        d = merged_digests(mail, mailbox)
        if complete:
            d.addCallback(
                lambda ds: check_complete(mail, ds, INBOX if mailbox.upper() == INBOX else mailbox)
            )
        return d

    # --- mailbox changes: on every holder, logged for a replicated user ---------------

    def _holders(self, mail: UserMail, name: str) -> Deferred[list[str]]:
        """Nodes whose tree has mailbox ``name`` (exact)."""
        want = INBOX if name.upper() == INBOX else name
        return trees(mail).addCallback(
            lambda per_node: [n for n, infos in per_node if any(i.name == want for i in infos)]
        )

    def _on_holders(
        self, mail: UserMail, name: str, op: Callable[[IMailboxManager], Deferred[Any]]
    ) -> Deferred[None]:
        def run(holders: list[str]) -> Deferred[None]:
            if not holders:
                raise NoSuchMailbox(f"no mailbox {name}")
            ds = [op(mail.managers(n)) for n in holders]
            return gatherResults(ds, consumeErrors=True).addCallbacks(lambda _: None, unwrap)

        return self._holders(mail, name).addCallback(run)

    def create(self, mail: UserMail, name: str, absent: bool) -> Deferred[MailboxInfo]:
        """See :class:`IMailLayout`: at home; ``MailboxExists`` if any fragment has it."""

        def check(holders: list[str]) -> Deferred[MailboxInfo]:
            if holders:
                raise MailboxExists(f"mailbox {name} already exists")
            return mail.home_manager().create_mailbox(mail.address, name)

        d = check([]) if absent else self._holders(mail, name.rstrip("/")).addCallback(check)
        return self._log_boxes(mail, d, lambda: [(name.rstrip("/"), True, None, None)])

    def delete_mailbox(self, mail: UserMail, name: str) -> Deferred[None]:
        """See :class:`IMailLayout`: on every node holding the mailbox."""
        if name.upper() == INBOX:
            return mail.home_manager().delete_mailbox(mail.address, name)
        d = self._on_holders(mail, name, lambda m: m.delete_mailbox(mail.address, name))
        return self._log_boxes(mail, d, lambda: [(name, False, None, None)])

    def rename(self, mail: UserMail, old: str, new: str) -> Deferred[None]:
        """See :class:`IMailLayout`: on every node holding ``old``."""

        def check(holders: list[str]) -> Deferred[None]:
            if holders:
                raise MailboxExists(f"mailbox {new} already exists")
            return self._on_holders(mail, old, lambda m: m.rename_mailbox(mail.address, old, new))

        d = self._holders(mail, new.rstrip("/")).addCallback(check)
        target = new.rstrip("/")
        return self._log_boxes(
            mail, d, lambda: [(target, True, old, None), (old, False, None, target)]
        )

    def subscribe(self, mail: UserMail, name: str, on: bool) -> Deferred[None]:
        """See :class:`IMailLayout`: on every node holding the mailbox."""
        return self._on_holders(mail, name, lambda m: m.subscribe(mail.address, name, on))

    def _log_boxes(
        self, mail: UserMail, done: Deferred[Any], ops: Callable[[], list[BoxOp]]
    ) -> Deferred[Any]:
        """After a mailbox change made on the holders in reach: log it (replicated
        users) as mailbox objects to every holder, so one down now, or one that
        answered late, makes the same change when it is back.  The command's answer
        waits for the change to be durable in this node's log."""
        replica = self.replica
        if replica is None:
            return done

        def log(result: Any) -> Deferred[Any]:
            def go(r: int) -> Deferred[Any] | Any:
                if r < 2:
                    return result
                # the holders (home, fragments, away) and the R nodes new messages go to
                more = list(replica.choose(mail.home, r))
                d = mail.nodes().addCallback(
                    lambda ns: replica.box_ops(mail.address, ops(), [mail.home, *ns, *more])
                )
                return d.addCallback(lambda _: result)

            return mail.replicas_of().addCallback(go)

        return done.addCallback(log)

    # --- COPY and APPEND: stored at home under UIDs from the user manager --------------

    def copy(
        self,
        mail: UserMail,
        mailbox: str,
        digests: Sequence[Digest],
        dest: str,
        deadline: float | None = None,
    ) -> Deferred[list[Digest]]:
        """See :class:`IMailLayout`: read, then store at home under fresh UIDs."""
        return mail.fetch(mailbox, digests).addCallback(
            self._copy_to_home, mail, digests, dest, deadline
        )

    def _copy_to_home(
        self,
        bodies: dict[int, bytes],
        mail: UserMail,
        digests: Sequence[Digest],
        dest: str,
        deadline: float | None = None,
    ) -> Deferred[list[Digest]]:
        items = [(d, bodies[d.uid]) for d in digests if d.uid in bodies]
        if not items:
            return succeed([])

        def build(first: int, fence: str) -> list[NewMessage]:
            return [
                NewMessage(
                    mail.address, dest, b, d.flags, d.internal_date, nth_uid(first, i), fence
                )
                for i, (d, b) in enumerate(items)
            ]

        return mail.reserve(len(items), deadline).addCallback(
            lambda r: self.store(mail, dest, build(*r), r[0])
        )

    def store(
        self, mail: UserMail, mailbox: str, msgs: list[NewMessage], first: int
    ) -> Deferred[list[Digest]]:
        """See :class:`IMailLayout`: at home (a replicated user: on R nodes through the
        update log); a mailbox another fragment has is created at home first.
        ``first``: the reservation, confirmed to the manager with the holder note."""
        if self.replica is None:
            return self._store_plain(mail, mailbox, msgs, first)

        def go(r: int) -> Deferred[list[Digest]]:
            if r < 2:
                return self._store_plain(mail, mailbox, msgs, first)
            return self._store_replicated(mail, mailbox, msgs, r, first)

        return mail.replicas_of().addCallback(go)

    def _store_replicated(
        self, mail: UserMail, mailbox: str, msgs: list[NewMessage], replicas: int, first: int
    ) -> Deferred[list[Digest]]:
        """APPEND/COPY of a replicated user: each message one logged object on R nodes
        (the home first), answered once every live one of them holds it."""
        replica = self.replica
        assert replica is not None  # store() comes here only with replication

        # Without a UID now (no majority: PENDING) the copies are stored unnumbered:
        # only the coordinator's is numbered later, the others take its UID.
        def check(holders: list[str]) -> Deferred[list[Digest]]:
            if not holders:
                raise NoSuchMailbox(f"no mailbox {mailbox}")
            nodes = replica.choose(mail.home, replicas)
            ds = [replica.store(nodes, m, replicas) for m in msgs]
            return gatherResults(ds, consumeErrors=True).addCallbacks(stored, unwrap)

        def stored(parts: list[list[Digest]]) -> Deferred[list[Digest]]:
            mail.forget_nodes()
            holders = dict.fromkeys(d.node for p in parts for d in p)
            adds = [mail.confirm(n, first) for n in holders]
            firsts = [p[0] for p in parts if p]
            return DeferredList(adds, consumeErrors=True).addCallback(lambda _: firsts)

        if mailbox.upper() == INBOX:
            return check([mail.home])
        return self._holders(mail, mailbox).addCallback(check)

    def _store_plain(
        self, mail: UserMail, mailbox: str, msgs: list[NewMessage], first: int
    ) -> Deferred[list[Digest]]:
        def missing(f: Failure) -> Deferred[list[Digest]]:
            f.trap(NoSuchMailbox)

            def create(holders: list[str]) -> Deferred[Any]:
                if not holders:
                    return f  # type: ignore[return-value]
                d = mail.home_manager().create_mailbox(mail.address, mailbox)
                return d.addErrback(lambda g: g.trap(MailboxExists))

            d = self._holders(mail, mailbox).addCallback(create)
            return d.addCallback(lambda _: mail.home_manager().store(msgs))

        d = mail.home_manager().store(msgs)
        d.addErrback(missing)
        return mail.stored_at_home(d, first)
