"""A node's delivery in worker processes (``--workers N``): every core sends.

The main process keeps everything that decides: RTSP, membership, storage
control, the relays, RTCP feedback and NACKs.  Sessions whose packets leave
this node for another address (a fan-out client, another node's relay) are
sharded over ``N`` worker processes; each runs its own
:class:`~.streaming.StreamingNode` (the same scheduler, engine and send path as
the in-process one, so the same bytes leave) on its own reactor.

Processes and channel
    Workers are children spawned with the reactor's ``spawnProcess`` (not
    :mod:`multiprocessing`: forking a process that runs a reactor and thread
    pools is unsafe, and its pickled pipes block), running
    ``python -m yimaporc.yima._workerproc``.  The control channel is AMP over
    the child's stdin/stdout; its stderr is logged here.  The node's RTP socket
    is inherited as fd 3: workers send from the very address and port the node
    sends from, and never read it (RTCP stays here).

Blocks
    A worker asks for a block's paths on this node's disks
    (:class:`WorkerBlockPath`) and reads the file itself, in its own thread
    pool, through the page cache the whole node shares; only when it has no
    local copy (a lost block rebuilt from parity, another node's block in
    master-slave mode) does it ask this process to read it
    (:class:`WorkerBlockSpool`): the block is written to a spool file in
    ``/dev/shm`` which the worker reads and removes.  No block crosses a pipe.

Clock and schedule
    Each :class:`WorkerStart` carries the whole plan (the media timing, this
    node's blocks, the start instant and position, the RTP bases); every
    message carries the cluster clock offset (cluster time = the system clock +
    offset), pushed again every :data:`POLL_INTERVAL` (:class:`WorkerClock`, no
    answer), which is also the main process's heartbeat: a worker holds delivery
    while its main process is stopped (SIGSTOP; it looks every 0.1 s) or silent
    for 1.5 s, as the in-process engine of a frozen node would send nothing, and
    goes on when it speaks again.  Flow control (:class:`WorkerControl`) and
    NACKs (:class:`WorkerNack`) are forwarded to the owning worker.

Counters and sessions in the status
    Each worker publishes its counters and one row per session (cursor, per-node
    sequence number, packets, bytes, late packets) on a shared memory
    :class:`~.workerboard.Board` (fd 4) after its ticks (at most every 50 ms,
    ``_workerproc.PUBLISH_EVERY``) and at once on a start, stop and NACK.  The
    main process reads the boards when it reports (``/api/status``, ``/metrics``,
    the dashboard): a worker's sessions are listed in ``streaming.running`` with
    the same fields as in-process ones, and the totals are what the workers have
    sent (at most 50 ms behind, exact once a session stopped), with no message on
    the pipes.  Every :data:`POLL_INTERVAL` the boards also refresh the mirrors'
    cursors (which RTCP NACK handling unwraps sequence numbers against).

A worker's death
    The main process mirrors each worker session (its plan and every control
    applied, in a :class:`~.schedule.NodeScheduler` that is never ticked).
    When a worker exits (a crash, SIGKILL, OOM), its board, still mapped here,
    gives each of its sessions' last published cursor; the sessions are adopted
    by the live worker with the fewest sessions (the main process when none is
    left) from there, with the same per-node sequence numbers: at most the
    packets of the tick the worker died in go again (duplicates, which players
    and relays drop) and the rest on schedule, so players see a gap of about the
    time the death takes to notice (the pipe's EOF: milliseconds).  A
    replacement worker is started :data:`RESPAWN_DELAY` later.  Counted in
    ``workers.deaths``, ``workers.sessions_moved`` and ``workers.restarts`` of the
    node status (``yimaporc_yima_worker_*`` in ``/metrics``), and logged.

The node's end
    Workers end when the node stops (SIGTERM to each), and by themselves when the
    main process is gone however it ended (SIGKILL included): their stdin, the
    control channel, reaches EOF and the worker's reactor stops.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import tempfile
from collections import ChainMap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from .deliverystats import MAX_LISTED
from .schedule import MediaTiming, NodeScheduler, Session
from .streaming import Destination, StreamControl, StreamingNode, StreamNack
from .workerboard import MAX_ROWS, Board, BoardRow, session_key

__all__ = [
    "POLL_INTERVAL",
    "ShardedStreamingNode",
    "WorkerPool",
    "default_workers",
    "make_pool",
]

#: How often the main process refreshes its mirrors from the boards and looks at the
#: cluster clock offset (pushed to the workers when it moved).
POLL_INTERVAL = 0.25
#: The cap of ``--workers auto``.
AUTO_MAX = 8
#: Sessions per :class:`WorkerState` answer (an AMP value holds at most 64 KiB).
STATE_PAGE = 200
#: A dead worker's replacement starts this long after its death.
RESPAWN_DELAY = 1.0


def default_workers() -> int:
    """``--workers auto``, the default: the cores this process may run on, at most
    :data:`AUTO_MAX` (1 on a single core: delivery stays in process)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        cores = os.cpu_count() or 1
    return max(1, min(AUTO_MAX, cores))


