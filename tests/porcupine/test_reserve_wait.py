"""APPEND/COPY's UID reservation while the user's manager is out of reach
(retrieval/_usermail.py ``UserMail.reserve``): asked again until the bucket has a
new manager, for a bounded time, instead of an [UNAVAILABLE] that clients such as
mbsync take as final."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from yimaporc.cluster.rpc import PeerUnavailable
from yimaporc.porcupine.retrieval import Fragmented, SingleCopies, UserMail
from yimaporc.porcupine.retrieval._usermail import RESERVE_RETRY, RESERVE_WAIT

USER = "erin@example.org"


class Manager:
    """A user manager answering plans, or out of reach (the killed node)."""

    def __init__(self, name: str, up: bool, first: int = 7) -> None:
        self.name, self.up, self.first = name, up, first
        self.plans = 0

    def delivery_plan(self, address: str, count: int, unfenced: bool = False) -> Deferred[Any]:
        self.plans += 1
        if not self.up:
            return fail(PeerUnavailable(f"{self.name} is out of reach"))
        return succeed((("n1",), self.first, f"{self.name}@2/1.0"))


def _mail(clock: Clock | None, current: list[Manager]) -> UserMail:
    layout = Fragmented(lambda a: "n1", clock=clock)
    mail = UserMail(
        USER, "n1", current[0], lambda n: None, layout, SingleCopies(),  # type: ignore[arg-type]
        users_for=lambda a: current[0],  # type: ignore[arg-type,return-value]
    )  # fmt: skip
    layout.opened(mail, "n1", None)
    return mail


def _outcome(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_a_reservation_waits_for_the_buckets_next_manager() -> None:
    """The manager is killed: each plan fails at once until the view change gives the
    bucket a new manager, whose answer the APPEND then gets (no [UNAVAILABLE])."""
    clock = Clock()
    old, new = Manager("n2", up=False), Manager("n3", up=True, first=40)
    current = [old]
    mail = _mail(clock, current)
    got = _outcome(mail.reserve(1))
    assert got == [] and old.plans == 1
    clock.advance(RESERVE_RETRY)
    clock.advance(RESERVE_RETRY)
    assert got == [] and old.plans == 3
    current[0] = new  # the view change
    clock.advance(RESERVE_RETRY)
    assert got == [(40, "n3@2/1.0")]
    assert mail.counts["reserve_waits"] == 3 and new.plans == 1


def test_a_reservation_gives_up_after_the_bounded_wait() -> None:
    """No new manager within RESERVE_WAIT: the APPEND fails as before (the client gets
    [UNAVAILABLE]), and the lapse is counted."""
    clock = Clock()
    mail = _mail(clock, [Manager("n2", up=False)])
    got = _outcome(mail.reserve(1))
    clock.pump([RESERVE_RETRY] * int(RESERVE_WAIT / RESERVE_RETRY + 2))
    assert len(got) == 1 and isinstance(got[0], Failure) and got[0].check(PeerUnavailable)
    assert mail.counts["reserve_wait_lapsed"] == 1
    assert mail.counts["reserve_waits"] == int(RESERVE_WAIT / RESERVE_RETRY)


def test_other_failures_and_a_layout_without_a_clock_do_not_wait() -> None:
    """Only an unreachable manager is waited for, and only with a reactor to wait on."""
    mail = _mail(None, [Manager("n2", up=False)])
    got = _outcome(mail.reserve(1))
    assert len(got) == 1 and got[0].check(PeerUnavailable) and not mail.counts

    class Refusing(Manager):
        def delivery_plan(self, address: str, count: int, unfenced: bool = False) -> Deferred[Any]:
            self.plans += 1
            return fail(ValueError("no such user"))

    refusing = Refusing("n2", up=True)
    mail = _mail(Clock(), [refusing])
    got = _outcome(mail.reserve(1))
    assert len(got) == 1 and got[0].check(ValueError) and refusing.plans == 1
