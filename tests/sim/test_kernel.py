"""The simulation kernel: timers, datagram and stream links, and the fault model."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import (
    IReactorFromThreads,
    IReactorSSL,
    IReactorTCP,
    IReactorTime,
    IReactorUDP,
)
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from yimaporc.sim.kernel import CrashPoint, Faults, SimHost, SimKernel


@pytest.fixture
def kernel() -> Iterator[SimKernel]:
    k = SimKernel(1, faults=Faults(latency=(0.001, 0.002)))
    yield k
    k.close()


def up(kernel: SimKernel, name: str, ip: str, **kw: Any) -> SimHost:
    host = kernel.add_host(name, ip, **kw)
    kernel.boot(host)
    return host


class Sink(DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[tuple[float, bytes, Any]] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None
        self.got.append((self.transport.reactor.kernel.now, data, addr))  # type: ignore[attr-defined]


def pair(kernel: SimKernel) -> tuple[Sink, Sink]:
    """Two hosts a (10.0.0.1) and b (10.0.0.2), each with a datagram sink on port 9."""
    a, b = up(kernel, "a", "10.0.0.1"), up(kernel, "b", "10.0.0.2")
    sa, sb = Sink(), Sink()
    assert a.reactor is not None and b.reactor is not None
    a.reactor.listenUDP(9, sa, interface="10.0.0.1")
    b.reactor.listenUDP(9, sb)
    return sa, sb


def test_reactor_provides_the_interfaces_the_shells_use(kernel: SimKernel) -> None:
    """A host's reactor provides IReactorTime, IReactorUDP, IReactorTCP, IReactorSSL and
    IReactorFromThreads."""
    reactor = up(kernel, "a", "10.0.0.1").reactor
    for iface in (IReactorTime, IReactorUDP, IReactorTCP, IReactorSSL, IReactorFromThreads):
        assert verifyObject(iface, reactor)


def test_timers_run_in_order_on_the_skewed_local_clock(kernel: SimKernel) -> None:
    """callLater runs on the host's clock (true time + skew); cancel and reset work."""
    host = up(kernel, "a", "10.0.0.1", skew=5.0)
    reactor = host.reactor
    assert reactor is not None
    ran: list[tuple[str, float]] = []
    assert reactor.seconds() == 5.0
    reactor.callLater(2.0, lambda: ran.append(("two", kernel.now)))
    reactor.callLater(1.0, lambda: ran.append(("one", kernel.now)))
    gone = reactor.callLater(1.5, lambda: ran.append(("cancelled", kernel.now)))
    moved = reactor.callLater(0.5, lambda: ran.append(("moved", kernel.now)))
    later = reactor.callLater(0.2, lambda: ran.append(("delayed", kernel.now)))
    gone.cancel()
    moved.reset(3.0)
    later.delay(2.6)
    assert [dc.getTime() for dc in reactor.getDelayedCalls()] == pytest.approx([6, 7, 7.8, 8])
    kernel.run_until(10.0)
    assert [name for name, _ in ran] == ["one", "two", "delayed", "moved"]
    assert [t for _, t in ran] == pytest.approx([1.0, 2.0, 2.8, 3.0])
    assert reactor.getDelayedCalls() == []


def test_a_failing_timer_is_logged_like_a_reactor_does(
    kernel: SimKernel, logged_failures: Any
) -> None:
    """An exception in a timer is logged with its traceback; later timers still run."""
    reactor = up(kernel, "a", "10.0.0.1").reactor
    assert reactor is not None
    ran: list[int] = []
    reactor.callLater(1.0, lambda: 1 / 0)
    reactor.callLater(2.0, lambda: ran.append(2))
    kernel.run_until(3.0)
    assert ran == [2]
    assert len(logged_failures.take(ZeroDivisionError)) == 1


def test_datagrams_arrive_after_a_latency_from_the_sender_address(kernel: SimKernel) -> None:
    """A datagram reaches the bound port within the latency range, from the sender's ip:port."""
    sa, sb = pair(kernel)
    assert sa.transport is not None
    sa.transport.write(b"hi", ("10.0.0.2", 9))
    sa.transport.write(b"nobody", ("10.0.0.2", 10))
    sa.transport.write(b"nowhere", ("10.9.9.9", 9))
    kernel.run_until(1.0)
    ((t, data, addr),) = sb.got
    assert 0.001 <= t <= 0.002 and data == b"hi" and addr == ("10.0.0.1", 9)
    assert kernel.datagrams_sent == 3 and kernel.datagrams_delivered == 1


