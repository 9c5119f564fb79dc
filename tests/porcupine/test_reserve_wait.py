"""APPEND/COPY's UID reservation while the user's manager is out of reach
(retrieval/_usermail.py ``UserMail.reserve``): asked again until the bucket has a
new manager, for a bounded time, instead of an [UNAVAILABLE] that clients such as
mbsync take as final."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from yimaporc.cluster.rpc import PeerMaybeDone, PeerUnavailable
from yimaporc.porcupine.imap_backend import _store_retry
from yimaporc.porcupine.retrieval import Fragmented, Retry, SingleCopies, UserMail
from yimaporc.porcupine.retrieval._usermail import APPEND_WAIT, RESERVE_RETRY, RESERVE_WAIT
from yimaporc.porcupine.values import MailUnavailable

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


def test_a_whole_append_is_tried_again_while_nothing_was_written() -> None:
    """A paused manager: the APPEND's mailbox look-up times out (a read: safe to redo),
    then fails at once until the failure detector replaces the manager; the whole
    attempt is made again every RESERVE_RETRY s and the APPEND succeeds (mbsync takes
    a NO to APPEND as final).  The deadline is shared with the reservation."""
    clock = Clock()
    mail = _mail(clock, [Manager("n2", up=True)])
    deadlines: list[float] = []
    answers: list[Any] = [
        PeerMaybeDone("n2: no answer in 10 s"),
        PeerUnavailable("n2 is out of reach"),
        "stored",
    ]

    def attempt(deadline: float) -> Deferred[Any]:
        deadlines.append(deadline)
        got = answers.pop(0)
        if isinstance(got, Exception):
            return fail(Retry(Failure(got)))
        return succeed(got)

    out = _outcome(mail.failover(attempt))
    clock.advance(RESERVE_RETRY)
    assert out == []
    clock.advance(RESERVE_RETRY)
    assert out == ["stored"] and mail.counts["append_waits"] == 2
    assert deadlines == [APPEND_WAIT] * 3, "one deadline for the whole command"


def test_an_append_gives_up_and_never_retries_a_store_that_may_have_run() -> None:
    """The wait is bounded (the last failure, unwrapped, becomes the NO); a failure
    that is not marked Retry (a store that timed out after its request left: it may
    have been written) is answered at once."""
    clock = Clock()
    mail = _mail(clock, [Manager("n2", up=True)])
    out = _outcome(mail.failover(lambda d: fail(Retry(Failure(PeerUnavailable("n2"))))))
    clock.pump([RESERVE_RETRY] * int(APPEND_WAIT / RESERVE_RETRY + 2))
    assert len(out) == 1 and out[0].check(PeerUnavailable) and not out[0].check(Retry)
    assert mail.counts["append_wait_lapsed"] == 1
    assert APPEND_WAIT < 20.0, "below mbsync's command timeout"
    for f in (Failure(PeerMaybeDone("store timed out")), Failure(PeerUnavailable("refused"))):
        assert _store_retry(f) is f, "a store that failed is never redone"
    unread = Failure(MailUnavailable("[UNAVAILABLE] x"))
    try:
        _store_retry(unread)
    except Retry as e:
        assert e.failure is unread
    else:
        raise AssertionError("a look-up out of reach (nothing written) not retried")