# --- values that do not fit one AMP value ----------------------------------------------


class _Packed(amp.Argument):
    """A sequence of numbers packed with ``struct`` over as many keys as needed
    (``name``, ``name.1``, ...; an AMP value holds at most 64 KiB)."""

    CHUNK = 8000

    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.fmt = fmt

    def toBox(self, name: bytes, strings: dict[bytes, bytes], objects: Any, proto: Any) -> None:
        values = list(objects[name.decode()])
        parts = [values[i : i + self.CHUNK] for i in range(0, len(values), self.CHUNK)] or [[]]
        for i, part in enumerate(parts):
            key = name if i == 0 else name + b".%d" % i
            strings[key] = struct.pack(f"!{len(part)}{self.fmt}", *part)

    def fromBox(self, name: bytes, strings: dict[bytes, bytes], objects: Any, proto: Any) -> None:
        size = struct.calcsize(self.fmt)
        out: list[Any] = []
        i = 0
        while True:
            key = name if i == 0 else name + b".%d" % i
            raw = strings.get(key)
            if raw is None:
                break
            out.extend(struct.unpack(f"!{len(raw) // size}{self.fmt}", raw))
            i += 1
        objects[name.decode()] = out


# --- the control channel ---------------------------------------------------------------


class WorkerSetup(amp.Command):
    """First message to a worker: how to send, how much to cache, the clock."""

    commandName = b"yima.worker-setup"
    arguments = [
        (b"index", amp.Integer()),
        (b"send_path", amp.Unicode()),
        (b"send_ahead", amp.Float()),
        (b"cache_bytes", amp.Integer()),
        (b"offset", amp.Float()),
        # Rows of the shared board on fd 4 (workerboard.py); none: no board.
        (b"board_rows", amp.Integer(optional=True)),
    ]
    response = [(b"pid", amp.Integer()), (b"path", amp.Unicode())]


class WorkerStart(amp.Command):
    """Serve ``blocks`` of a media for a session (a start, a seek, or an adoption)."""

    commandName = b"yima.worker-start"
    arguments = [
        (b"session", amp.Unicode()),
        (b"generation", amp.Integer()),
        (b"media", amp.Unicode()),
        (b"size", amp.Integer()),
        (b"block_size", amp.Integer()),
        (b"block_starts", _Packed("d")),
        (b"duration", amp.Float()),
        (b"payload", amp.Integer()),
        (b"clock_rate", amp.Integer()),
        (b"blocks", _Packed("I")),
        (b"start_ct", amp.Float()),
        (b"start_mt", amp.Float()),
        (b"host", amp.Unicode()),
        (b"port", amp.Integer()),
        (b"ssrc", amp.Integer()),
        (b"seq_base", amp.Integer()),
        (b"ts_base", amp.Integer()),
        (b"node_index", amp.Integer()),
        (b"offset", amp.Float()),
        # An adoption (the owner died): the whole scheduler state to go on from.
        (b"state", amp.ListOf(amp.Float(), optional=True)),
    ]
    response = [(b"packets", amp.Integer())]


class WorkerControl(amp.Command):
    """StreamControl for a session of this worker."""

    commandName = b"yima.worker-control"
    # StreamControl's arguments plus the cluster clock offset
    arguments = [*StreamControl.arguments, (b"offset", amp.Float())]
    response = StreamControl.response


class WorkerNack(amp.Command):
    """StreamNack for a session of this worker."""

    commandName = b"yima.worker-nack"
    arguments = StreamNack.arguments
    response = StreamNack.response


