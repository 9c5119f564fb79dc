"""A relayed session's packets leave a node in runs of ``--relay-batch-ms``.

The relay holds every packet to its due instant anyway (the nodes run the session's
lead ahead of it), so a node may send a relayed session's packets a whole batch at a
time: fewer sends on the node, fewer reads at the relay.  These tests pin that the
batch reaches the scheduler (in process, through StreamStart, through the worker
channel and on adoption), that the runs are that long and never leave after their
deadline, that fan-out sessions are untouched, and that the relay still releases every
packet at its due instant, no earlier than its own look-ahead.
"""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_relay_quickstart import CLIENT, URL, TwoNodes, _b_gseqs, _continuous, _seq
from test_workers import make
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError

from yimaporc.rtsp._machine import ServerSession
from yimaporc.rtsp._wire import TransportSpec
from yimaporc.tap.yima import Options, yima_config
from yimaporc.yima._rtsp_plan import SILENT
from yimaporc.yima._rtsp_relay import MAX_RELAY_BATCH, RELAY_BATCH
from yimaporc.yima._workerchannel import WorkerStart
from yimaporc.yima.engine import DeliveryEngine
from yimaporc.yima.node import YimaNode
from yimaporc.yima.schedule import PAYLOAD, MediaTiming, NodeScheduler, Run
from yimaporc.yima.streaming import Destination, StreamingNode, StreamStart

BLOCK = 100 * PAYLOAD  # 1 s a block: 100 packets/s


def media(blocks: int = 6) -> MediaTiming:
    return MediaTiming(
        "m", blocks * BLOCK, BLOCK, tuple(float(i) for i in range(blocks)), float(blocks)
    )


def drive(
    sessions: list[tuple[str, float]], send_ahead: float = 0.01, seconds: float = 7.0
) -> dict[str, list[tuple[float, Run]]]:
    """An engine on a task.Clock serving ``(session, ahead)`` from cluster time 1.0 (every
    block ready at once); each session's runs as handed to ``emit_run``, with the time."""
    clock = Clock()
    sched = NodeScheduler(prefetch=2.0)
    got: dict[str, list[tuple[float, Run]]] = {sid: [] for sid, _ in sessions}
    eng = DeliveryEngine(
        clock, clock.seconds, sched, lambda m, b: succeed(b"x" * BLOCK),
        lambda p, d: None, emit_run=lambda run, data: got[run[0]].append((clock.seconds(), run)),
        send_ahead=send_ahead,
    )  # fmt: skip
    m = media()
    for sid, ahead in sessions:
        sched.add(sid, m, range(m.blocks), start_ct=1.0, ahead=ahead)
    eng.poke()
    clock.pump([0.001] * round(seconds / 0.001))
    return got


def sends(runs: list[tuple[float, Run]]) -> list[tuple[float, float]]:
    """(sent at, deadline) of every packet of ``runs``."""
    return [(at, d0 + k * step) for at, (_s, _b, _j, n, _ns, d0, step) in runs for k in range(n)]


def test_a_batched_session_leaves_in_runs_of_its_batch_and_never_after_its_deadline() -> None:
    """Batch 100 ms over a 10 ms send-ahead: 600 packets in about 60 runs (one per 100 ms,
    not one per 10 ms), each packet sent at most 100 ms before its deadline and never
    after it; every packet goes once, in order."""
    got = drive([("r", 0.09)])["r"]
    packets = sends(got)
    assert len(packets) == 600
    assert [r[4] for _, r in got] == sorted(r[4] for _, r in got)  # node_seq in order
    assert len(got) <= 600 // 10 + 6 + 1  # one run per batch, plus a split per block
    for at, due in packets:  # (a clock step late at most: the clock's 1 ms steps)
        assert due - 0.1 - 1e-9 <= at <= due + 0.0011, (at, due)
    # each wake-up's first packet goes at its deadline (woken then, as before); a run
    # split at a block's end goes on in the same wake-up
    first = {}
    for at, run in got:
        first.setdefault(at, run[5])
    assert len(first) <= 600 // 10 + 1
    for at, d0 in first.items():
        assert at == pytest.approx(d0, abs=0.0011)


def test_fan_out_sessions_keep_their_timing_beside_a_batched_one() -> None:
    """A fan-out session (no batch) sends exactly the runs, at exactly the instants, it
    sends alone, whether a batched session shares its engine or not; its runs are the
    send-ahead's (10 ms), some 5x more than the batched one's."""
    alone = drive([("f", 0.0)])["f"]
    both = drive([("f", 0.0), ("r", 0.09)])
    assert both["f"] == alone
    assert len(alone) > 4 * len(both["r"])
    for at, due in sends(alone):
        assert due - 0.01 - 1e-9 <= at <= due + 0.0011


