"""StreamingNode: three nodes serve their own blocks of one session; control and NACKs."""

from __future__ import annotations

import struct

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from yimaporc.yima.control import StreamAction
from yimaporc.yima.schedule import PAYLOAD, MediaTiming, Packet
from yimaporc.yima.streaming import Destination, StreamingNode

BLOCK = 4 * PAYLOAD
M = MediaTiming("clip", 9 * BLOCK, BLOCK, tuple(float(i) for i in range(9)), 9.0)


def packetize(p: Packet, d: Destination, payload: bytes) -> bytes:
    return struct.pack("!HBI", (d.seq_base + p.gseq) & 0xFFFF, d.node_index, p.node_seq) + payload


def trio(clock: Clock, wire: list[tuple[float, bytes, tuple[str, int]]]) -> list[StreamingNode]:
    nodes = []
    for i in range(3):
        nodes.append(
            StreamingNode(
                clock,
                clock.seconds,
                timing=lambda name: M,
                my_blocks=lambda name, i=i: [b for b in range(9) if b % 3 == i],
                read_block=lambda name, b: succeed(bytes([b]) * BLOCK),
                packetize=packetize,
                send=lambda data, addr: wire.append((clock.seconds(), data, addr)),
            )
        )
    return nodes


def start(nodes: list[StreamingNode], all_blocks: bool = False) -> int:
    total = 0
    for i, n in enumerate(nodes):
        total += n.start("s1", "clip", 1.0, 0.0, "127.0.0.9", 5000, 77, 65530, 0, i, all_blocks)[
            "packets"
        ]
    return total