class WorkerClock(amp.Command):
    """The cluster clock offset, and the main process's heartbeat (no answer)."""

    commandName = b"yima.worker-clock"
    arguments = [(b"offset", amp.Float())]
    requiresAnswer = False


class WorkerState(amp.Command):
    """The worker's counters and a page of its sessions' cursors; the clock offset."""

    commandName = b"yima.worker-state"
    arguments = [(b"start", amp.Integer()), (b"offset", amp.Float())]
    response = [
        (
            b"sessions",
            amp.AmpList(
                [
                    (b"session", amp.Unicode()),
                    (b"generation", amp.Integer()),
                    (b"cursor_block", amp.Integer()),
                    (b"cursor_packet", amp.Integer()),
                    (b"node_seq", amp.Integer()),
                ]
            ),
        ),
        (b"next", amp.Integer()),
        (b"counters", amp.AmpList([(b"name", amp.Unicode()), (b"value", amp.Integer())])),
    ]


class WorkerBlockPath(amp.Command):
    """(worker -> main) Where block ``index`` of ``media`` lies on this node's disks."""

    commandName = b"yima.worker-block-path"
    arguments = [(b"media", amp.Unicode()), (b"index", amp.Integer())]
    response = [(b"paths", amp.ListOf(amp.Unicode()))]


class WorkerBlockSpool(amp.Command):
    """(worker -> main) Read the block for me (no local copy): the spool file to read."""

    commandName = b"yima.worker-block-spool"
    arguments = [(b"media", amp.Unicode()), (b"index", amp.Integer())]
    response = [(b"path", amp.Unicode())]


#: The scheduler state an adoption carries (:attr:`WorkerStart.state`), in this order.
STATE_FIELDS = (
    "anchor_ct",
    "anchor_mt",
    "speed",
    "paused",
    "pause_mt",
    "cursor_block",
    "cursor_packet",
    "node_seq",
)


def session_state(s: Session) -> list[float]:
    """``s``'s scheduler state as :data:`STATE_FIELDS` (numbers)."""
    return [float(getattr(s, f)) for f in STATE_FIELDS]


def apply_state(s: Session, state: list[float]) -> None:
    """Put :func:`session_state`'s numbers back into ``s``."""
    anchor_ct, anchor_mt, speed, paused, pause_mt, block, packet, node_seq = state
    s.anchor_ct, s.anchor_mt, s.speed = anchor_ct, anchor_mt, speed
    s.paused, s.pause_mt = bool(paused), pause_mt
    s.cursor_block, s.cursor_packet, s.node_seq = int(block), int(packet), int(node_seq)


class _PipeTransport:
    """What AMP writes to: the child's stdin."""

    def __init__(self, process: Any) -> None:
        self.process = process

    def write(self, data: bytes) -> None:
        self.process.writeToChild(0, data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.process.writeToChild(0, b"".join(data))

    def loseConnection(self) -> None:
        self.process.closeChildFD(0)

    def getPeer(self) -> Any:
        return ("worker", getattr(self.process, "pid", None))

    def getHost(self) -> Any:
        return ("main", os.getpid())


class _Worker(protocol.ProcessProtocol):
    """One worker process: its AMP channel, the sessions it owns, its last counters."""

    log = Logger()

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.amp = amp.AMP(locator=_MainResponder(pool))
        self.sessions: set[str] = set()
        self.counters: dict[str, int] = {}
        self.pid: int | None = None
        self.ready = False
        self.dead = False
        #: The shared board this worker publishes on (None: none, counters by WorkerState).
        self.board: Board | None = None
        #: The offset last pushed.
        self.offset = 0.0
        self._err = b""

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)
        self.amp.makeConnection(_PipeTransport(self.transport))  # type: ignore[arg-type]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self.amp.dataReceived(data)
            return
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        for line in lines:
            if line.strip():
                self.log.info(
                    "worker {i}: {line}", i=self.index, line=line.decode(errors="replace")
                )
        if len(self._err) > 65536:
            self._err = b""

    def processEnded(self, reason: Failure) -> None:
        self.dead = True
        self.amp.connectionLost(reason)
        self.pool._ended(self, reason)

    def call(self, command: type[amp.Command], **kwargs: Any) -> Deferred[Any]:
        if self.dead:
            return fail(RuntimeError(f"worker {self.index} is gone"))
        return self.amp.callRemote(command, **kwargs)  # type: ignore[no-any-return]


