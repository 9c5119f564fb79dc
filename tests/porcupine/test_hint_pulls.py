"""HintExchange.pull_hints: a bucket whose pull from a peer is in flight is not asked of
that peer again in the same view (the away manager's own hints name holders whose
hints are not in yet, and the core pulls their buckets at once, while the install's
pull of those buckets is unanswered)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from yimaporc.cluster.rpc import PeerUnavailable
from yimaporc.porcupine._cluster_hints import HintExchange
from yimaporc.porcupine.reconstruct import PULL_RETRY


class Calls:
    """The calls made, each answered when the test says."""

    def __init__(self) -> None:
        self.made: list[tuple[str, list[int], Deferred[Any]]] = []

    def __call__(self, peer: str, command: Any, **kw: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.made.append((peer, kw["buckets"], d))
        return d

    def asked(self) -> list[tuple[str, list[int]]]:
        return [(peer, buckets) for peer, buckets, _ in self.made]


def exchange() -> tuple[HintExchange, Calls, Clock]:
    clock, calls = Clock(), Calls()
    core = SimpleNamespace(
        view_epoch=5,
        pulled=lambda peer, hints, asked: [],
        pull_again=lambda peer, buckets, view: list(buckets) if view == 5 else [],
    )
    um = SimpleNamespace(core=core, receive=lambda *a: True)
    hx = HintExchange(
        "n2", clock, calls, lambda: {"n1", "n2", "n3"}, lambda: 5,
        um, None, None, None, None,  # type: ignore[arg-type]
    )  # fmt: skip
    return hx, calls, clock


def test_a_bucket_in_flight_is_not_pulled_again_from_that_peer_in_that_view() -> None:
    hx, calls, _ = exchange()
    hx.pull_hints("n3", [1, 2], 5)
    hx.pull_hints("n3", [2, 3], 5)  # 2 is in flight: only 3 is asked
    hx.pull_hints("n3", [1], 5)  # nothing new: no call
    hx.pull_hints("n1", [1], 5)  # another peer
    hx.pull_hints("n3", [1], 6)  # another view
    assert calls.asked() == [("n3", [1, 2]), ("n3", [3]), ("n1", [1]), ("n3", [1])]
    assert hx.pulls_joined == 2
    calls.made[0][2].callback({"hints": []})  # answered: asked again if wanted
    hx.pull_hints("n3", [1, 2, 3], 5)
    assert calls.asked()[-1] == ("n3", [1, 2])
    assert hx.pulling == {("n3", b, 5) for b in (1, 2, 3)} | {("n1", 1, 5), ("n3", 1, 6)}


def test_a_failed_pull_is_retried_and_no_longer_in_flight() -> None:
    hx, calls, clock = exchange()
    hx.pull_hints("n3", [1, 2], 5)
    calls.made[0][2].errback(PeerUnavailable("n3: gone"))
    assert hx.pulling == set(), "failed: the core may ask again at once"
    hx.pull_hints("n3", [2], 5)
    assert calls.asked() == [("n3", [1, 2]), ("n3", [2])]
    clock.advance(PULL_RETRY)  # the retry asks for 1 (2 is in flight)
    assert calls.asked()[-1] == ("n3", [1])
