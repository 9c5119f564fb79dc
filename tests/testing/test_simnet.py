"""SimNet: the test harnesses' network on one simulation kernel."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.protocols import amp

from yimaporc.cluster.rpc import PeerUnavailable
from yimaporc.testing.simnet import T0, SimNet, Watched


class Refused(Exception):
    """A declared error."""


class Add(amp.Command):
    arguments = [(b"a", amp.Integer()), (b"b", amp.Integer())]
    response = [(b"sum", amp.Integer())]
    errors = {Refused: b"REFUSED"}


def adder(net: SimNet, at: str, ran: list[tuple[str, float]]) -> Any:
    def add(a: int, b: int) -> dict[str, int]:
        ran.append((at, net.seconds()))
        if a < 0:
            raise Refused("negative")
        if b < 0:
            raise ValueError("undeclared")
        return {"sum": a + b}

    return lambda name: (Add, add) if name == Add.commandName else None


def test_amp_calls_cross_the_kernel_and_the_encoding() -> None:
    """A call runs on the callee's host once the kernel runs, with the latency each way;
    declared errors arrive as themselves, others as UnknownRemoteError, and a box the
    callee cannot parse is an error answer."""
    net = SimNet(1, latency=0.01)
    assert net.seconds() == T0
    net.host("a"), net.host("b")
    ran: list[tuple[str, float]] = []
    d = net.amp_call("a", "b", adder(net, "b", ran), Add, {"a": 1, "b": 2})
    assert not net.fired(d) and ran == []
    assert net.result_of(d, within=0.05) == {"sum": 3}
    assert ran == [("b", pytest.approx(T0 + 0.01))]
    assert net.seconds() == pytest.approx(T0 + 0.02)
    with pytest.raises(Refused):
        net.result_of(net.amp_call("a", "b", adder(net, "b", ran), Add, {"a": -1, "b": 0}), 1)
    with pytest.raises(amp.UnknownRemoteError):
        net.result_of(net.amp_call("a", "b", adder(net, "b", ran), Add, {"a": 1, "b": -1}), 1)
    bad = amp.AmpBox(a=b"x", b=b"1")
    with pytest.raises(amp.UnknownRemoteError):
        net.result_of(net.amp_call("a", "b", adder(net, "b", ran), Add, {}, box=bad), 1)


def test_cut_off_hosts_and_sides_fail_calls_as_unavailable() -> None:
    """A host in ``down`` or on another side is unreachable (PeerUnavailable); healed,
    calls get through again; a Watched set keeps the topology as it changes."""
    net = SimNet(2)
    for n in "abc":
        net.host(n)
    down = Watched(lambda names: net.set_topology(names))
    down.add("c")
    with pytest.raises(PeerUnavailable):
        net.result_of(net.call("a", "c", lambda r: "hi"))
    assert net.result_of(net.call("a", "b", lambda r: r.host.name)) == "b"
    down.clear()
    assert net.result_of(net.call("a", "c", lambda r: "hi")) == "hi"
    net.set_topology(sides=[{"a"}])
    with pytest.raises(PeerUnavailable):
        net.result_of(net.call("a", "b", lambda r: "hi"))
    assert net.result_of(net.call("b", "c", lambda r: "hi")) == "hi"


def test_result_of_fails_when_nothing_fires_in_time() -> None:
    """result_of runs the kernel at most ``within`` seconds, then fails the test."""
    net = SimNet(3)
    late: Deferred[str] = Deferred()
    net.reactor("a").callLater(2.0, late.callback, "done")
    with pytest.raises(AssertionError, match="not fired"):
        net.result_of(late, within=1.0)
    assert net.result_of(late, within=1.5) == "done"
