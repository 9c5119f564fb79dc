"""The UIDNEXT a node records as shown is the one STATUS and SELECT show: never below
the top UID of the listing shown with it (a chaos run saw STATUS give 3859, then
3857, at one node: the tree's UIDNEXT, capped by a second listing's horizon, was
recorded while STATUS showed the listing's top UID + 1)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed

from yimaporc.porcupine.retrieval._listing import merged_tree
from yimaporc.porcupine.values import INBOX, Digest, MailboxInfo, Profile


class _Users:
    def profile(self, address: str) -> Deferred[Profile | None]:
        return succeed(Profile(address, "x", 1, 1000.0))


class _Policy:
    def profile_seen(self, mail: Any, profile: Any) -> None:
        pass


class _Mail:
    """What :func:`merged_tree` reads of a session's user mail, with a ``shown``
    record that keeps the highest UIDNEXT, as a node's store does."""

    def __init__(self) -> None:
        self.address = "u@example.org"
        self.users = _Users()
        self.copy_policy = _Policy()
        self.horizon = None
        self.short: set[str] = set()
        self.recorded: dict[str, int] = {}

    def shown(self, user: str, marks: dict[str, tuple[int, int]]) -> Deferred[dict[str, int]]:
        for name, (_, n) in marks.items():
            self.recorded[name] = max(self.recorded.get(name, 0), n)
        return succeed(dict(self.recorded))


def _result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    (got,) = out
    if hasattr(got, "raiseException"):
        got.raiseException()
    return got


def _digest(uid: int) -> Digest:
    return Digest(uid, f"k{uid}", 10, (), 1.0, "n2")


def test_uidnext_recorded_is_above_the_listing_shown_with_it() -> None:
    mail = _Mail()
    lagging_tree = [("n1", [MailboxInfo(INBOX, 7, 3857, 2, 0)])]
    listing = [_digest(3856), _digest(3858)]
    (info,) = _result(merged_tree(mail, lagging_tree, (INBOX, listing)))  # type: ignore[arg-type]
    assert info.uidnext == 3859
    assert mail.recorded[INBOX] == 3859, "what STATUS shows is what is recorded"
    # a later read whose listing lacks 3858 (held back) shows no less
    (later,) = _result(merged_tree(mail, lagging_tree, (INBOX, [_digest(3856)])))  # type: ignore[arg-type]
    assert later.uidnext == 3859


def test_a_tree_ahead_of_the_listing_keeps_its_uidnext() -> None:
    mail = _Mail()
    tree = [("n1", [MailboxInfo(INBOX, 7, 40, 1, 0), MailboxInfo("Sent", 8, 5, 0, 0)])]
    infos = _result(merged_tree(mail, tree, (INBOX, [_digest(3)])))  # type: ignore[arg-type]
    assert [(i.name, i.uidnext) for i in infos] == [(INBOX, 40), ("Sent", 5)]