@settings(max_examples=60, deadline=None)
@given(
    ahead=st.floats(0.0, 0.5),
    now=st.floats(0.5, 6.0),
    speed=st.sampled_from([0.5, 1.0, 2.0]),
    pause_mt=st.none() | st.floats(0.0, 5.0),
)
def test_a_tick_with_ahead_takes_what_a_tick_at_the_later_horizon_takes(
    ahead: float, now: float, speed: float, pause_mt: float | None
) -> None:
    """A session's ``ahead`` takes exactly the runs a plain tick at ``now + ahead`` takes
    (speed, pause point and all), and its next heap key stays its true next deadline."""
    m = media()
    a, b = NodeScheduler(), NodeScheduler()
    for sch, x in ((a, ahead), (b, 0.0)):
        sch.add("s", m, [0, 2, 3, 5], start_ct=0.3, ahead=x)
        sch.set_speed("s", speed, 0.3)
        if pause_mt is not None:
            sch.pause("s", 0.3, pause_mt)
    assert a.tick_runs(-1.0) == b.tick_runs(-1.0) == []  # nothing due yet: heap keys set
    assert a.tick_runs(now) == b.tick_runs(now + ahead)
    assert a.next_due == b.next_due
    s = b.sessions["s"]
    nxt = s.next_media_time()
    if a.next_due is not None:
        assert nxt is not None and a.next_due == s.deadline(nxt)


def test_a_block_taken_ahead_before_it_is_read_waits_without_counting_late() -> None:
    """A batched session whose run reaches into a block not read yet stops at the block
    boundary; that is not late while the block's first packet is not due, and is once it is."""
    m = media()
    sch = NodeScheduler()
    sch.add("s", m, [0, 1], start_ct=0.0, ahead=0.5)
    ready = {("m", 0)}
    runs = sch.tick_runs(0.6, ready)  # block 0 whole (up to 0.99 s), block 1 from 1.0 not read
    assert sum(r[3] for r in runs) == 100 and sch.late_waits == 0
    assert sch.next_due == pytest.approx(1.0)
    assert sch.tick_runs(1.0, ready) == [] and sch.late_waits == 1  # now it is due: late
    runs = sch.tick_runs(1.0, {("m", 0), ("m", 1)})
    assert runs and runs[0][1] == 1 and runs[0][2] == 0


def _node(send_ahead: float = 0.01) -> StreamingNode:
    clock = Clock()
    return StreamingNode(
        clock, clock.seconds, timing=lambda name: media(), my_blocks=lambda name: [0, 1],
        read_block=lambda name, b: succeed(b"x" * BLOCK), packetize=lambda p, d, b: b"",
        send=lambda data, addr: None, send_ahead=send_ahead,
    )  # fmt: skip


def test_stream_start_batch_becomes_the_sessions_ahead_over_the_send_ahead() -> None:
    """StreamStart's optional ``batch`` (seconds) is kept in the Destination and becomes
    the session's ``ahead`` beyond the engine's send-ahead; none (a fan-out player) or a
    batch shorter than the send-ahead: 0.  The AMP command carries it, optionally."""
    node = _node(send_ahead=0.01)
    args = ("m", 1.0, 0.0, "127.0.180.1", 5000, 7, 0, 0, 0, False)
    node.start("relayed", *args, batch=0.1)
    node.start("fanout", *args)
    node.start("short", *args, batch=0.005)
    ahead = {sid: s.ahead for sid, s in node.scheduler.sessions.items()}
    assert ahead == {"relayed": pytest.approx(0.09), "fanout": 0.0, "short": 0.0}
    assert node.destinations["relayed"].batch == 0.1 and node.destinations["fanout"].batch == 0
    # a seek (StreamStart again) keeps the batch it is given
    node.start("relayed", "m", 2.0, 0.5, "127.0.180.1", 5000, 7, 0, 0, 0, False, batch=0.2)
    assert node.scheduler.sessions["relayed"].ahead == pytest.approx(0.19)
    names = dict(StreamStart.arguments)
    assert names[b"batch"].optional and dict(WorkerStart.arguments)[b"batch"].optional
    box = StreamStart.makeArguments(
        dict(session="s", media="m", start_ct=1.0, start_mt=0.0, host="h", port=1, ssrc=1,
             seq_base=0, ts_base=0, node_index=0, all_blocks=False, batch=0.1), None,
    )  # fmt: skip
    assert StreamStart.parseArguments(box, None)["batch"] == 0.1


