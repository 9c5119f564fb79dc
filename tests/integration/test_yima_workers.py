"""Delivery workers as real processes: the same bytes as in process, and a worker's death.

The first tests drive one worker process (``python -m yimaporc.yima._workerproc``)
over its AMP pipe from here, synchronously, answering its block questions, and
record what it sends on loopback.  The last one kills a node's worker with
SIGKILL under a real ffmpeg recording.
"""

from __future__ import annotations

import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.protocols import amp

from yimaporc.rtp import PT_MP2T, RtpHeaderTemplate
from yimaporc.testing.procs import (
    NodeProc,
    assert_lag_small,
    ffmpeg_record,
    framemd5,
    views_agree,
    wait_for,
)
from yimaporc.yima.control import StreamAction
from yimaporc.yima.feedback import mark_retransmission
from yimaporc.yima.media.sample import make_sample_ts
from yimaporc.yima.schedule import PAYLOAD, MediaTiming, Packet
from yimaporc.yima.streaming import Destination, StreamingNode
from yimaporc.yima.workerboard import MAX_ROWS, Board, session_key
from yimaporc.yima.workers import (
    WorkerBlockPath,
    WorkerBlockSpool,
    WorkerControl,
    WorkerNack,
    WorkerSetup,
    WorkerStart,
    WorkerState,
)

NET = "127.0.147"
BLOCK = 10 * PAYLOAD
BLOCKS = 7
SIZE = BLOCKS * BLOCK - 3 * PAYLOAD - 100  # the last block is short, its last packet too
MINE = [0, 2, 3, 6]  # this node's share
PLAN = dict(ssrc=0x1234ABCD, seq_base=65500, ts_base=0xFFFFFF00, node_index=1)


class AmpPipe:
    """The main process's end of a worker's channel, synchronous: call and answer."""

    def __init__(self, proc: subprocess.Popen[bytes], answer: Callable[[dict[bytes, bytes]], Any]):
        assert proc.stdin is not None and proc.stdout is not None
        self.proc, self.answer = proc, answer
        self.buf = b""
        self.tag = 0
        self.others: list[socket.socket] = []
        self.on_ready: Callable[[socket.socket], None] = lambda s: None

    def _box(self, deadline: float = 20.0) -> dict[bytes, bytes] | None:
        """The next box, reading other sockets (``on_ready``) meanwhile; None when none yet."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            box = self._parse()
            if box is not None:
                return box
            ready, _, _ = select.select([fd, *self.others], [], [], deadline)
            if not ready:
                return None
            for r in ready:
                if r is fd:
                    data = os.read(fd, 65536)
                    if not data:
                        raise AssertionError(f"worker exited: {self.proc.wait()}")
                    self.buf += data
                else:
                    self.on_ready(r)  # type: ignore[arg-type]

    def _parse(self) -> dict[bytes, bytes] | None:
        box, at = {}, 0
        while True:
            if len(self.buf) < at + 2:
                return None
            n = int.from_bytes(self.buf[at : at + 2], "big")
            if n == 0:
                self.buf = self.buf[at + 2 :]
                return box
            key = self.buf[at + 2 : at + 2 + n]
            at += 2 + n
            if len(self.buf) < at + 2:
                return None
            m = int.from_bytes(self.buf[at : at + 2], "big")
            if len(self.buf) < at + 2 + m:
                return None
            box[key] = self.buf[at + 2 : at + 2 + m]
            at += 2 + m

    def write(self, box: dict[bytes, bytes]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(amp.AmpBox(box).serialize())
        self.proc.stdin.flush()

    def serve(self, timeout: float = 0.2) -> None:
        """Answer the worker's questions for ``timeout`` seconds of quiet."""
        while (box := self._box(timeout)) is not None:
            self._handle(box)

    def _handle(self, box: dict[bytes, bytes]) -> None:
        if b"_command" not in box:
            raise AssertionError(f"unexpected box {box!r}")
        answer = self.answer(box)
        answer[b"_answer"] = box[b"_ask"]
        self.write(answer)

    def call(self, command: type[amp.Command], **kwargs: Any) -> dict[str, Any]:
        self.tag += 1
        tag = str(self.tag).encode()
        box = dict(command.makeArguments(kwargs, None))
        box.update({b"_command": command.commandName, b"_ask": tag})
        self.write(box)
        while True:
            got = self._box()
            if got is None:
                raise AssertionError(f"no answer to {command.__name__}")
            if got.get(b"_answer") == tag:
                return command.parseResponse(got, None)  # type: ignore[no-any-return]
            if b"_error" in got:
                raise AssertionError(f"{command.__name__}: {got!r}")
            self._handle(got)


