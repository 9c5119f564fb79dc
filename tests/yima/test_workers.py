"""ShardedStreamingNode: which sessions go to a worker, what is forwarded, a worker's death."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.python.usage import UsageError

from yimaporc.tap.yima import Options, yima_config
from yimaporc.yima._workerchannel import _Packed
from yimaporc.yima.control import StreamAction
from yimaporc.yima.deliverystats import DeliveryStats
from yimaporc.yima.node import YimaConfig
from yimaporc.yima.schedule import PAYLOAD, MediaTiming, Packet
from yimaporc.yima.streaming import Destination
from yimaporc.yima.workerboard import Board, BoardRow, session_key
from yimaporc.yima.workers import (
    RESPAWN_DELAY,
    STATE_FIELDS,
    ShardedStreamingNode,
    WorkerControl,
    WorkerNack,
    WorkerPool,
    WorkerStart,
    default_workers,
    make_pool,
)

BLOCK = 4 * PAYLOAD
M = MediaTiming("clip", 9 * BLOCK, BLOCK, tuple(float(i) for i in range(9)), 9.0)
WAV = MediaTiming("song", 9 * BLOCK, BLOCK, tuple(float(i) for i in range(9)), 9.0)


class FakeWorker:
    """A live worker that records the commands it is sent and answers them."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.ready = True
        self.dead = False
        self.pid = 4000 + index
        self.sessions: set[str] = set()
        self.counters: dict[str, int] = {}
        self.calls: list[tuple[type[amp.Command], dict[str, Any]]] = []

    def call(self, command: type[amp.Command], **kwargs: Any) -> Deferred[Any]:
        self.calls.append((command, kwargs))
        if command is WorkerNack:
            return succeed({"resent": len(kwargs["node_seqs"])})
        return succeed({})

    def starts(self) -> list[dict[str, Any]]:
        return [kw for c, kw in self.calls if c is WorkerStart]


def make(
    clock: Clock, workers: int = 2
) -> tuple[ShardedStreamingNode, list[FakeWorker], list[Any]]:
    wire: list[Any] = []
    pool = WorkerPool(
        clock, workers, locate=lambda m, i: [], read_block=lambda m, i: succeed(b""),
        offset=lambda: 5.0,
    )  # fmt: skip
    fakes = [FakeWorker(i) for i in range(workers)]
    pool.workers = fakes  # type: ignore[assignment]

    def packetize(p: Packet, d: Destination, payload: bytes) -> bytes:
        return p.gseq.to_bytes(4, "big") + payload[:1]

    node = ShardedStreamingNode(
        clock,
        clock.seconds,
        timing=lambda name: {"clip": M, "song": WAV}[name],
        my_blocks=lambda name: [b for b in range(9) if b % 3 == 0],
        read_block=lambda name, b: succeed(bytes([b]) * BLOCK),
        packetize=packetize,
        send=lambda data, addr: wire.append((clock.seconds(), data, addr)),
        pool=pool,
        eligible=lambda name: name == "clip",
    )
    return node, fakes, wire


def start(node: ShardedStreamingNode, sid: str, media: str = "clip", port: int = 5000) -> Any:
    return node.start(sid, media, 1.0, 0.0, "127.0.147.9", port, 77, 100, 0, 0, False)


def test_sessions_are_sharded_over_the_least_loaded_worker() -> None:
    """New sessions go to the worker with the fewest; each gets the whole plan, none is sent here."""
    clock = Clock()
    node, (w0, w1), wire = make(clock)
    for k in range(4):
        assert start(node, f"s{k}") == {"packets": 12}
    assert len(w0.sessions) == len(w1.sessions) == 2
    plan = w0.starts()[0]
    assert plan["blocks"] == [0, 3, 6] and tuple(plan["block_starts"]) == M.block_starts
    assert (plan["start_ct"], plan["start_mt"], plan["offset"]) == (1.0, 0.0, 5.0)
    assert (plan["ssrc"], plan["seq_base"], plan["host"], plan["port"]) == (
        77, 100, "127.0.147.9", 5000
    )  # fmt: skip
    assert plan["state"] is None
    clock.pump([0.05] * 300)
    assert wire == [] and node.engine.sent == 0
    # The readers of the node's sessions (RTCP feedback, status) see them all.
    assert set(node.scheduler.sessions) == {"s0", "s1", "s2", "s3"}