def test_connected_udp_sends_to_its_peer_and_hears_only_it(kernel: SimKernel) -> None:
    """A connected port writes to its peer without an address, refuses another one, and
    drops datagrams from anyone but its peer (as a connected socket does)."""
    sa, sb = pair(kernel)
    c = up(kernel, "c", "10.0.0.3")
    sc = Sink()
    assert c.reactor is not None and sa.transport is not None and sb.transport is not None
    c.reactor.listenUDP(9, sc)
    sb.transport.connect("10.0.0.1", 9)
    with pytest.raises(error.InvalidAddressError):
        sa.transport.connect("a.example", 9)
    with pytest.raises(ValueError):
        sb.transport.write(b"elsewhere", ("10.0.0.3", 9))
    sb.transport.write(b"to a")
    sa.transport.write(b"from a", ("10.0.0.2", 9))
    assert sc.transport is not None
    sc.transport.write(b"from c", ("10.0.0.2", 9))
    kernel.run_until(1.0)
    assert [d for _, d, _ in sa.got] == [b"to a"]
    assert [(d, addr) for _, d, addr in sb.got] == [(b"from a", ("10.0.0.1", 9))]


def test_loss_duplication_and_reordering_are_seeded(kernel: SimKernel) -> None:
    """Loss 1 drops all; duplication 1 doubles all; reordering delays some past later ones."""
    sa, sb = pair(kernel)
    assert sa.transport is not None
    kernel.faults = Faults(latency=(0.001, 0.001), loss=1.0)
    sa.transport.write(b"x", ("10.0.0.2", 9))
    kernel.run_until(1.0)
    assert sb.got == []
    kernel.faults = Faults(latency=(0.001, 0.001), duplicate=1.0)
    sa.transport.write(b"y", ("10.0.0.2", 9))
    kernel.run_until(2.0)
    assert [d for _, d, _ in sb.got] == [b"y", b"y"]
    sb.got.clear()
    kernel.faults = Faults(latency=(0.001, 0.001), reorder=0.5, reorder_extra=0.1)
    for i in range(40):
        sa.transport.write(b"%d" % i, ("10.0.0.2", 9))
    kernel.run_until(3.0)
    order = [int(d) for _, d, _ in sb.got]
    assert sorted(order) == list(range(40)) and order != list(range(40))


def test_partition_and_cut_links(kernel: SimKernel) -> None:
    """Partitions isolate groups; a cut link fails alone, so a bridge still reaches both sides."""
    sa, sb = pair(kernel)
    c = up(kernel, "c", "10.0.0.3")
    sc = Sink()
    assert c.reactor is not None and sa.transport is not None and sb.transport is not None
    c.reactor.listenUDP(9, sc)
    kernel.partition(["a"], ["b", "c"])
    sa.transport.write(b"1", ("10.0.0.2", 9))
    sb.transport.write(b"2", ("10.0.0.3", 9))
    kernel.run_until(1.0)
    assert sb.got == [] and [d for _, d, _ in sc.got] == [b"2"]
    kernel.heal()
    kernel.cut("a", "b")
    assert not kernel.connected("a", "b") and kernel.connected("a", "c")
    assert kernel.connected("c", "b")
    sa.transport.write(b"3", ("10.0.0.2", 9))
    sa.transport.write(b"4", ("10.0.0.3", 9))
    kernel.run_until(2.0)
    assert sb.got == [] and [d for _, d, _ in sc.got] == [b"2", b"4"]


def test_pause_defers_timers_then_arrivals(kernel: SimKernel) -> None:
    """A paused host runs nothing; on resume its late timers run before what arrived."""
    sa, sb = pair(kernel)
    b = kernel.hosts["b"]
    assert b.reactor is not None and sa.transport is not None
    order: list[str] = []
    sb.datagramReceived = lambda data, addr: order.append("datagram")  # type: ignore[method-assign]
    kernel.pause(b, 2.0)
    b.reactor.callLater(1.0, lambda: order.append("timer"))
    sa.transport.write(b"x", ("10.0.0.2", 9))
    kernel.run_until(1.9)
    assert order == []
    kernel.run_until(2.1)
    assert order == ["timer", "datagram"]


