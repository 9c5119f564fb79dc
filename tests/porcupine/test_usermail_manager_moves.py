"""A listing's fragment list and its certainty come from the same manager: when the
bucket moves while the question is out, the new owner (never asked) does not vouch for
the old owner's answer (sim.mail seed 49: an INBOX listed empty, not refused)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from yimaporc.porcupine.retrieval import Fragmented, SingleCopies, UserMail

USER = "u0@example.org"


class Manager:
    """The bits of IUserManager a listing reads; ``fragments`` answers when told."""

    def __init__(self, node_id: str, certain: bool) -> None:
        self.node_id = node_id
        self._certain = certain
        self.asked: list[Deferred[tuple[str, ...]]] = []

    def fragments(self, address: str) -> Deferred[tuple[str, ...]]:
        d: Deferred[tuple[str, ...]] = Deferred()
        self.asked.append(d)
        return d

    def certain(self, address: str) -> bool:
        return self._certain

    def horizon_of(self, address: str) -> Any:
        return None

    def away_of(self, address: str) -> tuple[str, ...]:
        return ()


def test_the_manager_asked_is_the_one_whose_certainty_counts() -> None:
    """The old owner answers (no fragments, not certain) after the map gave the bucket to
    another node: the listing is uncertain (refused), not complete."""
    old, new = Manager("p0", certain=False), Manager("p1", certain=True)
    owner = [old]
    mail = UserMail(
        USER,
        "p0",
        old,  # type: ignore[arg-type]
        lambda n: None,  # type: ignore[arg-type,return-value]
        Fragmented(lambda a: "p0"),
        SingleCopies(),
        users_for=lambda a: owner[0],  # type: ignore[arg-type,return-value]
    )
    out: list[Any] = []
    mail.nodes().addCallback(out.append)
    owner[0] = new  # the map moved the bucket while the question was out
    (d,) = old.asked
    d.callback(())
    assert out == [["p0"]] and not new.asked
    assert mail.uncertain
    assert mail.incomplete()
