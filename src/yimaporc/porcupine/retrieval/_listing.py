"""The merged listing of a user whose mail is fragments over the cluster (see
:class:`~.Fragmented`): each node asked, the trees and listings merged, copies
listed once, two messages under one UID never both shown, and nothing shown
beyond the manager's visibility horizon or below a UIDNEXT shown before
(docs/mail.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.python.failure import Failure

from ..interfaces import IMailboxManager
from ..values import INBOX, Digest, MailboxInfo, MailUnavailable, NoSuchMailbox, Profile
from ._merge import merge_trees

if TYPE_CHECKING:
    from ._usermail import UserMail

__all__ = [
    "ask_all",
    "check_complete",
    "fresh_if_held",
    "inbox_uidvalidity",
    "merge_parts",
    "merged_digests",
    "merged_tree",
    "trees",
]

_T = TypeVar("_T")


def ask_all(
    mail: UserMail, ask: Callable[[IMailboxManager], Deferred[Any]]
) -> Deferred[list[tuple[str, Any]]]:
    """``ask`` every node (home first); a fragment node that fails is left out
    (logged), a failing home fails the call."""

    def go(nodes: list[str]) -> Deferred[list[tuple[str, Any]]]:
        ds = [ask(mail.managers(n)) for n in nodes]

        def done(results: list[tuple[bool, Any]]) -> list[tuple[str, Any]]:
            out = []
            mail.unreachable = set()
            for n, (ok, got) in zip(nodes, results, strict=True):
                if ok:
                    out.append((n, got))
                elif n == mail.home or isinstance(got.value, NoSuchMailbox):
                    got.raiseException()
                else:
                    mail.unreachable.add(n)
                    mail.log.info(
                        "mail of {u} on {n} out of reach: {e}",
                        u=mail.address,
                        n=n,
                        e=got.getErrorMessage(),
                    )
            return out

        return DeferredList(ds, consumeErrors=True).addCallback(done)

    return mail.nodes().addCallback(go)


def trees(mail: UserMail) -> Deferred[list[tuple[str, list[MailboxInfo]]]]:
    """Every node's mailbox tree (see :func:`ask_all`)."""
    return ask_all(mail, lambda m: m.mailboxes(mail.address))


def merged_tree(
    mail: UserMail,
    per_node: list[tuple[str, list[MailboxInfo]]],
    listed: tuple[str, list[Digest]] | None = None,
) -> Deferred[list[MailboxInfo]]:
    """The merged tree shown to the client, from each node's tree; ``listed``: a
    mailbox's merged listing shown with it, whose top UID UIDNEXT stays above."""
    d = _inbox_validity(mail, merge_trees(per_node))
    d.addCallback(lambda infos: _below_horizon_next(mail, infos))
    if listed is not None:
        d.addCallback(_above_listed, *listed)
    return d.addCallback(lambda infos: _monotonic(mail, infos))


def _above_listed(infos: list[MailboxInfo], name: str, digests: list[Digest]) -> list[MailboxInfo]:
    """UIDNEXT above the top UID listed (a fragment's tree can lag its messages):
    before :func:`_monotonic` records it, so a STATUS or SELECT that shows a
    listed UID's successor never shows less later (a chaos run saw 3859, then
    3857, at one node).  The listing is already below the horizon."""
    top = max((d.uid for d in digests), default=0)
    return [
        attrs.evolve(i, uidnext=top + 1) if i.name == name and i.uidnext <= top else i
        for i in infos
    ]


def inbox_uidvalidity(profile: Profile) -> int:
    """INBOX's UIDVALIDITY for the incarnation of the user ``profile`` describes: its
    creation second (an RFC 3501 nz-number, so at least 1: a clock near the epoch, as
    in the simulator, or a profile without its creation time, gives 1).  Every node
    holds the same record, so every node shows the same value."""
    return max(1, int(profile.created))


def _inbox_validity(mail: UserMail, infos: list[MailboxInfo]) -> Deferred[list[MailboxInfo]]:
    """INBOX's UIDVALIDITY is the profile's creation second, the same on every node
    whichever fragments answer (a fragment's own value depends on when and where
    its INBOX row was made, and on that node's clock, so it is never shown: the
    merged lowest would change with the fragments in reach).  Without the profile
    (the user's manager has no record yet, e.g. a new manager before its hints
    arrived, or the user was removed meanwhile) the value cannot be known: the
    command is refused with a transient [UNAVAILABLE] (counted) rather than answered
    with another value."""

    def fix(profile: Profile | None) -> list[MailboxInfo]:
        mail.copy_policy.profile_seen(mail, profile)
        if profile is None:
            mail.counts["validity_unknown"] += 1
            mail.log.info("{u}: no profile from the manager, UIDVALIDITY unknown", u=mail.address)
            raise MailUnavailable(
                "[UNAVAILABLE] the account's record is out of reach, try again later"
            )
        v = inbox_uidvalidity(profile)
        return [attrs.evolve(i, uidvalidity=v) if i.name == INBOX else i for i in infos]

    return mail.users.profile(mail.address).addCallback(fix)