class _MainResponder(amp.CommandLocator):
    """What the main process answers its workers."""

    def __init__(self, pool: WorkerPool) -> None:
        super().__init__()
        self.pool = pool

    @WorkerBlockPath.responder
    def block_path(self, media: str, index: int) -> dict[str, Any]:
        return {"paths": self.pool.locate(media, index)}

    @WorkerBlockSpool.responder
    def block_spool(self, media: str, index: int) -> Deferred[dict[str, Any]]:
        return self.pool.spool(media, index).addCallback(lambda path: {"path": path})


class WorkerPool:
    """``count`` delivery worker processes of one node (see module doc).

    ``locate(media, index)`` lists the block's paths on this node's disks;
    ``read_block(media, index)`` reads it the node's way (parity, other nodes);
    ``on_death(worker_sessions)`` is called with a dead worker's sessions.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        count: int,
        *,
        locate: Callable[[str, int], list[str]],
        read_block: Callable[[str, int], Deferred[bytes]],
        offset: Callable[[], float],
        send_path: str = "auto",
        send_ahead: float = 0.0,
        cache_bytes: int = 256 << 20,
        executable: str = sys.executable,
    ) -> None:
        self.reactor = reactor
        self.count = count
        self.locate = locate
        self.read_block = read_block
        self.offset = offset
        self.send_path = send_path
        self.send_ahead = send_ahead
        self.cache_bytes = cache_bytes
        self.executable = executable
        self.workers: list[_Worker] = []
        self.on_death: Callable[[_Worker], None] | None = None
        self.on_board: Callable[[_Worker, dict[int, BoardRow]], None] | None = None
        self.deaths = 0
        #: Replacement workers started after deaths.
        self.restarts = 0
        self.spooled = 0
        #: The last counters of workers that died (the node's totals keep them).
        self.retired: dict[str, int] = {}
        self._fd: int | None = None
        self._running = False
        self._poll: IDelayedCall | None = None
        self._spool_dir: Path | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, data_fd: int) -> None:
        """Spawn the workers, each sending on ``data_fd`` (the node's RTP socket)."""
        self._fd = data_fd
        self._running = True
        # One at a time (the next once this one is set up): a worker's start-up (its
        # imports, ~0.25 s of CPU) competes with the main process only one by one.
        self.workers = [self._spawn(0)]
        self._poll = self.reactor.callLater(POLL_INTERVAL, self._refresh_all)

    def stop(self) -> None:
        """Stop polling and end every worker (closing its stdin ends it)."""
        self._running = False
        if self._poll is not None and self._poll.active():
            self._poll.cancel()
        for w in self.workers:
            if not w.dead and w.transport is not None:
                try:
                    w.transport.signalProcess("TERM")
                except Exception:  # already gone
                    pass
            if w.board is not None:
                w.board.close()
                w.board = None
        if self._spool_dir is not None:
            for f in self._spool_dir.glob("*"):
                f.unlink(missing_ok=True)
            try:
                self._spool_dir.rmdir()
            except OSError:
                pass

    def _spawn(self, index: int) -> _Worker:
        assert self._fd is not None
        w = _Worker(self, index)
        w.board = Board.create()
        argv = [self.executable, "-m", "yimaporc.yima._workerproc"]
        try:
            self.reactor.spawnProcess(
                w, self.executable, argv, env=dict(os.environ),
                childFDs={0: "w", 1: "r", 2: "r", 3: self._fd, 4: w.board.fd},
            )  # fmt: skip
        except Exception:
            w.board.close()
            raise
        w.offset = self.offset()
        d = w.call(
            WorkerSetup,
            index=index,
            send_path=self.send_path,
            send_ahead=self.send_ahead,
            cache_bytes=max(1 << 20, self.cache_bytes // max(1, self.count)),
            offset=w.offset,
            board_rows=MAX_ROWS,
        )
        d.addCallbacks(self._set_up, self._setup_failed, callbackArgs=(w,), errbackArgs=(w,))
        return w

    def _next(self) -> None:
        """Start the next of the first workers, if any is left to start."""
        if self._running and len(self.workers) < self.count:
            self.workers.append(self._spawn(len(self.workers)))

    def _set_up(self, answer: dict[str, Any], w: _Worker) -> None:
        w.ready = True
        self._next()
        self.log.info(
            "delivery worker {i} (pid {pid}) sends by {path}",
            i=w.index,
            pid=answer["pid"],
            path=answer["path"],
        )

    def _setup_failed(self, failure: Failure, w: _Worker) -> None:
        self._next()
        if not w.dead:
            self.log.error(
                "delivery worker {i}: setup failed: {e}", i=w.index, e=failure.getErrorMessage()
            )

    def _ended(self, w: _Worker, reason: Failure) -> None:
        if not self._running:
            return
        self.deaths += 1
        # The board survives its writer: the very last counters and cursors.
        rows = self._read(w)
        if rows is not None and self.on_board is not None:
            self.on_board(w, rows)
        if w.board is not None:
            w.board.close()
            w.board = None
        for k, v in w.counters.items():
            self.retired[k] = self.retired.get(k, 0) + v
        w.counters = {}
        self.log.error(
            "delivery worker {i} (pid {pid}) died ({why}); its {n} sessions move",
            i=w.index,
            pid=w.pid,
            why=reason.getErrorMessage(),
            n=len(w.sessions),
            event="worker_died",
        )
        if self.on_death is not None:
            self.on_death(w)
        self.reactor.callLater(RESPAWN_DELAY, self._respawn, w)

    def _respawn(self, w: _Worker) -> None:
        if self._running and w in self.workers:
            self.restarts += 1
            self.workers[self.workers.index(w)] = self._spawn(w.index)

    # --- choice ------------------------------------------------------------------------

    def live(self) -> list[_Worker]:
        """Workers that answered their setup and are still running."""
        return [w for w in self.workers if w.ready and not w.dead]

    def pick(self, exclude: _Worker | None = None) -> _Worker | None:
        """The live worker with the fewest sessions (None: none is live)."""
        live = [w for w in self.live() if w is not exclude]
        return min(live, key=lambda w: (len(w.sessions), w.index), default=None)

    # --- blocks without a local copy ---------------------------------------------------

    def spool(self, media: str, index: int) -> Deferred[str]:
        """Read a block the node's way and write it to a spool file; its path."""
        if self._spool_dir is None:
            base = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self._spool_dir = Path(tempfile.mkdtemp(prefix="yimaporc-spool-", dir=base))
        folder = self._spool_dir
        self.spooled += 1
        name = f"{self.spooled}-{index}"

        def write(data: bytes) -> str:
            path = folder / name
            path.write_bytes(data)
            return str(path)

        pool = self.reactor.getThreadPool()
        return self.read_block(media, index).addCallback(
            lambda data: deferToThreadPool(self.reactor, pool, write, data)
        )

    # --- state -------------------------------------------------------------------------

    def _refresh_all(self) -> None:
        """Every POLL_INTERVAL: the mirrors from the boards; the offset where it moved."""
        self._poll = None
        if not self._running:
            return
        self.refresh()
        offset = self.offset()
        for w in self.live():
            # Also the heartbeat: a worker whose main process is silent holds delivery.
            w.offset = offset
            w.call(WorkerClock, offset=offset)
        self._poll = self.reactor.callLater(POLL_INTERVAL, self._refresh_all)

    def refresh(self) -> None:
        """Read every worker's board now: counters kept, rows to ``on_board``."""
        for w in self.workers:
            rows = None if w.dead else self._read(w)
            if rows is not None and self.on_board is not None:
                self.on_board(w, rows)

    def _read(self, w: _Worker) -> dict[int, BoardRow] | None:
        """``w``'s board now: its counters kept, its rows (None: no board)."""
        board = getattr(w, "board", None)
        if board is None:
            return None
        w.counters, rows = board.read()
        return rows

    def counters(self, fresh: bool = True) -> dict[str, int]:
        """The workers' counters (the dead ones' included), summed; ``fresh``: read
        from the boards now (else as last read)."""
        out = dict(self.retired)
        for w in self.workers:
            if fresh and not w.dead:
                self._read(w)
            for k, v in w.counters.items():
                out[k] = out.get(k, 0) + v
        return out


class _Sessions(ChainMap[str, Session]):
    """The sessions served here and in the workers (their mirrors), as one mapping."""


class _SchedulerView:
    """The node's scheduler as its readers see it: every session, the local ones
    and the workers' mirrors; everything else is the local scheduler's."""

    def __init__(self, local: NodeScheduler, mirror: NodeScheduler) -> None:
        self._local = local
        # The schedulers never replace their dicts: one live view of both serves.
        self._sessions = _Sessions(local.sessions, mirror.sessions)

    @property
    def sessions(self) -> Mapping[str, Session]:
        return self._sessions

    def __getattr__(self, name: str) -> Any:
        return getattr(self._local, name)


class ShardedStreamingNode(StreamingNode):
    """A :class:`StreamingNode` whose eligible sessions run in a :class:`WorkerPool`.

    A session stays here when its packets go to an address inside this process
    (a relay of this node: handed over without a socket), when ``eligible(media)``
    says no (WAV, converted packet by packet), or when no worker is live.
    """

    def __init__(
        self, *args: Any, pool: WorkerPool, eligible: Callable[[str], bool], **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.pool = pool
        self.eligible = eligible
        self.local_scheduler = self.scheduler
        self.mirror = NodeScheduler(self.local_scheduler.retransmit_window)
        self.scheduler = _SchedulerView(self.local_scheduler, self.mirror)  # type: ignore[assignment]
        self.owner: dict[str, _Worker] = {}
        self.generation: dict[str, int] = {}
        self.sessions_moved = 0
        self.worker_resent = 0
        #: Board keys of the workers' sessions, and each one's last published row.
        self.keys: dict[str, int] = {}
        self.rows: dict[str, BoardRow] = {}
        #: What dead workers had sent of a session that moved (packets, bytes, late, max late).
        self.carried: dict[str, tuple[int, int, int, float]] = {}
        pool.on_death = self._worker_died
        pool.on_board = self._worker_board

    # --- where a session runs ----------------------------------------------------------

    def _start(
        self,
        session: str,
        media: str,
        start_ct: float,
        start_mt: float,
        host: str,
        port: int,
        ssrc: int,
        seq_base: int,
        ts_base: int,
        node_index: int,
        timing: MediaTiming,
        blocks: list[int],
    ) -> dict[str, Any]:
        w = self.owner.get(session)
        if w is None and session not in self.local_scheduler.sessions:
            if (host, port) not in self.local and self.eligible(media):
                w = self.pool.pick()
        if w is None:
            return super()._start(session, media, start_ct, start_mt, host, port, ssrc,
                                  seq_base, ts_base, node_index, timing, blocks)  # fmt: skip
        dest = Destination(host, port, ssrc, seq_base, ts_base, node_index, timing.clock_rate,
                           start_ct=start_ct, start_mt=start_mt)  # fmt: skip
        self.destinations[session] = dest
        s = self.mirror.add(session, timing, blocks, start_ct, start_mt)
        self._hand(w, session, dest, s, None)
        return {"packets": sum(timing.packet_count(b) for b in s.my_blocks)}

    def _hand(
        self, w: _Worker, session: str, dest: Destination, s: Session, state: list[float] | None
    ) -> None:
        """Give a session to worker ``w`` (from its start, or from ``state``)."""
        self.owner[session] = w
        w.sessions.add(session)
        if session not in self.keys:
            self.keys[session] = session_key(session)
        gen = self.generation[session] = self.generation.get(session, 0) + 1
        t = s.media
        d = w.call(
            WorkerStart, session=session, generation=gen, media=t.name, size=t.size,
            block_size=t.block_size, block_starts=t.block_starts, duration=t.duration,
            payload=t.payload, clock_rate=t.clock_rate, blocks=list(s.my_blocks),
            start_ct=s.anchor_ct, start_mt=s.anchor_mt, host=dest.host, port=dest.port,
            ssrc=dest.ssrc, seq_base=dest.seq_base, ts_base=dest.ts_base,
            node_index=dest.node_index, offset=self.pool.offset(), state=state,
        )  # fmt: skip
        d.addErrback(self._lost_call, w, "start", session)

    def _lost_call(self, failure: Failure, w: _Worker, what: str, session: str) -> None:
        if not w.dead:  # a dead worker's sessions are moved by _worker_died
            self.log.failure("worker {i}: {what} of {s} failed", failure, i=w.index, what=what,
                             s=session)  # fmt: skip

    def control(self, session: str, action: str, at: float, value: float) -> dict[str, Any]:
        """StreamControl: to the owning worker (and its mirror here), else as before."""
        w = self.owner.get(session)
        if w is None:
            return super().control(session, action, at, value)
        if action == "pause":
            self.mirror.pause(session, at if at > 0 else None)
        elif action == "resume":
            self.mirror.resume(session, at)
        elif action == "speed":
            self.mirror.set_speed(session, value, at)
        elif action == "stop":
            self.mirror.remove(session)
            self.destinations.pop(session, None)
            self.origins.pop(session, None)
            self.owner.pop(session, None)
            self.generation.pop(session, None)
            self.keys.pop(session, None)
            self.rows.pop(session, None)
            self.carried.pop(session, None)
            w.sessions.discard(session)
        else:
            raise ValueError(f"unknown stream action {action!r}")
        d = w.call(WorkerControl, session=session, action=action, at=at, value=value,
                   offset=self.pool.offset())  # fmt: skip
        d.addErrback(self._lost_call, w, action, session)
        return {}

    def nack(  # type: ignore[override]  # a worker's answer is waited for
        self, session: str, node_seqs: list[int], gseqs: list[int] | None = None
    ) -> dict[str, Any] | Deferred[dict[str, Any]]:
        """StreamNack: resent by the owning worker, else as before."""
        w = self.owner.get(session)
        if w is None:
            return super().nack(session, node_seqs, gseqs)
        d = w.call(WorkerNack, session=session, node_seqs=list(node_seqs[:512]),
                   gseqs=list(gseqs[:512]) if gseqs else None)  # fmt: skip

        def done(answer: dict[str, Any]) -> dict[str, Any]:
            self.resent += answer["resent"]
            return {"resent": answer["resent"]}

        def failed(_: Failure) -> dict[str, Any]:
            return {"resent": 0}

        return d.addCallbacks(done, failed)

    # --- the workers' news -------------------------------------------------------------

    def _worker_board(self, w: _Worker, rows: dict[int, BoardRow]) -> None:
        """A worker's board as read: each of its sessions' row kept, its mirror moved."""
        found = []
        for sid in w.sessions:
            key = self.keys.get(sid)
            row = rows.get(key) if key is not None else None
            if row is None or row.generation != self.generation.get(sid, 0) & 0xFFFFFFFF:
                continue  # not published yet, or from before a seek or an adoption
            self.rows[sid] = row
            found.append({"session": sid, "generation": self.generation.get(sid, 0),
                          "cursor_block": row.cursor_block, "cursor_packet": row.cursor_packet,
                          "node_seq": row.node_seq})  # fmt: skip
        self._worker_state(w, found)

    def _worker_state(self, w: _Worker, sessions: list[dict[str, Any]]) -> None:
        for row in sessions:
            sid = row["session"]
            s = self.mirror.sessions.get(sid)
            if s is None or self.owner.get(sid) is not w:
                continue
            if row["generation"] != self.generation.get(sid):
                continue  # polled before a seek or an adoption reached the worker
            s.cursor_block, s.cursor_packet = row["cursor_block"], row["cursor_packet"]
            s.node_seq = row["node_seq"]

    def _worker_died(self, w: _Worker) -> None:
        moved = sorted(sid for sid, owner in self.owner.items() if owner is w)
        w.sessions.clear()
        for sid in moved:
            del self.owner[sid]
            row = self.rows.pop(sid, None)
            if row is not None:  # what it sent of the session goes on counting
                p, b, late, worst = self.carried.get(sid, (0, 0, 0, 0.0))
                self.carried[sid] = (p + row.packets, b + row.bytes, late + row.late_packets,
                                     max(worst, row.max_late))  # fmt: skip
            s, dest = self.mirror.sessions.get(sid), self.destinations.get(sid)
            if s is None or dest is None:
                continue
            self.sessions_moved += 1
            state = session_state(s)
            heir = self.pool.pick(exclude=w)
            if heir is not None:
                self._hand(heir, sid, dest, s, state)
                continue
            # No worker left: served here, from the same state.
            self.mirror.remove(sid)
            self.keys.pop(sid, None)
            local = self.local_scheduler.add(sid, s.media, s.my_blocks, s.anchor_ct, s.anchor_mt)
            apply_state(local, state)
            carried = self.carried.pop(sid, None)
            if carried is not None:
                p, b, late, worst = carried
                self.engine.stats.sent_run(sid, p, b, late, worst)
        if moved:
            self.log.warn("{n} sessions of dead worker {i} moved, from their last cursor",
                          n=len(moved), i=w.index)  # fmt: skip
            self.engine.poke()

    # --- status ------------------------------------------------------------------------

    def running(self) -> list[dict[str, object]]:
        """The workers' sessions as ``streaming.running`` lists them (read the boards first)."""
        out = []
        for sid in self.owner:
            row = self.rows.get(sid)
            p, b, late, worst = self.carried.get(sid, (0, 0, 0, 0.0))
            if row is not None:
                p, b, late = p + row.packets, b + row.bytes, late + row.late_packets
                worst = max(worst, row.max_late)
            if not p:
                continue  # nothing sent yet: not listed, as in process
            s = self.mirror.sessions.get(sid)
            out.append({
                "session": hashlib.sha256(sid.encode()).hexdigest()[:10],
                "media": s.media.name if s is not None else "",
                "packets": p, "bytes": b, "late_packets": late,
                "max_late_ms": round(worst * 1e3, 1),
            })  # fmt: skip
        return out

    def merge_status(self, streaming: dict[str, Any]) -> None:
        """Add the workers' counters and sessions to the node's ``streaming`` status
        (read from their boards now), and their own."""
        self.pool.refresh()
        c = self.pool.counters(fresh=False)
        if "running" in streaming:
            merged = [*streaming["running"], *self.running()]
            merged.sort(key=lambda r: (-int(r["bytes"]), str(r["session"])))  # type: ignore[call-overload]
            streaming["running"] = merged[:MAX_LISTED]
        for key in ("packets_sent", "bytes_sent", "block_reads", "block_read_bytes",
                    "block_read_errors", "late_waits", "late_packets", "cache_hits"):  # fmt: skip
            if key in streaming:
                streaming[key] += c.get(key, 0)
        if "cache_misses" in streaming:
            streaming["cache_misses"] += c.get("block_reads", 0)
        send = streaming.get("send")
        if isinstance(send, dict):
            for key in ("datagrams", "syscalls", "dropped", "eagain", "errors"):
                if key in send:
                    send[key] += c.get(key, 0)
        streaming["workers"] = {
            "count": self.pool.count,
            "live": len(self.pool.live()),
            "processes": [
                {
                    "index": w.index,
                    "pid": w.pid,
                    "live": w.ready and not w.dead,
                    "sessions": len(w.sessions),
                }
                for w in self.pool.workers
            ],
            "deaths": self.pool.deaths,
            "restarts": self.pool.restarts,
            "sessions_moved": self.sessions_moved,
            "spooled_blocks": self.pool.spooled,
            "packets_sent": c.get("packets_sent", 0),
        }


def local_block_paths(storage: Any, node_id: str, media: str, index: int) -> list[str]:
    """Paths of data block ``index`` of ``media`` on this node's disks, in read order
    (none: no local place, or a storage without local files)."""
    from .store import BlockKey

    store = getattr(storage, "store", None)
    if store is None or not hasattr(storage, "places"):
        return []
    try:
        info = storage.media_info(media)
        places = storage.places(info, BlockKey(index))
    except KeyError:
        return []
    out = []
    for disk in places:
        if disk.node_id != node_id:
            continue
        try:
            out.append(str(store.path_of(disk.physical, media, BlockKey(index))))
        except KeyError:  # a disk removed meanwhile
            continue
    return out


def make_pool(
    service: Any, workers: int, send_path: str, send_ahead: float, cache_bytes: int
) -> WorkerPool | None:
    """The :class:`WorkerPool` of a :class:`~.rtspservice.YimaStreamingService` for
    ``--workers`` (None for 0 or 1: delivery in process)."""
    if workers < 2:
        return None
    node, reactor = service.node, service.reactor
    return WorkerPool(
        reactor,
        workers,
        locate=lambda media, index: local_block_paths(service.storage, node.node_id, media, index),
        read_block=lambda media, index: service._read_block(media, index),
        offset=lambda: node.cluster_time() - reactor.seconds(),
        send_path=send_path,
        send_ahead=send_ahead,
        cache_bytes=cache_bytes,
    )
