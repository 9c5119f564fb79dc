"""CallBatcher: at once when idle, one batch per peer in flight, order kept across kinds."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.protocols import amp

from yimaporc.cluster.batching import BatchItemFailed, CallBatcher
from yimaporc.cluster.rpc import PeerUnavailable


class Starts(amp.Command):
    arguments = [(b"starts", amp.AmpList([(b"n", amp.Integer())]))]
    response = [(b"results", amp.AmpList([(b"n", amp.Integer())]))]


class Stops(amp.Command):
    arguments = [(b"stops", amp.AmpList([(b"n", amp.Integer())]))]
    response = [(b"results", amp.AmpList([]))]


class Rpc:
    """Records calls; each answer is a Deferred the test fires."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, dict[str, Any], Deferred[Any]]] = []

    def call(self, address: str, command: Any, **kw: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((address, command, kw, d))
        return d


def batcher(max_items: int = 64) -> tuple[CallBatcher, Rpc]:
    rpc = Rpc()
    return CallBatcher(rpc, {"start": (Starts, "starts"), "stop": (Stops, "stops")}, max_items), rpc


def test_an_idle_peer_gets_the_item_at_once_and_later_items_wait_for_the_answer() -> None:
    b, rpc = batcher()
    first = b.call("a:1", "start", {"n": 1})
    assert [(c[0], c[1], c[2]) for c in rpc.calls] == [("a:1", Starts, {"starts": [{"n": 1}]})]
    later = [b.call("a:1", "start", {"n": n}) for n in (2, 3, 4)]
    other = b.call("b:1", "start", {"n": 9})  # another peer: not held by a's batch
    assert len(rpc.calls) == 2 and rpc.calls[1][0] == "b:1"
    rpc.calls[0][3].callback({"results": [{"n": 10}]})
    assert first.result == {"n": 10}
    assert rpc.calls[2][2] == {"starts": [{"n": 2}, {"n": 3}, {"n": 4}]}
    rpc.calls[2][3].callback({"results": [{"n": 20}, {"n": 30}, {"n": 40}]})
    assert [d.result for d in later] == [{"n": 20}, {"n": 30}, {"n": 40}]
    assert not other.called
    assert (b.calls, b.items) == (3, 5)


def test_kinds_keep_their_order_and_batches_keep_their_limit() -> None:
    b, rpc = batcher(max_items=2)
    b.call("a:1", "start", {"n": 0})
    for n, kind in enumerate(["start", "start", "start", "stop", "start"], 1):
        b.call("a:1", kind, {"n": n})
    sent = []
    while len(sent) < len(rpc.calls):
        _, command, kw, d = rpc.calls[len(sent)]
        sent.append((command, [i["n"] for i in next(iter(kw.values()))]))
        d.callback({"results": [{}] * len(next(iter(kw.values())))})
    assert sent == [(Starts, [0]), (Starts, [1, 2]), (Starts, [3]), (Stops, [4]), (Starts, [5])]


def test_an_item_error_fails_that_item_and_a_failed_call_fails_its_batch() -> None:
    b, rpc = batcher()
    got: list[Any] = []
    b.call("a:1", "start", {"n": 0}).addErrback(got.append)
    good, bad = b.call("a:1", "start", {"n": 1}), b.call("a:1", "start", {"n": 2})
    rpc.calls[0][3].errback(PeerUnavailable("a:1 is down"))  # the first batch
    assert got.pop().check(PeerUnavailable)
    rpc.calls[1][3].callback({"results": [{"n": 1}, {"n": 0, "error": "no media x"}]})
    bad.addErrback(got.append)
    assert good.result == {"n": 1}
    assert got[0].check(BatchItemFailed) and "no media x" in str(got[0].value)
    b.call("a:1", "start", {"n": 3}).addErrback(got.append)
    rpc.calls[2][3].callback({"results": []})  # fewer results than items
    assert got[1].check(BatchItemFailed)


def test_an_unknown_kind_is_refused() -> None:
    b, _ = batcher()
    with pytest.raises(KeyError):
        b.call("a:1", "pause", {})
