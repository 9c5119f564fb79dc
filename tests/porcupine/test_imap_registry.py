"""MailboxRegistry (``porcupine._imap_registry``): selected mailboxes and the special-use memory."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from yimaporc.porcupine import _imap_registry
from yimaporc.porcupine._imap_registry import SPECIAL_USE_TTL, MailboxRegistry


@attrs.define(eq=False)
class Box:
    """What the registry uses of a selected mailbox: its user, its name, ``changed()``."""

    address: str
    name: str
    woken: int = 0

    @property
    def mail(self) -> Any:
        return self

    def changed(self) -> None:
        self.woken += 1


def test_changed_wakes_only_the_boxes_of_that_user_and_mailbox() -> None:
    """changed(user, mailbox) wakes every box selected on that pair and no other;
    closing a box stops its wake-ups and drops empty keys from the count."""
    reg = MailboxRegistry()
    a1, a2 = Box("alice", "INBOX"), Box("alice", "INBOX")
    other_box, other_user = Box("alice", "Sent"), Box("bob", "INBOX")
    for b in (a1, a2, other_box, other_user):
        reg.open(b)  # type: ignore[arg-type]
    assert reg.count() == 4
    reg.changed("alice", "INBOX")
    assert (a1.woken, a2.woken, other_box.woken, other_user.woken) == (1, 1, 0, 0)
    reg.close(a1)  # type: ignore[arg-type]
    reg.close(a1)  # type: ignore[arg-type]  # twice: harmless
    reg.changed("alice", "INBOX")
    assert (a1.woken, a2.woken) == (1, 2)
    reg.close(a2)  # type: ignore[arg-type]
    assert ("alice", "INBOX") not in reg.boxes and reg.count() == 2


def test_special_use_mark_lasts_the_ttl_and_a_change_drops_it() -> None:
    """A user marked at t is known until t + SPECIAL_USE_TTL (exclusive) and forgotten
    after; special_use_changed forgets at once."""
    reg = MailboxRegistry()
    assert not reg.special_use_known("alice", 0.0)
    reg.special_use_found("alice", 10.0)
    assert reg.special_use_known("alice", 10.0 + SPECIAL_USE_TTL - 0.5)
    assert not reg.special_use_known("alice", 10.0 + SPECIAL_USE_TTL)
    assert "alice" not in reg.special_use_seen  # an expired mark is dropped when read
    reg.special_use_found("alice", 100.0)
    reg.special_use_changed("alice")
    assert not reg.special_use_known("alice", 100.0)


def test_special_use_memory_is_bounded_least_recently_marked_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At most SPECIAL_USE_MAX users are remembered; a re-mark refreshes a user, so the
    least recently marked one is dropped first."""
    monkeypatch.setattr(_imap_registry, "SPECIAL_USE_MAX", 2)
    reg = MailboxRegistry()
    reg.special_use_found("a", 0.0)
    reg.special_use_found("b", 0.0)
    reg.special_use_found("a", 1.0)  # a is now the most recent
    reg.special_use_found("c", 1.0)
    assert list(reg.special_use_seen) == ["a", "c"]
    assert not reg.special_use_known("b", 1.0)
