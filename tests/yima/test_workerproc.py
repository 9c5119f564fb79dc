"""A delivery worker's own side, on a Clock: its board, and holding delivery while its
node's main process is stopped or silent."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from yimaporc.yima import _workerproc
from yimaporc.yima._workerproc import MAIN_SILENT, PUBLISH_EVERY, WorkerDelivery
from yimaporc.yima.control import StreamAction
from yimaporc.yima.schedule import PAYLOAD
from yimaporc.yima.workerboard import MAX_ROWS, Board, session_key

BLOCK = 10 * PAYLOAD
BLOCKS = 20


class Setup:
    def __init__(self, clock: Clock, delivery: WorkerDelivery, board: Board) -> None:
        self.clock, self.delivery, self.board = clock, delivery, board
        self.sent: list[Any] = []
        self.stopped = False


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    """A WorkerDelivery on a Clock with a board; sends recorded, not made."""
    clock = Clock()
    board = Board.create()
    monkeypatch.setattr(_workerproc, "BOARD_FD", board.fd)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    d = WorkerDelivery(clock, sock)
    d.setup(index=0, send_path="sendto", send_ahead=0.0, cache_bytes=1 << 24, offset=0.0,
            board_rows=MAX_ROWS)  # fmt: skip
    s = Setup(clock, d, board)
    d.stopped_parent = lambda: s.stopped
    assert d.node is not None
    d.node.engine.read_block = lambda m, i: succeed(bytes(BLOCK))
    d.node.send_segments = lambda view, size, addr: s.sent.extend(
        range(0, len(view), size)
    )  # fmt: skip
    # 10 packets per block, a block a second: 10 packets/s from t=1.
    d.start(session="s", generation=1, media="clip", size=BLOCKS * BLOCK, block_size=BLOCK,
            block_starts=[float(i) for i in range(BLOCKS)], duration=float(BLOCKS),
            payload=PAYLOAD, clock_rate=90000, blocks=list(range(BLOCKS)), start_ct=1.0,
            start_mt=0.0, host="127.0.0.1", port=9, ssrc=1, seq_base=0, ts_base=0,
            node_index=0, offset=0.0, state=None)  # fmt: skip
    try:
        yield s
    finally:
        sock.close()
        # the worker's own mapping is left to the process's end, as in a real worker
        board.close()


def _heartbeats(s: Setup, seconds: float, step: float = 0.05) -> None:
    """``seconds`` of the main process speaking every 0.25 s."""
    t = 0.0
    while t < seconds:
        if round(t / step) % 5 == 0:
            s.delivery.heard()
        s.clock.advance(step)
        t += step


def test_the_board_follows_the_ticks_within_the_publish_interval(worker: Setup) -> None:
    """What a worker sent is on its board at most PUBLISH_EVERY later, with the row's
    cursor and counts; a stop clears the row at once."""
    _heartbeats(worker, 3.0)
    worker.clock.advance(PUBLISH_EVERY)
    counters, rows = worker.board.read()
    row = rows[session_key("s")]
    assert counters["packets_sent"] == row.packets == row.node_seq == len(worker.sent) > 0
    assert row.generation == 1
    worker.delivery.control("s", StreamAction.STOP, 0.0, 0.0, 0.0)
    assert worker.board.read()[1] == {}


def test_delivery_is_held_while_the_main_process_is_stopped(worker: Setup) -> None:
    """SIGSTOP of the node's main process: the worker sends nothing more (as the frozen
    in-process engine would not) until the main process speaks again, then goes on."""
    _heartbeats(worker, 3.0)
    before = len(worker.sent)
    assert before > 0
    worker.stopped = True
    worker.clock.pump([0.05] * 40)  # 2 s, no heartbeat
    assert worker.delivery.held
    assert len(worker.sent) - before <= 1  # at most what was due before the next look
    held_at = len(worker.sent)
    worker.clock.pump([0.05] * 40)
    assert len(worker.sent) == held_at
    worker.stopped = False
    _heartbeats(worker, 1.0)
    assert not worker.delivery.held and len(worker.sent) > held_at


def test_delivery_is_held_when_the_main_process_is_silent(worker: Setup) -> None:
    """A main process that says nothing for MAIN_SILENT (hung): delivery held; held only
    after that long, never while heartbeats come."""
    _heartbeats(worker, 5.0)
    assert not worker.delivery.held
    worker.clock.pump([0.05] * round((MAIN_SILENT - 0.2) / 0.05))
    assert not worker.delivery.held
    worker.clock.pump([0.05] * 10)
    assert worker.delivery.held
    sent = len(worker.sent)
    worker.clock.pump([0.05] * 20)
    assert len(worker.sent) == sent
