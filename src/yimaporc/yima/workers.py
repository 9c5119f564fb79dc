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
from collections import ChainMap
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ._workerchannel import (
    STATE_FIELDS,
    STATE_PAGE,
    WorkerBlockPath,
    WorkerBlockSpool,
    WorkerClock,
    WorkerControl,
    WorkerNack,
    WorkerSetup,
    WorkerStart,
    WorkerState,
    apply_state,
    session_state,
)
from ._workerpool import (
    AUTO_MAX,
    POLL_INTERVAL,
    RESPAWN_DELAY,
    WorkerPool,
    _Worker,
    default_workers,
    local_block_paths,
    make_pool,
)
from .control import StreamAction
from .deliverystats import MAX_LISTED
from .schedule import MediaTiming, NodeScheduler, Session
from .streaming import Destination, StreamingNode
from .workerboard import BoardRow, session_key

__all__ = [
    "AUTO_MAX",
    "POLL_INTERVAL",
    "RESPAWN_DELAY",
    "STATE_FIELDS",
    "STATE_PAGE",
    "ShardedStreamingNode",
    "WorkerBlockPath",
    "WorkerBlockSpool",
    "WorkerClock",
    "WorkerControl",
    "WorkerNack",
    "WorkerPool",
    "WorkerSetup",
    "WorkerStart",
    "WorkerState",
    "apply_state",
    "default_workers",
    "local_block_paths",
    "make_pool",
    "session_state",
]


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
        batch: float = 0.0,
    ) -> dict[str, Any]:
        w = self.owner.get(session)
        if w is None and session not in self.local_scheduler.sessions:
            if (host, port) not in self.local and self.eligible(media):
                w = self.pool.pick()
        if w is None:
            return super()._start(session, media, start_ct, start_mt, host, port, ssrc,
                                  seq_base, ts_base, node_index, timing, blocks, batch)  # fmt: skip
        dest = Destination(host, port, ssrc, seq_base, ts_base, node_index, timing.clock_rate,
                           start_ct=start_ct, start_mt=start_mt, batch=batch)  # fmt: skip
        self.destinations[session] = dest
        s = self.mirror.add(session, timing, blocks, start_ct, start_mt, self.ahead(batch))
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
            batch=dest.batch or None,
        )  # fmt: skip
        d.addErrback(self._lost_call, w, "start", session)

    def _lost_call(self, failure: Failure, w: _Worker, what: str, session: str) -> None:
        if not w.dead:  # a dead worker's sessions are moved by _worker_died
            self.log.failure("worker {i}: {what} of {s} failed", failure, i=w.index, what=what,
                             s=session)  # fmt: skip

    def control(
        self, session: str, action: StreamAction, at: float, value: float
    ) -> dict[str, Any]:
        """StreamControl: to the owning worker (and its mirror here), else as before."""
        w = self.owner.get(session)
        if w is None:
            return super().control(session, action, at, value)
        if action == StreamAction.PAUSE:
            self.mirror.pause(session, at if at > 0 else None, value if value > 0 else None)
        elif action == StreamAction.RESUME:
            self.mirror.resume(session, at)
        elif action == StreamAction.SPEED:
            self.mirror.set_speed(session, value, at)
        elif action == StreamAction.STOP:
            self.note_stop(session)
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
            local = self.local_scheduler.add(sid, s.media, s.my_blocks, s.anchor_ct,
                                             s.anchor_mt, s.ahead)  # fmt: skip
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
