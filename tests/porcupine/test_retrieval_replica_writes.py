"""UserMail writes for a replicated user (issue 14): APPEND, COPY and mailbox changes go
through replication's hooks, whatever frontend calls UserMail."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed

from yimaporc.porcupine.retrieval import Fragmented, SingleCopies, UserMail
from yimaporc.porcupine.values import (
    INBOX,
    PENDING,
    Digest,
    MailboxInfo,
    NewMessage,
    NoSuchMailbox,
    Profile,
)

USER = "dora@example.org"


class Users:
    """The user manager: fragments, the profile (R), UIDs, fragment notes."""

    def __init__(self, replicas: int, first_uid: int = 40) -> None:
        self.replicas = replicas
        self.first_uid = first_uid
        self.added: list[str] = []

    def fragments(self, address: str) -> Deferred[tuple[str, ...]]:
        return succeed(("n1", "n2"))

    def profile(self, address: str) -> Deferred[Profile | None]:
        return succeed(Profile(address, "x", self.replicas, 1000.0))

    def reserve_uids(self, address: str, count: int) -> Deferred[int]:
        return succeed(self.first_uid)

    def delivery_plan(
        self, address: str, count: int, unfenced: bool = False, replicas: int = 1
    ) -> Deferred[tuple[tuple[str, ...], int, str]]:
        # as a node alone answers: the storing node numbers (APPEND then reserves)
        return succeed((("n1", "n2"), 0, ""))

    def add_fragment(self, address: str, node: str, first: int | None = 0) -> Deferred[None]:
        self.added.append(node)
        return succeed(None)

    def away_of(self, address: str) -> tuple[str, ...]:
        return ()

    def certain(self, address: str) -> bool:
        return True

    def horizon_of(self, address: str) -> None:
        return None

    def note_pending(self, address: str, node: str) -> Deferred[None]:
        return succeed(None)


class Box:
    """One node's mailbox manager: a tree, and plain stores and changes recorded."""

    def __init__(self, node_id: str, names: Sequence[str]) -> None:
        self.node_id = node_id
        self.names = list(names)
        self.calls: list[tuple[Any, ...]] = []

    def mailboxes(self, address: str) -> Deferred[list[MailboxInfo]]:
        return succeed([MailboxInfo(n, 7, 50, 1, 0) for n in self.names])

    def store(self, messages: Sequence[NewMessage]) -> Deferred[list[Digest]]:
        self.calls.append(("store", tuple(messages)))
        return succeed([Digest(m.uid, "k", len(m.body), m.flags, 1.0, self.node_id) for m in messages])  # fmt: skip

    def create_mailbox(self, address: str, name: str) -> Deferred[MailboxInfo]:
        self.calls.append(("create", name))
        self.names.append(name)
        return succeed(MailboxInfo(name, 7, 1, 0, 0))

    def rename_mailbox(self, address: str, old: str, new: str) -> Deferred[None]:
        self.calls.append(("rename", old, new))
        self.names = [new if n == old else n for n in self.names]
        return succeed(None)


class Replica:
    """Replication's hooks (``MailReplication``): what UserMail asked of them."""

    def __init__(self) -> None:
        self.stored: list[tuple[list[str], NewMessage, int]] = []
        self.boxes: list[tuple[str, list[Any], list[str]]] = []

    def choose(self, home: str, replicas: int) -> list[str]:
        return [home, "n3"][:replicas]

    def store(self, nodes: Sequence[str], message: NewMessage, replicas: int) -> Deferred[list[Digest]]:  # fmt: skip
        self.stored.append((list(nodes), message, replicas))
        return succeed([Digest(message.uid, "r.m", len(message.body), message.flags, 1.0, n) for n in nodes])  # fmt: skip

    def box_ops(self, user: str, ops: list[Any], nodes: Sequence[str]) -> Deferred[None]:
        self.boxes.append((user, list(ops), list(dict.fromkeys(nodes))))
        return succeed(None)