def test_bipartite_nodes_cover_every_packet_once_in_time() -> None:
    """Each node sends only its blocks; together every global seq arrives once, on schedule."""
    clock, wire = Clock(), []  # type: ignore[var-annotated]
    nodes = trio(clock, wire)
    assert start(nodes) == 36
    for _ in range(1100):
        clock.advance(0.01)
    seqs = [struct.unpack("!H", d[:2])[0] for _, d, _ in wire]
    assert sorted((s - 65530) & 0xFFFF for s in seqs) == list(range(36)), "wraps 65535 -> 0"
    for t, d, addr in wire:
        gseq = (struct.unpack("!H", d[:2])[0] - 65530) & 0xFFFF
        assert addr == ("127.0.0.9", 5000)
        assert 1.0 + (gseq // 4) + (gseq % 4) * 0.25 <= t + 1e-9
        assert d[7:] == bytes([gseq // 4]) * PAYLOAD
    assert {d[2] for _, d, _ in wire} == {0, 1, 2}


def test_master_slave_master_sends_all() -> None:
    """In master-slave mode one node schedules every block."""
    clock, wire = Clock(), []  # type: ignore[var-annotated]
    master = trio(clock, wire)[0]
    assert master.start("s", "clip", 0.0, 0.0, "h", 1, 1, 0, 0, 0, True)["packets"] == 36


def test_pause_resume_stop_and_nack() -> None:
    """Pause holds, resume continues, a NACK resends once, stop ends the session."""
    clock, wire = Clock(), []  # type: ignore[var-annotated]
    nodes = trio(clock, wire)
    start(nodes)
    clock.advance(1.3)
    n0 = len(wire)
    for n in nodes:
        n.control("s1", StreamAction.PAUSE, 0.0, 0.0)
    clock.advance(5.0)
    assert len(wire) == n0
    for n in nodes:
        n.control("s1", StreamAction.RESUME, clock.seconds() + 0.1, 0.0)
    clock.advance(0.5)
    assert len(wire) > n0
    assert nodes[0].nack("s1", [0, 0, 1]) == {"resent": 2}
    for n in nodes:
        n.control("s1", StreamAction.STOP, 0.0, 0.0)
    before = len(wire)
    clock.advance(20)
    assert len(wire) == before


def test_a_local_destination_gets_packets_without_the_socket() -> None:
    """Packets for an in-process sink (the RTSP node's own relay) bypass ``send``."""
    clock, wire = Clock(), []  # type: ignore[var-annotated]
    nodes = trio(clock, wire)
    handed: list[bytes] = []
    nodes[0].local[("127.0.0.9", 5000)] = handed.append
    start(nodes)
    for _ in range(1100):
        clock.advance(0.01)
    assert handed and all(d[2] == 0 for d in handed), "node 0's packets, to the sink"
    assert {d[2] for _, d, _ in wire} == {1, 2}, "the others still use the socket"
    assert nodes[0].handed_over == len(handed) == 12


def test_stream_start_waits_for_the_time_index() -> None:
    """StreamStart answers, and schedules packets, only once the media's time index is
    loaded; a failed load fails the start and schedules nothing."""
    clock = Clock()
    loads: dict[str, Deferred[None]] = {"clip": Deferred(), "gone": Deferred()}
    asked: list[str] = []

    def timing(name: str) -> MediaTiming:
        asked.append(name)
        return M

    node = StreamingNode(
        clock, clock.seconds, timing=timing, my_blocks=lambda name: [0, 1],
        read_block=lambda name, b: succeed(bytes([b]) * BLOCK), packetize=packetize,
        send=lambda data, addr: None, ready=lambda name: loads[name],
    )  # fmt: skip
    args = dict(start_ct=1.0, start_mt=0.0, host="h", port=1, ssrc=1, seq_base=0,
                ts_base=0, node_index=0, all_blocks=False)  # fmt: skip
    answer = node.start(session="s", media="clip", **args)  # type: ignore[arg-type]
    assert isinstance(answer, Deferred) and not answer.called
    assert "s" not in node.scheduler.sessions and asked == []
    loads["clip"].callback(None)
    got: list[object] = []
    answer.addBoth(got.append)
    assert got == [{"packets": M.packet_count(0) + M.packet_count(1)}]
    assert "s" in node.scheduler.sessions and asked == ["clip"]
    failed = node.start(session="t", media="gone", **args)  # type: ignore[arg-type]
    loads["gone"].errback(KeyError("gone"))
    errors: list[Failure] = []
    assert isinstance(failed, Deferred)
    failed.addErrback(errors.append)
    assert errors and errors[0].check(KeyError) and "t" not in node.scheduler.sessions


def test_a_start_that_waited_is_dropped_if_its_session_was_stopped_meanwhile() -> None:
    """A STOP that arrives while a StreamStart waits (the time index loading, or the
    layout computed off the reactor) wins: the start, when it resumes, schedules
    nothing (counted), so no session streams to nobody until its title ends.  A start
    after the STOP (a seek that starts the session again) is not affected."""
    clock = Clock()
    load: Deferred[None] = Deferred()
    layout: list[Deferred[list[int]]] = []

    def my_blocks(name: str) -> list[int] | Deferred[list[int]]:
        if name == "cold":
            layout.append(Deferred())
            return layout[-1]
        return [0, 1]

    node = StreamingNode(
        clock, clock.seconds, timing=lambda name: M, my_blocks=my_blocks,
        read_block=lambda name, b: succeed(bytes([b]) * BLOCK), packetize=packetize,
        send=lambda data, addr: None,
        ready=lambda name: load if name == "loading" else succeed(None),
    )  # fmt: skip
    args = dict(start_ct=1.0, start_mt=0.0, host="h", port=1, ssrc=1, seq_base=0,
                ts_base=0, node_index=0, all_blocks=False)  # fmt: skip
    from yimaporc.yima.control import StreamAction

    waiting = node.start(session="a", media="loading", **args)  # type: ignore[arg-type]
    node.control("a", StreamAction.STOP, 0.0, 0.0)
    load.callback(None)
    got: list[object] = []
    waiting.addBoth(got.append)  # type: ignore[union-attr]
    assert got == [{"packets": 0}] and "a" not in node.scheduler.sessions
    cold = node.start(session="b", media="cold", **args)  # type: ignore[arg-type]
    node.control("b", StreamAction.STOP, 0.0, 0.0)
    layout[0].callback([0, 1])
    cold.addBoth(got.append)  # type: ignore[union-attr]
    assert got[-1] == {"packets": 0} and "b" not in node.scheduler.sessions
    assert node.late_starts_dropped == 2
    # started again after its STOP: runs
    node.start(session="a", media="clip", **args)  # type: ignore[arg-type]
    assert "a" in node.scheduler.sessions and node.late_starts_dropped == 2


def _rtp_node(
    clock: Clock,
    wire: list[tuple[float, bytes, tuple[str, int]]],
    batched: bool,
    media: MediaTiming,
) -> StreamingNode:
    """One node sending real RTP (the service's header template), batched or per packet."""
    from yimaporc.rtp import PT_MP2T, RtpHeaderTemplate

    def tpl(sid: str, d: Destination) -> RtpHeaderTemplate:
        return RtpHeaderTemplate(PT_MP2T, d.ssrc, d.node_index)

    def packetize(p: Packet, d: Destination, payload: bytes) -> bytes:
        ts = d.ts_base + round(p.media_time * d.clock_rate)
        return tpl(p.session, d).build(d.seq_base + p.gseq, ts, payload, p.node_seq)

    def segments(buf: memoryview, size: int, addr: tuple[str, int]) -> None:
        for at in range(0, len(buf), size):
            wire.append((clock.seconds(), bytes(buf[at : at + size]), addr))

    data = bytes(range(256)) * (media.size // 256 + 1)
    return StreamingNode(
        clock, clock.seconds, timing=lambda name: media,
        my_blocks=lambda name: list(range(media.blocks)),
        read_block=lambda name, b: succeed(data[b * media.block_size : (b + 1) * media.block_size]),
        packetize=packetize,
        send=lambda d, addr: wire.append((clock.seconds(), d, addr)),
        template=tpl if batched else None, send_segments=segments if batched else None,
    )  # fmt: skip


def test_batched_runs_put_the_same_rtp_on_the_wire_as_packet_by_packet() -> None:
    """Packing runs of due packets into one buffer gives byte for byte the datagrams,
    order and send times of the per-packet path (VBR blocks, a short last packet,
    two sessions, sequence numbers wrapping)."""
    starts = (0.0, 0.3, 1.6, 1.7, 3.0)
    m = MediaTiming("clip", 5 * BLOCK - 500, BLOCK, starts, 3.4)
    wires: list[list[tuple[float, bytes, tuple[str, int]]]] = [[], []]
    for batched, wire in ((False, wires[0]), (True, wires[1])):
        clock = Clock()
        node = _rtp_node(clock, wire, batched, m)
        node.start("a", "clip", 1.0, 0.0, "127.0.0.9", 5000, 0xDEADBEEF, 65533, 2**32 - 1000, 3,
                   False)  # fmt: skip
        node.start("b", "clip", 1.05, 0.2, "127.0.0.9", 5002, 7, 100, 0, 0, False)
        for _ in range(600):
            clock.advance(0.01)
    per_dest = [{p: [(t, d) for t, d, a in w if a[1] == p] for p in (5000, 5002)} for w in wires]
    assert per_dest[0] == per_dest[1]
    assert len(per_dest[0][5000]) == 20 and per_dest[0][5000][-1][1][-1:] != b""
    assert len(per_dest[0][5000][-1][1]) == 24 + PAYLOAD - 500


def test_the_block_cache_follows_the_working_set_within_its_memory_bound() -> None:
    """The cache keeps every block the sessions' read-ahead wants (more than the old fixed
    64), and never more bytes than its memory bound."""
    clock, wire = Clock(), []  # type: ignore[var-annotated]
    big = MediaTiming("clip", 200 * BLOCK, BLOCK, tuple(i * 0.01 for i in range(200)), 2.0)
    node = _rtp_node(clock, wire, True, big)
    node.scheduler.prefetch = 2.0
    node.start("a", "clip", 0.5, 0.0, "127.0.0.9", 5000, 1, 0, 0, 0, False)
    clock.advance(0.6)
    eng = node.engine
    assert eng.cache_limit >= 2 * 100 and len(eng.cache) > 64
    assert eng.block_reads == len(eng.cache), "nothing wanted was evicted and read again"
    eng.cache_bytes = 10 * BLOCK
    clock.advance(0.05)
    assert eng.cached_bytes <= 10 * BLOCK + eng.max_reads * BLOCK


def test_a_local_batch_sink_gets_whole_runs_with_the_same_datagrams() -> None:
    """An in-process relay that takes runs gets, per call, the datagrams the socket would
    have carried, byte for byte and in order; nothing goes to the socket."""
    m = MediaTiming("clip", 3 * BLOCK - 100, BLOCK, (0.0, 1.0, 2.0), 3.0)
    wire: list[tuple[float, bytes, tuple[str, int]]] = []
    clock = Clock()
    node = _rtp_node(clock, wire, True, m)
    node.start("a", "clip", -1.6, 0.0, "127.0.0.9", 5000, 5, 7, 9, 1, False)  # 7 due at once
    for _ in range(500):
        clock.advance(0.01)
    expected = [d for _, d, _ in wire]
    wire.clear()
    clock = Clock()
    node = _rtp_node(clock, wire, True, m)
    calls: list[list[bytes]] = []

    def sink(view: memoryview, size: int) -> None:
        calls.append([bytes(view[at : at + size]) for at in range(0, len(view), size)])

    node.local_batch[("127.0.0.9", 5000)] = sink
    node.start("a", "clip", -1.6, 0.0, "127.0.0.9", 5000, 5, 7, 9, 1, False)  # 7 due at once
    for _ in range(500):
        clock.advance(0.01)
    assert wire == [] and [d for c in calls for d in c] == expected
    assert len(calls) < len(expected) and node.handed_over == len(expected) == 12