def test_receive_loss_drops_arrivals_at_one_host(kernel: SimKernel) -> None:
    """rx_loss 1 on a host drops every datagram that reaches it (a flooded socket)."""
    sa, sb = pair(kernel)
    assert sa.transport is not None
    kernel.hosts["b"].rx_loss = 1.0
    sa.transport.write(b"x", ("10.0.0.2", 9))
    kernel.run_until(1.0)
    assert sb.got == []


def test_crash_kills_timers_and_ports_and_the_disk_survives(kernel: SimKernel) -> None:
    """After a crash the old boot's timers never run; a reboot finds the disk as it was."""
    sa, sb = pair(kernel)
    b = kernel.hosts["b"]
    assert b.reactor is not None and sa.transport is not None
    ran: list[str] = []
    b.reactor.callLater(1.0, lambda: ran.append("old boot"))
    b.reactor.callLater(2.0, lambda: ran.append("old boot, while down"))
    (b.disk / "state").write_text("kept")
    kernel.crash(b)
    kernel.run_until(2.5)
    sa.transport.write(b"x", ("10.0.0.2", 9))
    kernel.run_until(3.0)
    reactor = kernel.boot(b)
    reactor.callLater(1.0, lambda: ran.append("new boot"))
    kernel.run_until(5.0)
    assert ran == ["new boot"] and sb.got == []
    assert (b.disk / "state").read_text() == "kept"


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:
        self.lost = reason


def connect(kernel: SimKernel, src: str, dst: str, timeout: float = 3) -> Deferred[Any]:
    reactor = kernel.hosts[src].reactor
    assert reactor is not None
    endpoint = TCP4ClientEndpoint(reactor, dst, 7, timeout=timeout)
    return endpoint.connect(Factory.forProtocol(Collect))


def result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "not fired"
    return out[0]


def test_stream_link_is_in_order_through_a_client_endpoint(kernel: SimKernel) -> None:
    """TCP4ClientEndpoint connects over the kernel; bytes come back in order; close is seen."""
    up(kernel, "a", "10.0.0.1")
    b = up(kernel, "b", "10.0.0.2")
    assert b.reactor is not None
    port = b.reactor.listenTCP(7, Factory.forProtocol(Echo), interface="10.0.0.2")
    assert port.getHost().port == 7
    d = connect(kernel, "a", "10.0.0.2")
    kernel.run_until(0.1)
    client = result(d)
    assert isinstance(client, Collect) and client.transport is not None
    assert client.transport.getPeer().host == "10.0.0.2"
    for i in range(100):
        client.transport.write(b"%d," % i)
    kernel.run_until(0.2)
    assert client.data == b"".join(b"%d," % i for i in range(100))
    client.transport.loseConnection()
    kernel.run_until(0.3)
    assert client.lost is not None and client.lost.check(error.ConnectionDone)


def test_connect_refused_or_timed_out(kernel: SimKernel) -> None:
    """No listener: refused after a round trip; across a partition: the connect times out."""
    up(kernel, "a", "10.0.0.1")
    up(kernel, "b", "10.0.0.2")
    refused = connect(kernel, "a", "10.0.0.2")
    kernel.run_until(0.1)
    assert result(refused).check(error.ConnectionRefusedError)
    kernel.partition(["a"], ["b"])
    timed_out = connect(kernel, "a", "10.0.0.2", timeout=2)
    kernel.run_until(1.9)
    assert not timed_out.called
    kernel.run_until(2.1)
    assert result(timed_out).check(error.TimeoutError)