def result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def setup(replicas: int, first_uid: int = 40) -> tuple[UserMail, dict[str, Box], Replica, Users]:
    boxes = {"n1": Box("n1", [INBOX, "Work"]), "n2": Box("n2", [INBOX])}
    users = Users(replicas, first_uid)
    replica = Replica()
    layout = Fragmented(lambda a: "n1", replica=replica)
    mail = UserMail(USER, "n1", users, lambda n: boxes[n], layout, SingleCopies())  # type: ignore[arg-type]
    return mail, boxes, replica, users


def test_append_of_a_replicated_user_is_one_logged_object_on_r_nodes() -> None:
    """APPEND for R=2: stored through replication on the home and one more node under
    the reserved UID (no plain store anywhere); both become fragment nodes."""
    mail, boxes, replica, users = setup(2)
    digest = result(mail.append("Work", b"Subject: a\r\n\r\nx\r\n", ["\\Seen"], 5.0))
    ((nodes, msg, r),) = replica.stored
    assert (nodes, msg.uid, msg.mailbox, msg.flags, r) == (["n1", "n3"], 40, "Work", ("\\Seen",), 2)
    assert digest.uid == 40
    assert not any(c[0] == "store" for b in boxes.values() for c in b.calls)
    assert sorted(users.added) == ["n1", "n3"]


def test_copy_of_a_replicated_user_stores_each_message_through_replication() -> None:
    """COPY of two messages for R=2: two logged objects with consecutive fresh UIDs."""
    mail, boxes, replica, _ = setup(2)
    boxes["n1"].fetch = lambda a, m, uids: succeed({u: b"body %d" % u for u in uids})  # type: ignore[attr-defined]
    src = [Digest(u, f"k{u}", 6, (), 1.0, "n1") for u in (3, 4)]
    got = result(mail.copy(INBOX, src, "Work"))
    assert [m.uid for _, m, _ in replica.stored] == [40, 41]
    assert [d.uid for d in got] == [40, 41]


def test_append_without_a_uid_goes_through_replication_unnumbered() -> None:
    """No UID can be given now (no majority): the message still goes through
    replication, unnumbered (its coordinator's copy is numbered later, the others
    take that UID), never as a plain store."""
    mail, boxes, replica, _ = setup(2, first_uid=PENDING)
    result(mail.append(INBOX, b"x\r\n", [], 5.0))
    assert [m.uid for _, m, _ in replica.stored] == [PENDING]
    assert not any(c[0] == "store" for b in boxes.values() for c in b.calls)


def test_append_to_a_mailbox_nobody_has_is_no_such_mailbox() -> None:
    """APPEND to a mailbox no holder has fails as before (TRYCREATE)."""
    mail, _, replica, _ = setup(2)
    with pytest.raises(NoSuchMailbox):
        result(mail.append("Nope", b"x\r\n", [], 5.0))
    assert replica.stored == []


def test_single_replica_user_stores_at_home_as_before() -> None:
    """R=1: the plain store at home, replication's hooks untouched."""
    mail, boxes, replica, _ = setup(1)
    result(mail.append(INBOX, b"x\r\n", [], 5.0))
    assert [c[0] for c in boxes["n1"].calls] == ["store"] and replica.stored == []


def test_mailbox_changes_are_done_then_logged_to_every_holder() -> None:
    """CREATE and RENAME for R=2: done on the holders in reach, then logged as mailbox
    objects to the holders and the R nodes (RENAME as two objects)."""
    mail, boxes, replica, _ = setup(2)
    result(mail.create("Later"))
    result(mail.rename("Work", "Done"))
    assert ("create", "Later") in boxes["n1"].calls
    assert ("rename", "Work", "Done") in boxes["n1"].calls
    assert [ops for _, ops, _ in replica.boxes] == [
        [("Later", True, None, None)],
        [("Done", True, "Work", None), ("Work", False, None, "Done")],
    ]
    assert all(set(nodes) == {"n1", "n2", "n3"} for _, _, nodes in replica.boxes)


def test_a_refused_mailbox_change_is_not_logged() -> None:
    """RENAME onto an existing name fails on the holders and logs nothing."""
    mail, _, replica, _ = setup(2)
    with pytest.raises(Exception, match="already exists"):
        result(mail.rename("Work", INBOX))
    assert replica.boxes == []