def _timing() -> MediaTiming:
    starts = tuple(0.05 * i for i in range(BLOCKS))
    return MediaTiming("clip", SIZE, BLOCK, starts, 0.05 * BLOCKS)


def _blocks(tmp_path: Path) -> dict[int, Path]:
    rng = random.Random(7)
    data = rng.randbytes(SIZE)
    out = {}
    for b in range(BLOCKS):
        p = tmp_path / "disk" / f"clip.{b}"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data[b * BLOCK : (b + 1) * BLOCK])
        out[b] = p
    return out


def in_process(timing: MediaTiming, files: dict[int, Path]) -> tuple[list[bytes], list[bytes]]:
    """What the in-process path sends for the plan (the main process's template and
    packetization of MPEG-TS), and what it resends for a NACK of node numbers 1, 5, 30."""
    clock = Clock()
    wire: list[bytes] = []
    tpls: dict[Any, RtpHeaderTemplate] = {}

    def template(sid: str, d: Destination) -> RtpHeaderTemplate:
        return tpls.setdefault(d.ssrc, RtpHeaderTemplate(PT_MP2T, d.ssrc, d.node_index))

    def packetize(p: Packet, d: Destination, payload: bytes) -> bytes:
        ts = d.ts_base + round(p.media_time * d.clock_rate)
        data = template(p.session, d).build(d.seq_base + p.gseq, ts, payload, p.node_seq)
        return mark_retransmission(data) if p.retransmission else data

    def segments(buf: memoryview, size: int, addr: Any) -> None:
        wire.extend(bytes(buf[at : at + size]) for at in range(0, len(buf), size))

    node = StreamingNode(
        clock, clock.seconds, timing=lambda n: timing, my_blocks=lambda n: MINE,
        read_block=lambda n, b: succeed(files[b].read_bytes()), packetize=packetize,
        send=lambda data, addr: wire.append(data), template=template, send_segments=segments,
        send_ahead=0.01,
    )  # fmt: skip
    node.start("s", "clip", 1.0, 0.0, "127.0.0.1", 9, all_blocks=False, **PLAN)
    clock.pump([0.005] * 400)
    sent = list(wire)
    del wire[:]
    node.nack("s", [1, 5, 30])
    return sent, list(wire)