def test_cut_link_or_peer_crash_breaks_the_stream(kernel: SimKernel) -> None:
    """A write across a cut link loses the connection; a crashed peer resets it."""
    up(kernel, "a", "10.0.0.1")
    b = up(kernel, "b", "10.0.0.2")
    assert b.reactor is not None
    b.reactor.listenTCP(7, Factory.forProtocol(Echo))
    first = result(_connected(kernel))
    kernel.cut("a", "b")
    first.transport.write(b"x")
    kernel.run_until(kernel.now + 0.1)
    assert first.lost is not None and first.lost.check(error.ConnectionLost)
    kernel.heal()
    second = result(_connected(kernel))
    kernel.crash(b)
    kernel.run_until(kernel.now + 0.1)
    assert second.lost is not None and second.lost.check(error.ConnectionLost)


def _connected(kernel: SimKernel) -> Deferred[Any]:
    d = connect(kernel, "a", "10.0.0.2")
    kernel.run_until(kernel.now + 0.1)
    return d


def _noisy_run(seed: int) -> tuple[str, list[bytes]]:
    k = SimKernel(seed, faults=Faults(loss=0.2, duplicate=0.2, reorder=0.3))
    try:
        sa, sb = pair(k)
        assert sa.transport is not None
        for i in range(50):
            sa.transport.write(b"%d" % i, ("10.0.0.2", 9))
        k.run_until(1.0)
        return k.trace_digest(), [d for _, d, _ in sb.got]
    finally:
        k.close()


def test_same_seed_same_trace() -> None:
    """A run replays exactly from its seed (same trace digest); another seed differs."""
    one, got = _noisy_run(7)
    assert _noisy_run(7) == (one, got)
    other, got_other = _noisy_run(8)
    assert other != one and got_other != got


def test_thread_pool_jobs_finish_after_a_disk_latency_in_any_order(kernel: SimKernel) -> None:
    """deferToThreadPool on a host's pool fires after a seeded latency; jobs submitted
    together finish in some other order; a failing job errbacks."""
    kernel.faults = Faults(disk_latency=(0.001, 0.01))
    reactor = up(kernel, "a", "10.0.0.1").reactor
    assert reactor is not None
    pool = reactor.getThreadPool()
    done: list[int] = []
    for i in range(20):
        deferToThreadPool(reactor, pool, lambda i=i: i).addCallback(done.append)
    failed = deferToThreadPool(reactor, pool, lambda: 1 / 0)
    assert done == []
    kernel.run_until(0.0009)
    assert done == []
    kernel.run_until(0.02)
    assert sorted(done) == list(range(20)) and done != list(range(20))
    assert result(failed).check(ZeroDivisionError)


def test_a_crash_interrupts_thread_jobs(kernel: SimKernel) -> None:
    """A job still running when its host crashes never ran (nor does its callback)."""
    kernel.faults = Faults(disk_latency=(0.01, 0.01))
    host = up(kernel, "a", "10.0.0.1")
    assert host.reactor is not None
    wrote: list[str] = []
    d = deferToThreadPool(host.reactor, host.reactor.getThreadPool(), wrote.append, "x")
    kernel.run_until(0.005)
    kernel.crash(host)
    kernel.run_until(1.0)
    assert wrote == [] and not d.called


def test_a_server_that_dies_during_the_handshake_refuses(kernel: SimKernel) -> None:
    """A server host crashing between SYN and SYN-ACK: the connect fails (no half-open link)."""
    kernel.faults = Faults(latency=(0.01, 0.01))
    up(kernel, "a", "10.0.0.1")
    b = up(kernel, "b", "10.0.0.2")
    assert b.reactor is not None
    b.reactor.listenTCP(7, Factory.forProtocol(Echo))
    d = connect(kernel, "a", "10.0.0.2")
    kernel.run_until(0.015)  # the SYN arrived at b, the SYN-ACK is on its way
    kernel.crash(b)
    kernel.run_until(1.0)
    assert result(d).check(error.ConnectionRefusedError)


def test_host_disks_live_in_a_temporary_root_removed_on_close(tmp_path: Any) -> None:
    """Without disk_root the kernel makes a temporary root on first use and close() removes
    it; a given disk_root is used as it is and kept."""
    k = SimKernel(1)
    disk = k.add_host("a", "10.0.0.1").disk
    assert disk.is_dir() and disk.parent == k.disk_root
    k.close()
    assert not disk.exists()
    given = SimKernel(1, disk_root=tmp_path)
    assert given.add_host("a", "10.0.0.1").disk == tmp_path / "a"
    given.close()
    assert (tmp_path / "a").is_dir()