def test_workers_get_the_batch_at_start_and_on_adoption() -> None:
    """A sharded node hands a relayed session's batch to its worker in WorkerStart (and
    its mirror keeps the same ``ahead``); a dead worker's heir gets it again; a session
    without one is sent none."""
    clock = Clock()
    node, (w0, w1), _ = make(clock)
    node.start("a", "clip", 1.0, 0.0, "127.0.180.9", 5000, 77, 100, 0, 0, False, batch=0.1)
    node.start("b", "clip", 1.0, 0.0, "127.0.180.9", 5002, 77, 100, 0, 0, False)
    assert w0.starts()[0]["batch"] == 0.1 and w1.starts()[0]["batch"] is None
    assert node.mirror.sessions["a"].ahead == pytest.approx(0.1 - node.engine.send_ahead)
    w0.dead = True
    node._worker_died(w0)  # type: ignore[arg-type]
    adopted = w1.starts()[-1]
    assert adopted["session"] == "a" and adopted["batch"] == 0.1


def test_the_worker_process_schedules_with_the_batch_it_is_sent() -> None:
    """The worker's WorkerStart responder gives its session the batch's ``ahead`` over
    the send-ahead of its WorkerSetup; a start without one: 0."""
    from yimaporc.yima._workerproc import WorkerDelivery

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        d = WorkerDelivery(Clock(), sock)
        d.setup(index=0, send_path="sendto", send_ahead=0.01, cache_bytes=1 << 24,
                offset=0.0)  # fmt: skip
        assert d.node is not None
        d.node.engine.read_block = lambda m, i: succeed(bytes(BLOCK))
        m = media()
        common = dict(media="m", size=m.size, block_size=m.block_size,
                      block_starts=list(m.block_starts), duration=m.duration,
                      payload=m.payload, clock_rate=m.clock_rate, blocks=[0, 1], start_ct=1.0,
                      start_mt=0.0, host="127.0.180.2", port=5000, ssrc=1, seq_base=0,
                      ts_base=0, node_index=0, offset=0.0)  # fmt: skip
        d.start(session="r", generation=1, batch=0.1, **common)  # type: ignore[arg-type]
        d.start(session="f", generation=1, **common)  # type: ignore[arg-type]
        sessions = d.node.scheduler.sessions
        assert sessions["r"].ahead == pytest.approx(0.09) and sessions["f"].ahead == 0.0
        d.node.engine.stop()
        if d._watch is not None:
            d._watch.stop()


def test_a_relayed_play_asks_every_node_for_runs_and_a_fan_out_play_does_not() -> None:
    """PLAY of a relayed session: the other node's StreamStart carries the relay's batch
    (--relay-batch-ms, 100 by default) and this node's own share is batched too; a fan-out
    client's PLAY sends no batch and the nodes keep their send-ahead."""
    t = TwoNodes(block_us=100_000)
    assert t.svc.relay_batch == RELAY_BATCH == 0.1
    t.play(0.0)
    assert t.rpc.of(StreamStart)[-1]["batch"] == 0.1
    own = t.svc.streaming.scheduler.sessions["S1"]
    assert own.ahead == pytest.approx(0.1 - t.svc.streaming.engine.send_ahead)
    f = TwoNodes(block_us=100_000)
    record = f.rpc.call
    f.rpc.call = lambda address, command, **kw: (  # type: ignore[method-assign]
        record(address, command, **kw).addCallback(lambda r: r or {"rtp": 5100, "rtcp": 5101})
    )
    session = ServerSession("S2", 60.0, 0.0, peer="127.0.0.1")
    spec = TransportSpec(client_port=(CLIENT + 2, CLIENT + 3), yima_fanout=True)
    session.streams[URL] = spec
    f.svc.setup(URL, spec, session)
    assert f.svc.plans["S2"].relay_port is None
    got: list[Any] = []
    f.svc.play(session, None).addBoth(got.append)
    assert "batch" not in f.rpc.of(StreamStart)[-1]
    assert f.svc.streaming.scheduler.sessions["S2"].ahead == 0.0