def test_local_destinations_and_ineligible_media_stay_in_process() -> None:
    """A relay of this process and a WAV session are served here, not by a worker."""
    clock = Clock()
    node, fakes, wire = make(clock)
    node.local[("127.0.147.9", 6000)] = lambda data: wire.append(data)
    start(node, "relayed", port=6000)
    start(node, "wav", media="song")
    assert all(f.calls == [] for f in fakes)
    clock.pump([0.05] * 300)
    assert node.engine.sent == 24


def test_no_live_worker_means_in_process() -> None:
    """With every worker dead (or not yet set up) a session is served here."""
    clock = Clock()
    node, fakes, wire = make(clock)
    for f in fakes:
        f.ready = False
    start(node, "s")
    clock.pump([0.05] * 300)
    assert node.engine.sent == 12 and len(wire) == 12


def test_control_and_nack_go_to_the_owner_and_the_mirror_follows() -> None:
    """Pause/speed/stop and NACKs are forwarded to the owning worker; the mirror applies controls."""
    clock = Clock()
    node, (w0, w1), _ = make(clock)
    start(node, "a")
    node.control("a", StreamAction.SPEED, 2.0, 2.0)
    mirror = node.mirror.sessions["a"]
    assert (mirror.speed, mirror.anchor_ct, mirror.anchor_mt) == (2.0, 2.0, 1.0)
    got: list[Any] = []
    d = node.nack("a", [1, 2, 3])
    assert isinstance(d, Deferred)
    d.addCallback(got.append)
    assert got == [{"resent": 3}] and node.resent == 3
    node.control("a", StreamAction.STOP, 0.0, 0.0)
    kinds = [(c.commandName, kw.get("action")) for c, kw in w0.calls]
    assert kinds == [
        (b"yima.worker-start", None), (b"yima.worker-control", "speed"),
        (b"yima.worker-nack", None), (b"yima.worker-control", "stop"),
    ]  # fmt: skip
    assert "a" not in node.scheduler.sessions and "a" not in node.destinations
    assert w0.sessions == set() and w1.calls == []


def test_a_seek_stays_with_its_worker() -> None:
    """StreamStart again for a worker's session goes to the same worker, a new generation."""
    clock = Clock()
    node, (w0, w1), _ = make(clock)
    start(node, "a")
    start(node, "b")
    node.start("a", "clip", 3.0, 4.0, "127.0.147.9", 5000, 77, 100, 0, 0, False)
    assert [s["generation"] for s in w0.starts()] == [1, 2]
    assert w0.starts()[1]["start_mt"] == 4.0 and w0.starts()[1]["blocks"] == [0, 3, 6]
    assert len(w1.starts()) == 1


def test_state_polls_update_the_mirror_unless_stale() -> None:
    """A worker's polled cursor moves the mirror; one from before a seek is ignored."""
    clock = Clock()
    node, (w0, _), _ = make(clock)
    start(node, "a")
    row = {"session": "a", "generation": 1, "cursor_block": 2, "cursor_packet": 1, "node_seq": 9}
    node._worker_state(w0, [row])  # type: ignore[arg-type]
    s = node.mirror.sessions["a"]
    assert (s.cursor_block, s.cursor_packet, s.node_seq) == (2, 1, 9)
    node.start("a", "clip", 3.0, 0.0, "127.0.147.9", 5000, 77, 100, 0, 0, False)  # generation 2
    node._worker_state(w0, [dict(row, node_seq=3, cursor_block=0)])  # type: ignore[arg-type]
    assert node.mirror.sessions["a"].node_seq == 9


def test_a_dead_workers_sessions_are_adopted_from_their_last_cursor() -> None:
    """On a worker's death its sessions go to a live worker with the mirror's full state."""
    clock = Clock()
    node, (w0, w1), _ = make(clock)
    start(node, "a")
    start(node, "b")
    node.control("a", StreamAction.SPEED, 2.0, 1.5)
    row = {"session": "a", "generation": 1, "cursor_block": 1, "cursor_packet": 2, "node_seq": 6}
    node._worker_state(w0, [row])  # type: ignore[arg-type]
    w0.dead = True
    node._worker_died(w0)  # type: ignore[arg-type]
    assert node.owner["a"] is w1 and node.sessions_moved == 1
    adopted = w1.starts()[-1]
    assert adopted["session"] == "a" and adopted["generation"] == 2
    state = dict(zip(STATE_FIELDS, adopted["state"], strict=True))
    assert state == {"anchor_ct": 2.0, "anchor_mt": 1.0, "speed": 1.5, "paused": 0.0,
                     "pause_mt": 0.0, "cursor_block": 1.0, "cursor_packet": 2.0,
                     "node_seq": 6.0}  # fmt: skip