class Greeter(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"220 hello\r\n")


@pytest.mark.parametrize("seed", range(12))
def test_a_greeting_written_on_connect_reaches_the_client(seed: int) -> None:
    """A server writing in connectionMade (SMTP, POP3, IMAP greetings) is heard by the
    client even when its bytes arrive the instant the SYN-ACK does."""
    with SimKernel(seed, faults=Faults(latency=(0.001, 0.002))) as k:
        up(k, "a", "10.0.0.1")
        b = up(k, "b", "10.0.0.2")
        assert b.reactor is not None
        b.reactor.listenTCP(7, Factory.forProtocol(Greeter))
        d = connect(k, "a", "10.0.0.2")
        k.run_until(0.1)
        assert result(d).data == b"220 hello\r\n"


@pytest.mark.parametrize(
    ("skew", "start"), [(-0.471, 0.0233), (-0.031, 0.0123), (-0.221, 0.0458), (0.3, 0.01)]
)
def test_a_looping_call_on_a_skewed_host_keeps_its_period(
    kernel: SimKernel, skew: float, start: float
) -> None:
    """A LoopingCall on a host whose clock is skewed fires about once per interval and
    time moves on: at the true instant a timer fires, its host's clock reads at least
    the timer's due time (else the call sees itself early and reschedules at once,
    for ever)."""
    host = up(kernel, "a", "10.0.0.1", skew=skew)
    reactor = host.reactor
    assert reactor is not None
    ticks: list[float] = []
    loop = LoopingCall(lambda: ticks.append(reactor.seconds()))
    loop.clock = reactor
    kernel.run_until(start)
    loop.start(1.0, now=False)
    assert not kernel.run_until(start + 9.5, stop=lambda: kernel.events > 10_000)
    loop.stop()
    # nine periods; LoopingCall's own float arithmetic may add a tick a hair late
    assert 9 <= len(ticks) <= 11
    assert ticks[-1] == pytest.approx(start + skew + 9.0)


def test_a_delay_below_the_clock_resolution_still_lets_time_move_on(kernel: SimKernel) -> None:
    """callLater with a positive delay too small to change the float clock fires at a
    later instant (a shell re-arming for a deadline an ulp ahead, on a clock with an
    offset, reaches it instead of firing at one instant for ever)."""
    host = up(kernel, "a", "10.0.0.1", skew=0.3)
    reactor = host.reactor
    assert reactor is not None
    kernel.run_until(15.85)  # the host's clock reads 16.15, above 16: coarser floats
    offset = -0.25  # like cluster_time: the reactor's clock plus an offset, below 16
    deadline = math.nextafter(reactor.seconds() + offset, math.inf)
    fired: list[float] = []

    def tick() -> None:
        now = reactor.seconds() + offset
        fired.append(now)
        if now < deadline:
            reactor.callLater(max(0.0, deadline - now), tick)

    reactor.callLater(max(0.0, deadline - (reactor.seconds() + offset)), tick)
    assert not kernel.run_until(17.0, stop=lambda: len(fired) > 1000)
    assert fired[-1] >= deadline and len(fired) <= 4


def test_a_crash_point_stops_a_host_before_the_nth_matching_step(kernel: SimKernel) -> None:
    """kernel.step lets a process go on until the nth matching step: then the host is
    down, the step refused, later steps refused too, and the program reboots it after
    down_for; a point on another host or not matching counts nothing."""
    boots: list[float] = []
    a = kernel.add_host("a", "10.0.0.1")
    a.program = lambda reactor: boots.append(kernel.now)
    kernel.start(a)
    seen: list[tuple[str, Any]] = []
    point = CrashPoint("a", lambda h, s: seen.append((h, s)) is None and s == "write", 2, 1.5)
    other = CrashPoint("b", lambda h, s: True)
    kernel.crash_points.extend([other, point])
    assert kernel.step(a, "write") and kernel.step(a, "send")
    assert point.seen == 1 and not point.fired and a.up
    assert not kernel.step(a, "write")
    assert point.fired and not a.up and a.reactor is None
    assert not kernel.step(a, "send") and point.seen == 2 and other.seen == 0
    kernel.run_until(1.4)
    assert not a.up and boots == [0.0]
    kernel.run_until(1.6)
    assert a.up and boots == [0.0, 1.5]
    assert kernel.step(a, "write")  # a fired point stays fired


