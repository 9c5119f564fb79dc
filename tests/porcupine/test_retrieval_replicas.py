"""UserMail with replication: one holder per message, the least loaded, others on failure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from yimaporc.porcupine.retrieval import Fragmented, ReplicatedCopies, UserMail
from yimaporc.porcupine.values import INBOX, Digest, MailboxInfo

USER = "dora@example.org"


class Users:
    """The user manager's fragment list."""

    def __init__(self, nodes: tuple[str, ...]) -> None:
        self.nodes = nodes

    def fragments(self, address: str) -> Deferred[tuple[str, ...]]:
        return succeed(self.nodes)

    def away_of(self, address: str) -> tuple[str, ...]:
        return ()

    def certain(self, address: str) -> bool:
        return True

    def horizon_of(self, address: str) -> None:
        return None

    def note_pending(self, address: str, node: str) -> Deferred[None]:
        return succeed(None)


class Box:
    """One node's mailbox manager holding the same two messages (replicas)."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.up = True
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.flags: dict[int, tuple[str, ...]] = {1: (), 2: ()}

    def _check(self, what: str, uids: Sequence[int]) -> None:
        self.calls.append((what, tuple(uids)))
        if not self.up:
            raise ConnectionError(f"{self.node_id} down")

    def mailboxes(self, address: str) -> Deferred[list[MailboxInfo]]:
        return succeed([MailboxInfo(INBOX, 2, 0, 3, 7)])

    def digests(self, address: str, mailbox: str) -> Deferred[list[Digest]]:
        return succeed(
            [Digest(u, f"k{u}", 10 * u, self.flags[u], 1.0, self.node_id) for u in (1, 2)]
        )

    def fetch(self, address: str, mailbox: str, uids: Sequence[int]) -> Deferred[dict[int, bytes]]:
        try:
            self._check("fetch", uids)
        except ConnectionError as e:
            return fail(e)
        return succeed({u: f"body {u} from {self.node_id}".encode() for u in uids})

    def set_flags(
        self, address: str, mailbox: str, uids: Sequence[int], flags: Sequence[str], mode: int
    ) -> Deferred[dict[int, tuple[str, ...]]]:
        try:
            self._check("flags", uids)
        except ConnectionError as e:
            return fail(e)
        for u in uids:
            self.flags[u] = tuple(flags)
        return succeed({u: tuple(flags) for u in uids})

    def delete(self, address: str, mailbox: str, uids: Sequence[int]) -> Deferred[list[int]]:
        try:
            self._check("delete", uids)
        except ConnectionError as e:
            return fail(e)
        return succeed(list(uids))


def result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def setup(loads: dict[str, float]) -> tuple[UserMail, dict[str, Box], list[Digest]]:
    boxes = {n: Box(n) for n in ("a", "b")}
    layout, copies = Fragmented(lambda a: "a"), ReplicatedCopies(loads.__getitem__)
    mail = UserMail(USER, "a", Users(("a", "b")), boxes.__getitem__, layout, copies)  # type: ignore[arg-type]
    digests = result(mail.digests(INBOX))
    return mail, boxes, digests


def test_copies_listed_once_and_read_from_the_least_loaded_holder() -> None:
    mail, boxes, digests = setup({"a": 5.0, "b": 1.0})
    assert [d.uid for d in digests] == [1, 2]
    bodies = result(mail.fetch(INBOX, digests))
    assert bodies == {1: b"body 1 from b", 2: b"body 2 from b"}
    assert boxes["a"].calls == []


def test_a_failed_read_falls_back_to_another_replica() -> None:
    mail, boxes, digests = setup({"a": 5.0, "b": 1.0})
    boxes["b"].up = False
    bodies = result(mail.fetch(INBOX, digests))
    assert bodies == {1: b"body 1 from a", 2: b"body 2 from a"}
    assert boxes["b"].calls == [("fetch", (1, 2))]


def test_no_holder_answers_fails_the_read() -> None:
    mail, boxes, digests = setup({"a": 5.0, "b": 1.0})
    boxes["a"].up = boxes["b"].up = False
    d = mail.fetch(INBOX, digests)
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(ConnectionError)


def test_flags_and_deletions_go_to_one_holder() -> None:
    mail, boxes, digests = setup({"a": 0.0, "b": 3.0})
    assert result(mail.set_flags(INBOX, digests, ["\\Seen"], 0)) == {1: ("\\Seen",), 2: ("\\Seen",)}
    assert result(mail.delete(INBOX, digests[:1])) == [1]
    assert boxes["a"].calls == [("flags", (1, 2)), ("delete", (1,))]
    assert boxes["b"].calls == []
