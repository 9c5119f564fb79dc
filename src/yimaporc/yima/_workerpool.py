"""A node's delivery worker processes (see :mod:`.workers` for the design).

:class:`WorkerPool` spawns the workers one by one, sets each up, answers their
block requests (paths on this node's disks, spool files for blocks without a
local copy), reads their shared boards, pushes the cluster clock offset (the
heartbeat) and, when one dies, hands its sessions to ``on_death`` and starts a
replacement :data:`RESPAWN_DELAY` later.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from twisted.internet import protocol
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from .._reactor import INodeReactor
from ._workerchannel import WorkerBlockPath, WorkerBlockSpool, WorkerClock, WorkerSetup
from .workerboard import MAX_ROWS, Board, BoardRow

if TYPE_CHECKING:
    from .interfaces import IMediaStorage
    from .rtspservice import YimaStreamingService

__all__ = [
    "AUTO_MAX",
    "POLL_INTERVAL",
    "RESPAWN_DELAY",
    "WorkerPool",
    "default_workers",
    "local_block_paths",
    "make_pool",
]

#: How often the main process refreshes its mirrors from the boards and looks at the
#: cluster clock offset (pushed to the workers when it moved).
POLL_INTERVAL = 0.25
#: The cap of ``--workers auto``.
AUTO_MAX = 8
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


class _PipeTransport:
    """What AMP writes to: the child's stdin."""

    def __init__(self, process: IProcessTransport) -> None:
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
        reactor: INodeReactor,
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
            cast(IReactorProcess, self.reactor).spawnProcess(
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


def local_block_paths(storage: IMediaStorage, node_id: str, media: str, index: int) -> list[str]:
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
    service: YimaStreamingService, workers: int, send_path: str, send_ahead: float, cache_bytes: int
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
