"""A delivery worker's counters in shared memory: current in the main process, no poll.

Each worker (:mod:`._workerproc`) writes its counters and one row per session
(cursor, node sequence number, packets, bytes, late packets) into a
:class:`Board`, a small shared memory file (``memfd``) the main process created
and hands to the worker as an inherited file descriptor.  The worker publishes
after its delivery ticks (at most every 50 ms, a trailing write after the last
tick) and at once on a session's start, stop and NACK, writing only the rows
that changed; the main process reads the board whenever it needs the numbers (a
status request, ``GET /metrics``, a worker's death): what it reports is what the
worker has sent (at most 50 ms behind; exact once a session stopped), without a
message on the pipe.  The
board outlives the worker's death (the main process holds its own mapping), so
a dead worker's sessions are adopted from their very last cursor.

Layout (native byte order, no padding)::

    header: seq u64 | counters (COUNTERS) i64 each | rows used u32
    row:    key u64 | generation u32 | cursor_block i64 | cursor_packet i64 |
            node_seq i64 | packets i64 | bytes i64 | late_packets i64 | max_late f64

``seq`` is a sequence lock: odd while the worker writes; a reader copies the
board and retries while ``seq`` was odd or changed meanwhile.  ``key`` is a 64-bit
digest of the session id (0: a free row).  A board holds :data:`MAX_ROWS`
sessions; a worker with more leaves the rest out of the board (counted in
``rows_overflow``; their packets still count in the totals).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

__all__ = ["COUNTERS", "MAX_ROWS", "Board", "BoardRow", "session_key"]

#: The worker's counters, in board order (all monotonic).
COUNTERS = (
    "packets_sent",
    "bytes_sent",
    "block_reads",
    "block_read_bytes",
    "block_read_errors",
    "late_waits",
    "late_packets",
    "cache_hits",
    "resent",
    "spooled",
    "datagrams",
    "syscalls",
    "dropped",
    "eagain",
    "errors",
    "rows_overflow",
)
MAX_ROWS = 4096

_SEQ = struct.Struct("=Q")
_HEADER = struct.Struct(f"=Q{len(COUNTERS)}qI")
_ROW = struct.Struct("=QIqqqqqqd")
_USED_AT = _HEADER.size - 4
_USED = struct.Struct("=I")
#: Attempts at a consistent copy before taking the last one.
_READ_TRIES = 100


def session_key(session: str) -> int:
    """The board's 64-bit key of a session id (never 0)."""
    return int.from_bytes(hashlib.blake2b(session.encode(), digest_size=8).digest(), "little") or 1


def board_size(rows: int = MAX_ROWS) -> int:
    """Bytes of a board of ``rows`` rows."""
    return _HEADER.size + rows * _ROW.size


class BoardRow(NamedTuple):
    """One session as its worker last published it (a tuple: packed as it is)."""

    key: int
    generation: int
    cursor_block: int
    cursor_packet: int
    node_seq: int
    packets: int
    bytes: int
    late_packets: int
    max_late: float


class Board:
    """A mapping of a board: the worker writes (:meth:`publish`), the main process
    reads (:meth:`read`).  ``Board.create()`` makes the shared file (main process);
    ``Board(fd)`` maps an inherited one (worker)."""

    def __init__(self, fd: int, rows: int = MAX_ROWS) -> None:
        self.fd = fd
        self.rows = rows
        self.mm = mmap.mmap(fd, board_size(rows))
        self._seq = 0
        self._used = 0
        #: Writer side: session id -> row index; free rows below ``_used``.
        self._slots: dict[str, int] = {}
        self._free: list[int] = []
        self.overflow = 0

    @classmethod
    def create(cls, rows: int = MAX_ROWS) -> Board:
        """A new zeroed board in anonymous shared memory (a memfd; a deleted file in
        /dev/shm or the temporary directory where there is none)."""
        size = board_size(rows)
        memfd = getattr(os, "memfd_create", None)
        if memfd is not None:
            # close-on-exec: only the worker it is mapped to (fd 4) inherits it
            fd = memfd("yimaporc-worker-board", getattr(os, "MFD_CLOEXEC", 1))
        else:  # pragma: no cover (not Linux)
            base = "/dev/shm" if os.path.isdir("/dev/shm") else None
            fd, path = tempfile.mkstemp(prefix="yimaporc-board-", dir=base)
            os.unlink(path)
        os.ftruncate(fd, size)
        return cls(fd, rows)

    def close(self) -> None:
        """Unmap and close (either side)."""
        try:
            self.mm.close()
        finally:
            try:
                os.close(self.fd)
            except OSError:
                pass

    # --- the worker's side -------------------------------------------------------------

    def publish(self, counters: Mapping[str, int], rows: Iterable[tuple[str, BoardRow]]) -> None:
        """Write ``counters`` and the rows of the sessions that changed."""
        mm = self.mm
        self._seq += 1
        _SEQ.pack_into(mm, 0, self._seq)  # odd: being written
        for sid, row in rows:
            at = self._slot(sid)
            if at is not None:
                _ROW.pack_into(mm, _HEADER.size + at * _ROW.size, *row)
        values = [int(counters.get(name, 0)) for name in COUNTERS]
        values[-1] = self.overflow
        self._seq += 1
        _HEADER.pack_into(mm, 0, self._seq, *values, self._used)

    def forget(self, session: str) -> None:
        """Free ``session``'s row (the session stopped here)."""
        at = self._slots.pop(session, None)
        if at is None:
            return
        self._seq += 1
        _SEQ.pack_into(self.mm, 0, self._seq)
        self.mm[_HEADER.size + at * _ROW.size : _HEADER.size + (at + 1) * _ROW.size] = bytes(
            _ROW.size
        )
        self._free.append(at)
        self._seq += 1
        _SEQ.pack_into(self.mm, 0, self._seq)

    def _slot(self, session: str) -> int | None:
        at = self._slots.get(session)
        if at is not None:
            return at
        if self._free:
            at = self._free.pop()
        elif self._used < self.rows:
            at = self._used
            self._used += 1
            _USED.pack_into(self.mm, _USED_AT, self._used)
        else:
            self.overflow += 1
            return None
        self._slots[session] = at
        return at

    # --- the main process's side -------------------------------------------------------

    def read(self) -> tuple[dict[str, int], dict[int, BoardRow]]:
        """A consistent copy: the counters, and the rows by session key."""
        mm = self.mm
        # A writer that never finishes (it died mid-write): the last copy is taken.
        for _ in range(_READ_TRIES):
            (seq,) = _SEQ.unpack_from(mm, 0)
            used = min(self.rows, _USED.unpack_from(mm, _USED_AT)[0])
            raw = mm[: _HEADER.size + used * _ROW.size]
            if not seq & 1 and _SEQ.unpack_from(mm, 0)[0] == seq:
                break
        head = _HEADER.unpack_from(raw, 0)
        counters = dict(zip(COUNTERS, head[1:-1], strict=True))
        make = BoardRow._make
        rows = {v[0]: make(v) for v in _ROW.iter_unpack(raw[_HEADER.size :]) if v[0]}
        return counters, rows


def empty_counters() -> dict[str, Any]:
    """Every counter at zero."""
    return dict.fromkeys(COUNTERS, 0)