def _below_horizon_next(
    mail: UserMail, infos: list[MailboxInfo]
) -> Deferred[list[MailboxInfo]] | list[MailboxInfo]:
    """UIDNEXT no higher than the horizon's bound: a client syncing from UIDNEXT
    would skip a UID still in flight when it lands.  The bound depends on which
    allocated UIDs are found: with allocations outstanding, INBOX (where
    deliveries and numbering go) is listed first; if that fails, the lowest
    outstanding UID counts as not found."""
    h = mail.horizon
    if h is None:
        return infos

    def cap(bound: int) -> list[MailboxInfo]:
        return [attrs.evolve(i, uidnext=min(i.uidnext, bound)) for i in infos]

    if not h.outstanding:
        return cap(h.next)

    def found(_: list[Digest]) -> int:
        return mail.bound

    def unknown(_: Failure) -> int:
        return h.bound(())

    return merged_digests(mail, INBOX).addCallbacks(found, unknown).addCallback(cap)


def _monotonic(mail: UserMail, infos: list[MailboxInfo]) -> Deferred[list[MailboxInfo]]:
    """UIDNEXT at least what this node showed before (recorded on its disk)."""
    shown = mail.shown
    if shown is None:
        return succeed(infos)

    def fix(top: dict[str, int]) -> list[MailboxInfo]:
        mail.short = {i.name for i in infos if top.get(i.name, 0) > i.uidnext}
        return [attrs.evolve(i, uidnext=max(i.uidnext, top.get(i.name, 0))) for i in infos]

    marks = {i.name: (i.uidvalidity, i.uidnext) for i in infos}
    d: Deferred[dict[str, int]] = shown(mail.address, marks)
    return d.addCallback(fix)


def merged_digests(mail: UserMail, mailbox: str) -> Deferred[list[Digest]]:
    def tolerant(m: IMailboxManager) -> Deferred[list[Digest]]:
        # A fragment node may lack a mailbox the home has: nothing of it there.
        def missing(f: Failure) -> list[Digest]:
            f.trap(NoSuchMailbox)
            if m.node_id == mail.home:
                f.raiseException()
            return []

        return m.digests(mail.address, mailbox).addErrback(missing)

    return fresh_if_held(
        mail, lambda: ask_all(mail, tolerant).addCallback(lambda p: merge_parts(mail, mailbox, p))
    )


def fresh_if_held(mail: UserMail, listing: Callable[[], Deferred[_T]]) -> Deferred[_T]:
    """Run ``listing``; if the horizon that came with a *cached* fragment list held
    messages back (the manager's counter has moved on since, e.g. another session's
    APPEND), list once more with a fresh answer from the manager, so a command shows
    what landed before it rather than at the next command."""
    held = mail.held_back
    d = listing()

    def again(out: _T) -> _T | Deferred[_T]:
        if mail.nodes_cached and mail.held_back > held:
            return listing()
        return out

    return d.addCallback(again)


def merge_parts(
    mail: UserMail, mailbox: str, parts: list[tuple[str, list[Digest]]]
) -> list[Digest]:
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
                mail.twins.setdefault((mailbox, d.uid), []).append(d.node)
            elif twin is None:
                same.append(d)
    out = []
    for u in sorted(seen):
        keep, *extra = sorted(seen[u], key=lambda x: (x.internal_date, x.node, x.key))
        out.append(keep)
        for d in extra:
            _renumber(mail, mailbox, d)
    return _below_horizon(mail, out)


def _below_horizon(mail: UserMail, digests: list[Digest]) -> list[Digest]:
    """Of a merged listing, what the horizon lets a client see (docs/mail.md,
    "The visibility horizon"); when it holds some back, the next command asks
    the manager afresh instead of reusing the cached fragment list."""
    h = mail.horizon
    if h is None:
        return digests
    bound = mail.bound = h.bound(d.uid for d in digests)
    kept = [d for d in digests if d.uid < bound]
    if len(kept) < len(digests):
        mail.held_back += len(digests) - len(kept)
        mail.forget_nodes()
    return kept


def _renumber(mail: UserMail, mailbox: str, d: Digest) -> None:
    """``d`` shares its UID with another message: back to unnumbered on its node,
    and its manager told (fire and forget: the next listing tries again)."""
    mail.log.warn(
        "{u}: two messages under UID {n}; the one on {node} is numbered afresh",
        u=mail.address,
        n=d.uid,
        node=d.node,
    )
    mail.renumbered += 1
    dd: Deferred[Any] = mail.managers(d.node).demote(mail.address, mailbox, d.uid, d.key)
    note = mail.users.note_pending
    dd.addCallback(lambda ok: note(mail.address, d.node) if ok else None)
    dd.addErrback(lambda f: mail.log.warn("renumbering failed: {e}", e=f.getErrorMessage()))


def check_complete(mail: UserMail, digests: list[Digest], mailbox: str) -> list[Digest]:
    why = mail.incomplete(mailbox)
    if why:
        raise MailUnavailable(
            "[UNAVAILABLE] part of this mailbox is out of reach (" + "; ".join(why) + "),"
            " try again later"
        )
    return digests
