"""The delivery workers' shared board: what a worker publishes is what the main process reads."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from yimaporc.yima.workerboard import COUNTERS, Board, BoardRow, session_key


@pytest.fixture
def board() -> Iterator[Board]:
    b = Board.create(rows=4)
    try:
        yield b
    finally:
        b.close()


def _row(sid: str, gen: int = 1, packets: int = 0) -> tuple[str, BoardRow]:
    return sid, BoardRow(session_key(sid), gen, 2, 3, packets, packets, packets * 1316, 1, 0.07)


def test_counters_and_rows_read_back_through_a_second_mapping(board: Board) -> None:
    """Counters and session rows published on one mapping are read on another of the same
    memory (as the main process maps what the worker writes)."""
    reader = Board(board.fd, rows=4)
    assert reader.read() == (dict.fromkeys(COUNTERS, 0), {})
    board.publish({"packets_sent": 40, "resent": 2}, [_row("a", packets=30), _row("b", packets=10)])
    counters, rows = reader.read()
    assert counters["packets_sent"] == 40 and counters["resent"] == 2
    assert counters["rows_overflow"] == 0
    assert rows[session_key("a")] == _row("a", packets=30)[1]
    assert rows[session_key("b")].bytes == 10 * 1316
    # Only changed rows are rewritten: "a" moves on, "b" keeps its last row.
    board.publish({"packets_sent": 45}, [_row("a", packets=35)])
    _, rows = reader.read()
    assert rows[session_key("a")].packets == 35 and rows[session_key("b")].packets == 10


def test_a_forgotten_session_frees_its_row_for_the_next(board: Board) -> None:
    """A stopped session's row is cleared and reused; beyond the board's rows sessions are
    left out and counted, never written past the end."""
    board.publish({}, [_row(f"s{i}") for i in range(4)])
    board.forget("s1")
    board.forget("nobody")
    _, rows = board.read()
    assert session_key("s1") not in rows and len(rows) == 3
    board.publish({}, [_row("s4"), _row("s5")])
    counters, rows = board.read()
    assert session_key("s4") in rows and session_key("s5") not in rows
    assert counters["rows_overflow"] == 1 and len(rows) == 4


def test_a_board_left_mid_write_still_reads(board: Board) -> None:
    """A worker killed while writing leaves the sequence odd: the reader gives up waiting
    and takes what is there (the dead worker's last cursors)."""
    board.publish({"packets_sent": 7}, [_row("a", packets=7)])
    struct.pack_into("=Q", board.mm, 0, 3)  # odd: a write that never ends
    counters, rows = board.read()
    assert counters["packets_sent"] == 7 and rows[session_key("a")].node_seq == 7


def test_session_keys_are_stable_and_never_zero() -> None:
    """A session's key is the same in every process (a digest, not hash()) and never the
    free-row marker 0."""
    assert session_key("abc") == session_key("abc") != session_key("abd")
    assert all(session_key(f"s{i}") != 0 for i in range(1000))