@pytest.fixture
def board() -> Iterator[Board]:
    """The shared board a worker publishes on (its fd 4)."""
    b = Board.create()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def worker(tmp_path: Path, board: Board) -> Iterator[tuple[AmpPipe, socket.socket, socket.socket]]:
    """A worker process sending from ``tx`` (its fd 3) and publishing on ``board`` (fd 4),
    and a receiving socket."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    rx.bind((f"{NET}.20", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind((f"{NET}.21", 0))
    boot = (
        "import os, runpy, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
        "runpy.run_module('yimaporc.yima._workerproc', run_name='__main__')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", boot, str(tx.fileno()), str(board.fd)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, pass_fds=(tx.fileno(), board.fd),
    )  # fmt: skip
    pipe = AmpPipe(proc, lambda box: {})
    try:
        yield pipe, rx, tx
    finally:
        proc.terminate()
        proc.wait(10)
        rx.close()
        tx.close()


def test_a_worker_sends_exactly_what_the_in_process_path_sends(
    worker: tuple[AmpPipe, socket.socket, socket.socket], board: Board, tmp_path: Path
) -> None:
    """Given the plan, a worker process puts on the wire byte for byte the datagrams
    (and NACK resends) the in-process StreamingNode builds, from the node's own socket;
    a block with no local copy is read through the spool and the spool file removed;
    its shared board says what it sent, without asking it."""
    pipe, rx, tx = worker
    timing = _timing()
    files = _blocks(tmp_path)
    expected, resent = in_process(timing, files)
    assert len(expected) == sum(timing.packet_count(b) for b in MINE) == 37
    spool = tmp_path / "spool-6"
    asked: list[tuple[str, int]] = []

    def answer(box: dict[bytes, bytes]) -> dict[bytes, bytes]:
        name = box[b"_command"]
        if name == WorkerBlockPath.commandName:
            args = WorkerBlockPath.parseArguments(box, None)
            asked.append(("path", args["index"]))
            # Block 6 has no local copy: the worker must ask for the spool.
            paths = (
                [] if args["index"] == 6 else [str(tmp_path / "nowhere"), str(files[args["index"]])]
            )
            return dict(WorkerBlockPath.makeResponse({"paths": paths}, None))
        assert name == WorkerBlockSpool.commandName
        args = WorkerBlockSpool.parseArguments(box, None)
        asked.append(("spool", args["index"]))
        spool.write_bytes(files[args["index"]].read_bytes())
        return dict(WorkerBlockSpool.makeResponse({"path": str(spool)}, None))

    got: list[tuple[bytes, Any]] = []
    pipe.answer = answer
    pipe.others = [rx]
    pipe.on_ready = lambda s: got.append(s.recvfrom(65536))
    setup = pipe.call(WorkerSetup, index=0, send_path="auto", send_ahead=0.01,
                      cache_bytes=1 << 24, offset=-5.0, board_rows=MAX_ROWS)  # fmt: skip
    assert setup["path"] in ("gso", "sendmmsg", "sendto")
    # Start 0.3 s from now on a cluster clock 5 s behind this host's.
    start_ct = time.time() - 5.0 + 0.3
    t = timing
    pipe.call(WorkerStart, session="s", generation=1, media="clip", size=t.size,
              block_size=t.block_size, block_starts=t.block_starts, duration=t.duration,
              payload=t.payload, clock_rate=t.clock_rate, blocks=MINE, start_ct=start_ct,
              start_mt=0.0, host=f"{NET}.20", port=rx.getsockname()[1], offset=-5.0,
              state=None, **PLAN)  # fmt: skip
    wait_for(lambda: pipe.serve(0.05) or len(got) >= len(expected), 20, "every datagram")
    assert [d for d, _ in got] == expected
    assert {addr for _, addr in got} == {tx.getsockname()}
    assert sorted(asked) == sorted([("path", b) for b in MINE] + [("spool", 6)])
    assert not spool.exists()
    state = pipe.call(WorkerState, start=0, offset=-5.0)
    counters = {c["name"]: c["value"] for c in state["counters"]}
    assert counters["packets_sent"] == 37 and counters["spooled"] == 1
    assert state["sessions"][0]["node_seq"] == 37
    # The board: the same counters, and the session's row (cursor past its last block).
    on_board, rows = board.read()
    assert {k: on_board[k] for k in counters if k in on_board} == counters
    row = rows[session_key("s")]
    assert (row.generation, row.node_seq, row.packets) == (1, 37, 37)
    assert row.late_packets == counters["late_packets"]  # its only session
    assert row.bytes == sum(timing.block_length(b) for b in MINE)
    got.clear()
    assert pipe.call(WorkerNack, session="s", node_seqs=[1, 5, 30], gseqs=None) == {"resent": 3}
    wait_for(lambda: pipe.serve(0.05) or len(got) >= 3, 10, "the resends")
    assert [d for d, _ in got] == resent
    assert board.read()[0]["resent"] == 3
    pipe.call(WorkerControl, session="s", action=StreamAction.STOP, at=0.0, value=0.0, offset=-5.0)
    assert board.read()[1] == {}


def test_a_worker_exits_when_its_main_process_goes(
    worker: tuple[AmpPipe, socket.socket, socket.socket],
) -> None:
    """A worker whose channel closes (the node died, even by SIGKILL) stops by itself:
    no orphan keeps sending."""
    pipe, _, _ = worker
    pipe.call(WorkerSetup, index=0, send_path="sendto", send_ahead=0.0, cache_bytes=1 << 20,
              offset=0.0)  # fmt: skip
    assert pipe.proc.stdin is not None
    pipe.proc.stdin.close()
    assert pipe.proc.wait(20) == 0


# --- a worker killed under a real player ---------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[list[NodeProc]]:
    """Two bipartite nodes with 2 delivery workers each, holding a 10 s clip."""
    secret = tmp_path / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    nodes = [
        NodeProc("yima", f"y{i}", f"{NET}.{i}", tmp_path / f"y{i}" / "data", 17946, 18080,
                 extra=["--rtsp", f"tcp:18554:interface={NET}.{i}", "--workers", "2"],
                 join=[] if i == 1 else [f"{NET}.1:17946"], secret_file=secret)
        for i in (1, 2)
    ]  # fmt: skip
    try:
        for n in nodes:
            n.start()
        wait_for(lambda: views_agree(nodes), 30, "2 yima nodes to agree")
        wait_for(lambda: all(len((n.status() or {}).get("disks", [])) == 2 for n in nodes), 30,
                 "disks")  # fmt: skip
        clip = tmp_path / "clip.ts"
        make_sample_ts(clip, 10)
        subprocess.run(
            [sys.executable, "-m", "yimaporc.cli", "media", "ingest", str(clip), "--name", "clip",
             "--block-size", "13160", "--admin", nodes[0].admin_url, "--secret-file", str(secret)],
            check=True, capture_output=True,
        )  # fmt: skip
        yield nodes
    finally:
        for n in nodes:
            n.kill(signal.SIGTERM)


def _owner_pid(node: NodeProc) -> int | None:
    doc = node.status() or {}
    for p in doc.get("streaming", {}).get("workers", {}).get("processes", []):
        if p["live"] and p["sessions"]:
            return int(p["pid"])
    return None


def test_sigkill_of_a_worker_mid_stream_the_recording_completes(
    pair: list[NodeProc], tmp_path: Path
) -> None:
    """SIGKILL of the worker serving node 2's share mid-stream: its session moves to the
    other worker from its last cursor, the death is counted, and ffmpeg's recording is
    frame for frame the source but maybe the last, as in process (the gap is within what
    the relay's lead absorbs)."""
    y1, y2 = pair
    out = tmp_path / "out.ts"
    rec = ffmpeg_record(f"rtsp://{NET}.1:18554/clip", out, "udp")
    try:
        pid = wait_for(lambda: _owner_pid(y2), 20, "node 2's worker to serve the share")
        wait_for(lambda: (y2.status() or {})["streaming"]["packets_sent"] > 60, 20, "3 s of play")
        # The worker's session is listed like an in-process one, its numbers current.
        before = (y2.status() or {})["streaming"]
        (listed,) = before["running"]
        assert listed["media"] == "clip" and listed["packets"] > 0
        assert set(listed) == {"session", "media", "packets", "bytes", "late_packets",
                               "max_late_ms"}  # fmt: skip
        os.kill(pid, signal.SIGKILL)
        # Moved: still listed (its packets counted on), served by the other worker.
        wait_for(lambda: (y2.status() or {})["streaming"]["workers"]["sessions_moved"] == 1, 20,
                 "the move")  # fmt: skip
        after = (y2.status() or {})["streaming"]
        assert [r["session"] for r in after["running"]] == [listed["session"]]
        assert after["running"][0]["packets"] >= listed["packets"]
        assert after["packets_sent"] >= before["packets_sent"]
        assert rec.wait(90) == 0, rec.stderr.read() if rec.stderr else ""
    finally:
        if rec.poll() is None:
            rec.kill()
            rec.wait()
    workers = y2.status()["streaming"]["workers"]  # type: ignore[index]
    assert workers["deaths"] == 1 and workers["sessions_moved"] == 1
    relay = y1.status()["streaming"]["relay"]  # type: ignore[index]
    assert relay["skipped"] == 0, relay
    want, got = framemd5(tmp_path / "clip.ts"), framemd5(out)
    # As in process (test_yima_streaming.py): ffmpeg over UDP may lose the last frame.
    assert len(got) >= len(want) - 1
    assert got == want[: len(got)]
    # A replacement worker was started.
    wait_for(lambda: (y2.status() or {})["streaming"]["workers"]["live"] == 2, 20, "a new worker")
    assert y2.status()["streaming"]["workers"]["restarts"] == 1  # type: ignore[index]
    # The main processes' reactors kept up meanwhile (the house bound of the other
    # process tests: this machine is shared).
    assert_lag_small([y1, y2])
    log = y2.log_path.read_text()
    assert "died" in log and "moved" in log


# --- the node's end ends its workers -------------------------------------------------------


def _gone(pid: int) -> bool:
    """``pid`` exited (a zombie nobody reaped yet counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_the_workers_end_with_their_node(tmp_path: Path, sig: int) -> None:
    """A node stopped by SIGTERM ends its workers; one killed by SIGKILL leaves none
    behind either (each worker's control pipe reaches EOF and it exits by itself)."""
    node = NodeProc("yima", "w1", "127.0.151.1", tmp_path / "w1" / "data", 17946, 18080,
                    extra=["--rtsp", "tcp:18554:interface=127.0.151.1", "--workers", "2"])  # fmt: skip
    node.start()
    try:

        def pids() -> list[int] | None:
            w = ((node.status() or {}).get("streaming") or {}).get("workers") or {}
            if w.get("live") != 2:
                return None
            return [int(p["pid"]) for p in w["processes"]]

        workers = wait_for(pids, 30, "2 live workers")
        assert all(not _gone(p) for p in workers)
        node.kill(sig)
        wait_for(lambda: all(_gone(p) for p in workers), 20, "the workers to exit")
    finally:
        node.kill(signal.SIGKILL)