def test_with_no_worker_left_the_main_process_adopts_and_sends_the_rest() -> None:
    """The last worker dying: its session is served here from the polled cursor, numbers going on."""
    clock = Clock()
    node, (w0,), wire = make(clock, workers=1)
    start(node, "a")
    row = {"session": "a", "generation": 1, "cursor_block": 1, "cursor_packet": 0, "node_seq": 4}
    node._worker_state(w0, [row])  # type: ignore[arg-type]
    clock.advance(3.5)
    w0.dead = True
    node._worker_died(w0)  # type: ignore[arg-type]
    assert "a" in node.local_scheduler.sessions and "a" not in node.mirror.sessions
    clock.pump([0.05] * 300)
    # Blocks 3 and 6 (the cursor was at the second of this node's blocks): 8 packets,
    # node numbers 4.. as the dead worker would have numbered them.
    assert sorted(int.from_bytes(d[:4], "big") for _, d, _ in wire) == [
        *range(12, 16), *range(24, 28)
    ]  # fmt: skip
    assert node.local_scheduler.sessions["a"].node_seq == 12


def test_packed_numbers_span_several_amp_values() -> None:
    """A long block list or time index is split over keys of at most 64 KiB and comes back whole."""
    arg = _Packed("d")
    values = [i / 7 for i in range(20001)]
    strings: dict[bytes, bytes] = {}
    arg.toBox(b"starts", strings, {"starts": values}, None)
    assert len(strings) == 3 and all(len(v) <= 0xFFFF for v in strings.values())
    objects: dict[str, Any] = {}
    arg.fromBox(b"starts", strings, objects, None)
    assert objects["starts"] == values
    empty: dict[bytes, bytes] = {}
    arg.toBox(b"x", empty, {"x": []}, None)
    out: dict[str, Any] = {}
    arg.fromBox(b"x", empty, out, None)
    assert out["x"] == []


def test_worker_control_rejects_unknown_actions_before_forwarding() -> None:
    """An unknown action for a worker's session is a ValueError and nothing is forwarded."""
    clock = Clock()
    node, (w0, _), _ = make(clock)
    start(node, "a")
    with pytest.raises(ValueError, match="unknown stream action"):
        node.control("a", "rewind", 0.0, 0.0)
    assert [c for c, _ in w0.calls if c is WorkerControl] == []