def test_calls_answer_after_two_latencies_or_fail(kernel: SimKernel) -> None:
    """kernel.call runs the handler in the peer's process after a latency and answers
    the caller after another; an error comes back as a failure; a cut link or a down
    peer fails the call; a crashed caller never hears the answer."""
    a, b = up(kernel, "a", "10.0.0.1"), up(kernel, "b", "10.0.0.2")
    ran: list[tuple[float, str]] = []

    def handler(reactor: Any) -> str:
        ran.append((kernel.now, reactor.host.name))
        return "pong"

    got: list[Any] = []
    answered: list[float] = []
    kernel.call(a, "b", handler).addBoth(got.append).addBoth(lambda _: answered.append(kernel.now))
    kernel.run_until(1.0)
    assert got == ["pong"] and len(ran) == 1 and ran[0][1] == "b"
    assert 0.001 <= ran[0][0] <= 0.002 and ran[0][0] + 0.001 <= answered[0] <= ran[0][0] + 0.002
    kernel.call(a, "b", lambda r: 1 // 0).addBoth(got.append)
    kernel.run_until(1.5)
    kernel.cut("a", "b")
    kernel.call(a, "b", handler).addBoth(got.append)
    kernel.run_until(2.0)
    assert got[1].check(ZeroDivisionError) and got[2].check(error.ConnectionLost)
    kernel.heal()
    kernel.crash(b)
    kernel.call(a, "b", handler).addBoth(got.append)
    kernel.run_until(3.0)
    assert got[3].check(error.ConnectionLost) and len(ran) == 1
    kernel.start(b)
    kernel.call(a, "b", handler)
    kernel.crash(a)
    kernel.run_until(4.0)
    assert len(ran) == 2 and len(got) == 4


def test_a_call_whose_handler_answers_later_answers_once_it_fires(kernel: SimKernel) -> None:
    """A handler returning a Deferred: the answer leaves when it fires (a latency later
    it reaches the caller); a peer that crashed meanwhile gives ConnectionLost."""
    a, b = up(kernel, "a", "10.0.0.1"), up(kernel, "b", "10.0.0.2")
    pending: list[Deferred[str]] = []

    def handler(reactor: Any) -> Deferred[str]:
        pending.append(Deferred())
        return pending[-1]

    got: list[Any] = []
    kernel.call(a, "b", handler).addBoth(got.append)
    kernel.run_until(1.0)
    assert len(pending) == 1 and got == []
    pending[0].callback("late")
    assert got == []
    kernel.run_until(1.1)
    assert got == ["late"]
    kernel.call(a, "b", handler).addBoth(got.append)
    kernel.run_until(2.0)
    kernel.crash(b)
    pending[1].callback("from the dead")
    kernel.run_until(3.0)
    assert got[1].check(error.ConnectionLost)


def test_lost_and_duplicated_calls_are_seeded() -> None:
    """With loss a call fails after the call timeout; with duplication its handler runs
    twice and the caller gets one answer; the same seed draws the same fates."""

    def run(seed: int) -> tuple[list[str], int]:
        with SimKernel(seed, faults=Faults(loss=0.3, duplicate=0.3, call_timeout=0.5)) as k:
            a, _ = up(k, "a", "10.0.0.1"), up(k, "b", "10.0.0.2")
            runs: list[int] = []
            fates: list[str] = []
            for i in range(40):
                d = k.call(a, "b", lambda r, i=i: runs.append(i))  # type: ignore[misc]
                d.addCallbacks(
                    lambda _: fates.append("ok"), lambda f: fates.append(f.type.__name__)
                )
            k.run_until(5.0)
            return fates, len(runs)

    fates, runs = run(5)
    assert len(fates) == 40 and "TimeoutError" in fates and "ok" in fates
    assert runs > fates.count("ok")  # some requests ran twice
    assert run(5) == (fates, runs) and run(6) != (fates, runs)
