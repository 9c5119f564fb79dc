"""StreamingNode: three nodes serve their own blocks of one session; control and NACKs."""

from __future__ import annotations

import struct

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

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
        n.control("s1", "pause", 0.0, 0.0)
    clock.advance(5.0)
    assert len(wire) == n0
    for n in nodes:
        n.control("s1", "resume", clock.seconds() + 0.1, 0.0)
    clock.advance(0.5)
    assert len(wire) > n0
    assert nodes[0].nack("s1", [0, 0, 1]) == {"resent": 2}
    for n in nodes:
        n.control("s1", "stop", 0.0, 0.0)
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