def test_workers_option_defaults_to_the_cores_and_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--workers defaults to auto: one per core this process may use, at most 8 (1 on a
    single core: in process); 0..256; else a usage error."""
    base = ["--node-id", "y1", "--data-dir", str(tmp_path),
            "--cluster", "tcp:17946:interface=127.0.147.1"]  # fmt: skip
    o = Options()
    o.parseOptions(base)
    cores = len(os.sched_getaffinity(0))
    assert o["workers_n"] == default_workers() == min(8, cores)
    assert yima_config(o).workers == default_workers()
    assert YimaConfig(node=yima_config(o).node, secret=b"k").workers == default_workers()
    for affinity, expected in ((1, 1), (2, 2), (6, 6), (64, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=affinity: set(range(n)))
        assert default_workers() == expected
    monkeypatch.undo()
    o = Options()
    o.parseOptions([*base, "--workers", "0"])
    assert yima_config(o).workers == 0
    for bad in ("-1", "two", "1.5", "257"):
        with pytest.raises(UsageError, match="--workers"):
            Options().parseOptions([*base, "--workers", bad])


def test_no_pool_for_zero_or_one_worker() -> None:
    """0 or 1 worker: delivery stays in process (no pool is made)."""
    assert make_pool(object(), 0, "auto", 0.0, 1) is None
    assert make_pool(object(), 1, "auto", 0.0, 1) is None


def _boards(fakes: list[FakeWorker]) -> None:
    for f in fakes:
        f.board = Board.create(rows=16)  # type: ignore[attr-defined]


def _published(w: FakeWorker, counters: dict[str, int], *rows: tuple[str, int, int]) -> None:
    """``w`` publishes as a worker does: rows of (session, generation, packets sent)."""
    w.board.publish(counters, [  # type: ignore[attr-defined]
        (sid, BoardRow(session_key(sid), gen, packets // 4, packets % 4, packets, packets,
                       packets * PAYLOAD, 1, 0.08))
        for sid, gen, packets in rows
    ])  # fmt: skip


def _streaming(local_running: list[dict[str, object]]) -> dict[str, Any]:
    return {"packets_sent": 5, "bytes_sent": 5 * PAYLOAD, "late_packets": 0,
            "running": local_running, "send": {"datagrams": 5}}  # fmt: skip


def test_worker_sessions_are_listed_in_status_like_in_process_ones() -> None:
    """A worker's sessions appear in streaming.running with the in-process fields and the
    worker's current numbers (read from its board at the status request, no poll); the
    totals add the workers' counters; a session that sent nothing yet is not listed."""
    clock = Clock()
    node, fakes, _ = make(clock)
    _boards(fakes)
    w0, w1 = fakes
    start(node, "a")
    start(node, "b")
    assert node.owner["a"] is w0 and node.owner["b"] is w1  # type: ignore[comparison-overlap]
    local = DeliveryStats()
    local.sent_run("here", 5, 5 * PAYLOAD, 0, 0.0)
    in_process = local.running(["here"], lambda sid: "clip")
    _published(w0, {"packets_sent": 30, "bytes_sent": 30 * PAYLOAD, "late_packets": 1,
                    "datagrams": 30}, ("a", 1, 30))  # fmt: skip
    doc = _streaming(in_process)
    node.merge_status(doc)
    assert doc["packets_sent"] == 35 and doc["late_packets"] == 1
    assert doc["send"]["datagrams"] == 35
    listed = {r["session"]: r for r in doc["running"]}
    a = listed[hashlib.sha256(b"a").hexdigest()[:10]]
    assert set(a) == set(in_process[0])
    assert a == {"session": a["session"], "media": "clip", "packets": 30,
                 "bytes": 30 * PAYLOAD, "late_packets": 1, "max_late_ms": 80.0}  # fmt: skip
    assert len(doc["running"]) == 2 and doc["running"][0] is a  # busiest first
    # The mirror's cursor follows the board (RTCP NACKs unwrap against it).
    s = node.mirror.sessions["a"]
    assert (s.cursor_block, s.cursor_packet, s.node_seq) == (7, 2, 30)
    # Current, not polled: the next status sees what was published since.
    _published(w0, {"packets_sent": 31, "bytes_sent": 31 * PAYLOAD}, ("a", 1, 31))
    doc = _streaming([])
    node.merge_status(doc)
    assert doc["packets_sent"] == 36 and doc["running"][0]["packets"] == 31
    # A row from before a seek (generation 1 after the seek made it 2) moves nothing.
    node.start("a", "clip", 3.0, 0.0, "127.0.147.9", 5000, 77, 100, 0, 0, False)
    _published(w0, {"packets_sent": 40}, ("a", 1, 40))
    node.merge_status(_streaming([]))
    assert node.mirror.sessions["a"].node_seq == 31
    node.control("a", StreamAction.STOP, 0.0, 0.0)
    doc = _streaming([])
    node.merge_status(doc)
    assert doc["running"] == []


def test_a_dead_worker_board_gives_the_last_cursor_and_its_numbers_carry_on() -> None:
    """When a worker dies its board (still mapped here) gives each session's very last
    cursor: the heir starts from there, the session's packets keep counting across the
    move, the dead worker's totals stay in the node's, and a replacement is started."""
    clock = Clock()
    node, fakes, _ = make(clock)
    _boards(fakes)
    w0, w1 = fakes
    pool = node.pool
    pool._running = True
    pool._spawn = lambda i: FakeWorker(i)  # type: ignore[method-assign,assignment,return-value]
    start(node, "a")
    _published(w0, {"packets_sent": 6}, ("a", 1, 6))
    w0.dead = True
    pool._ended(w0, Failure(ProcessTerminated(signal=9)))  # type: ignore[arg-type]
    assert node.owner["a"] is w1 and pool.deaths == 1  # type: ignore[comparison-overlap]
    state = dict(zip(STATE_FIELDS, w1.starts()[-1]["state"], strict=True))
    assert (state["cursor_block"], state["cursor_packet"], state["node_seq"]) == (1, 2, 6)
    _published(w1, {"packets_sent": 4}, ("a", 2, 4))
    doc = _streaming([])
    node.merge_status(doc)
    assert doc["packets_sent"] == 5 + 6 + 4 and doc["running"][0]["packets"] == 10
    assert doc["workers"]["deaths"] == 1 and doc["workers"]["sessions_moved"] == 1
    clock.advance(RESPAWN_DELAY)
    assert pool.restarts == 1 and pool.workers[0] is not w0
    node.merge_status(doc := _streaming([]))
    assert doc["workers"]["restarts"] == 1