@pytest.mark.parametrize("batch", [0.1, 0.25])
def test_the_relay_releases_runs_sent_early_at_their_due_instants(batch: float) -> None:
    """Both nodes send their shares in runs of ``batch`` (this node's engine and the other
    node's schedule, replayed from its StreamStart): the client still gets every packet,
    in order, none earlier than the relay's look-ahead before its due instant nor later
    than a clock step after it; the relay holds at most the lead plus one batch; this
    node's engine hands its share to the relay once per batch, not per 10 ms."""
    t = TwoNodes(block_us=100_000)  # 100 packets/s
    t.svc.relay_batch = batch
    sent: list[tuple[float, bytes]] = []
    t.svc._send = lambda data, addr: (  # type: ignore[method-assign]
        sent.append((t.reactor.seconds(), bytes(data))) if addr[1] == CLIENT else None
    )
    handed: list[int] = []
    relay_sink = t.svc.streaming.local_batch

    t.play(0.0)
    start = t.rpc.of(StreamStart)[-1]
    assert start["batch"] == batch
    sink = relay_sink[t.plan.relay_addr]
    relay_sink[t.plan.relay_addr] = lambda view, size: (handed.append(len(view)), sink(view, size))
    timing = t.plan.timing
    assert timing is not None
    b = NodeScheduler()  # node b's share as its engine schedules it
    odd = [k for k in range(timing.blocks) if k % 2 == 1]
    b.add("S1", timing, odd, start["start_ct"], start["start_mt"], _node().ahead(batch))
    held = 0
    for _ in range(6000):  # 6 s in 1 ms steps
        now = t.reactor.seconds()
        for _s, blk, j0, count, *_ in b.tick_runs(now + 0.01):
            g0 = blk * timing.packets_per_block + j0
            t.from_b(range(g0, g0 + count))
        assert t.plan.relay is not None
        held = max(held, len(t.plan.relay._heap))
        t.reactor.advance(0.001)
    assert [(_seq(p) - t.plan.seq_offset) & 0xFFFF for _, p in sent] == list(range(len(sent)))
    assert len(sent) >= 280  # the last block's 10 packets are spread to the 30 s end
    ahead = t.svc.relay_send_ahead
    for at, p in sent:
        gseq = (_seq(p) - t.plan.seq_offset) & 0xFFFF
        due = t.svc._relay_due(t.plan, gseq)
        assert due - ahead - 1e-6 <= at <= due + 0.0011, (gseq, at, due)
    # held: the lead (1.5 s) plus one batch at 100 packets/s, with a clock step's slack
    assert held <= round((t.plan.lead + batch) * 100) + 2
    assert t.plan.relay.stats.gaps_skipped == 0 and t.plan.relay.stats.too_late == 0
    stats = t.svc.relay_stats()  # the shared release timer's work, for the bench's counters
    assert stats["releases"] >= stats["clock_wakeups"] > 0
    # this node's own share (even blocks, ~half the packets) in runs of ~batch
    own = sum(handed)
    assert own and len(handed) <= len(_b_gseqs(0, 600)) / (batch * 100) + 35


def test_relay_batch_option_is_checked_and_reaches_the_rtsp_service(tmp_path: Path) -> None:
    """--relay-batch-ms (default 100, 0..250) becomes the node config's relay_batch and
    the streaming service's; anything else is a usage error."""
    base = ["--node-id", "y1", "--data-dir", str(tmp_path),
            "--cluster", "tcp:17946:interface=127.0.180.1", "--workers", "0"]  # fmt: skip
    o = Options()
    o.parseOptions(base)
    assert o["relay_batch"] == pytest.approx(0.1)
    o = Options()
    o.parseOptions([*base, "--relay-batch-ms", "250"])
    config = yima_config(o)
    assert config.relay_batch == pytest.approx(0.25)
    node = YimaNode.from_config(MemoryReactorClock(), config)
    assert node.streaming.relay_batch == pytest.approx(0.25)
    for bad in ("-1", "251", "x", "nan"):
        with pytest.raises(UsageError, match="relay-batch-ms"):
            Options().parseOptions([*base, "--relay-batch-ms", bad])
    # a node sending a session's block is heard by the relay within the early takeover's
    # silence whatever the batch
    assert MAX_RELAY_BATCH < SILENT


def test_destination_batch_defaults_to_none() -> None:
    """A Destination made without a batch (fan-out, older callers) has none."""
    assert Destination("h", 1, 1, 0, 0, 0).batch == 0.0


def test_a_share_taken_over_for_a_relay_is_sent_in_runs_too() -> None:
    """When the other node leaves, the share this node serves in its place (from parity,
    to its own relay) gets the relay's batch as well; the relay still gets every packet
    from where it stood, in order."""
    t = TwoNodes(parity_group=2, block_us=100_000)
    t.play(0.0)
    t.from_b(_b_gseqs(0, 100))
    t.run(1.0)
    old = SimpleNamespace(members=t.svc.node.view.members)
    new = SimpleNamespace(members=[m for m in old.members if m.node_id != "b"])
    t.svc.membership_changed(old, new)  # type: ignore[arg-type]
    taken = t.svc.streaming.scheduler.sessions["S1+b"]
    assert taken.ahead == pytest.approx(RELAY_BATCH - t.svc.streaming.engine.send_ahead)
    assert t.svc.streaming.destinations["S1+b"].batch == RELAY_BATCH
    t.run(3.0)
    assert t.plan.relay is not None and t.plan.relay.stats.gaps_skipped == 0
    assert len(t.out) >= 280 and _continuous(t.out)
