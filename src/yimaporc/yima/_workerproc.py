"""One delivery worker process (see :mod:`.workers`): ``python -m yimaporc.yima._workerproc``.

stdin/stdout carry AMP with the node's main process, stderr its log; fd 3 is the
node's RTP socket, which it only sends on; fd 4 (when the setup says so) is the
shared :class:`~.workerboard.Board` its counters and sessions are published on.  It runs a :class:`StreamingNode` with
the same header template and send path as the main process's, so a session's
packets are byte for byte what the in-process path sends.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from .._reactor import INodeReactor, node_reactor
from ..rtp import PT_MP2T, RtpHeaderTemplate
from ._workerchannel import (
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
)
from .control import StreamAction
from .feedback import mark_retransmission
from .schedule import MediaTiming, Packet
from .sendpath import DatagramSender
from .streaming import Destination, StreamingNode
from .workerboard import Board, BoardRow, session_key

DATA_FD = 3
BOARD_FD = 4
#: After a tick the board is written at most this often (a trailing write follows the
#: last tick): what the main process reads is at most this far behind.
PUBLISH_EVERY = 0.05
#: A worker holds delivery when its main process is stopped (SIGSTOP: looked at this
#: often) or has said nothing for MAIN_SILENT seconds (it speaks every 0.25 s).
WATCH_EVERY = 0.1
MAIN_SILENT = 1.5


def parent_stopped() -> bool:
    """The process that spawned this one is stopped (SIGSTOP, a debugger)."""
    ppid = os.getppid()
    if ppid <= 1:
        return False  # it is gone: the channel's EOF ends this worker
    try:
        with open(f"/proc/{ppid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False


class BlockMissingHere(Exception):
    """No local copy of the block of the right length."""


def read_first(paths: list[str], expect: int) -> bytes:
    """The first of ``paths`` that holds ``expect`` bytes (thread pool)."""
    for p in paths:
        try:
            data = Path(p).read_bytes()
        except OSError:
            continue
        if len(data) == expect:
            return data
    raise BlockMissingHere(", ".join(paths) or "no local place")


def read_spool(path: str) -> bytes:
    """A spool file's bytes; the file is removed (thread pool)."""
    p = Path(path)
    try:
        return p.read_bytes()
    finally:
        p.unlink(missing_ok=True)


class WorkerDelivery(amp.CommandLocator):
    """The worker's side of the channel: sessions served by one :class:`StreamingNode`."""

    log = Logger()

    def __init__(self, reactor: INodeReactor, sock: socket.socket) -> None:
        super().__init__()
        self.reactor = reactor
        self.sock = sock
        self.offset = 0.0
        self.main: amp.AMP | None = None
        self.node: StreamingNode | None = None
        self.sender: DatagramSender | None = None
        self.timings: dict[str, MediaTiming] = {}
        self.generations: dict[str, int] = {}
        self.spooled = 0
        self._templates: dict[tuple[int, int], RtpHeaderTemplate] = {}
        #: The shared board (None: the main process reads counters by WorkerState only).
        self.board: Board | None = None
        #: What was last written of each session (only changed rows are written again).
        self._written: dict[str, BoardRow] = {}
        self._keys: dict[str, int] = {}
        self._published_at = float("-inf")
        self._trailing: IDelayedCall | None = None
        #: When the main process last spoke; delivery held while it is stopped or silent.
        self.last_heard = float(reactor.seconds())
        self.held = False
        self.stopped_parent: Callable[[], bool] = parent_stopped
        self._watch: LoopingCall | None = None

    def cluster_time(self) -> float:
        """The cluster clock: this host's clock plus the main process's offset."""
        return float(self.reactor.seconds()) + self.offset

    # --- the node's collaborators ------------------------------------------------------

    def _template(self, session: str, dest: Destination) -> RtpHeaderTemplate:
        key = (dest.ssrc, dest.node_index)
        tpl = self._templates.get(key)
        if tpl is None:
            if len(self._templates) >= 1024:
                self._templates.clear()
            tpl = self._templates[key] = RtpHeaderTemplate(PT_MP2T, dest.ssrc, dest.node_index)
        return tpl

    def _packetize(self, pkt: Packet, dest: Destination, payload: bytes) -> bytes:
        tpl = self._template(pkt.session, dest)
        ts = dest.ts_base + round(pkt.media_time * dest.clock_rate)
        data = tpl.build(dest.seq_base + pkt.gseq, ts, payload, pkt.node_seq)
        return mark_retransmission(data) if pkt.retransmission else data

    def _read_block(self, media: str, index: int) -> Deferred[bytes]:
        assert self.main is not None
        expect = self.timings[media].block_length(index)
        pool = self.reactor.getThreadPool()
        d = self.main.callRemote(WorkerBlockPath, media=media, index=index)
        d.addCallback(lambda a: deferToThreadPool(self.reactor, pool, read_first, a["paths"],
                                                  expect))  # fmt: skip

        def elsewhere(f: Failure) -> Deferred[bytes]:
            f.trap(BlockMissingHere)
            assert self.main is not None
            self.spooled += 1
            s = self.main.callRemote(WorkerBlockSpool, media=media, index=index)
            return s.addCallback(
                lambda a: deferToThreadPool(self.reactor, pool, read_spool, a["path"])
            )

        return d.addErrback(elsewhere)

    # --- commands ----------------------------------------------------------------------

    @WorkerSetup.responder
    def setup(
        self,
        index: int,
        send_path: str,
        send_ahead: float,
        cache_bytes: int,
        offset: float,
        board_rows: int | None = None,
    ) -> dict[str, Any]:
        self.offset = offset
        if board_rows and self.board is None:
            self.board = Board(BOARD_FD, board_rows)
        self.sender = sender = DatagramSender(self.sock, send_path)
        self.node = StreamingNode(
            self.reactor,
            self.cluster_time,
            timing=self.timings.__getitem__,
            my_blocks=lambda media: [],
            read_block=self._read_block,
            packetize=self._packetize,
            send=sender.send,
            template=self._template,
            send_segments=sender.send_segments,
            flush=sender.flush,
            send_ahead=send_ahead,
            cache_bytes=cache_bytes,
        )
        self.node.engine.after_tick = self._ticked
        self.publish()
        if self._watch is None:
            self._watch = LoopingCall(self.watch)
            self._watch.clock = self.reactor
            self._watch.start(WATCH_EVERY, now=False)
        return {"pid": os.getpid(), "path": sender.path}

    # --- the main process's health -----------------------------------------------------

    def heard(self) -> None:
        """The main process spoke: delivery goes on if it was held."""
        self.last_heard = float(self.reactor.seconds())
        if self.held and self.node is not None:
            self.held = self.node.engine.held = False
            self.log.info("main process back: delivery goes on")
            self.node.engine.poke()

    def watch(self) -> None:
        """Hold delivery while the main process is stopped or silent: its node is
        frozen for the cluster (which may take its shares over), so this process
        sends nothing either, as the in-process engine would."""
        if self.held or self.node is None:
            return
        silent = float(self.reactor.seconds()) - self.last_heard > MAIN_SILENT
        if silent or self.stopped_parent():
            self.held = self.node.engine.held = True
            self.node.engine.stop()
            self.log.warn("main process {why}: delivery held",
                          why="silent" if silent else "stopped")  # fmt: skip

    # --- the board ---------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """The worker's monotonic counters (workerboard.COUNTERS)."""
        node, snd = self.node, self.sender
        if node is None:
            return {}
        engine = node.engine
        out = {
            "packets_sent": engine.sent,
            "bytes_sent": engine.sent_bytes,
            "block_reads": engine.block_reads,
            "block_read_bytes": engine.block_read_bytes,
            "block_read_errors": engine.read_errors,
            "late_waits": node.scheduler.late_waits,
            "late_packets": engine.stats.late_packets,
            "cache_hits": engine.stats.cache_hits,
            "resent": node.resent,
            "spooled": self.spooled,
        }
        if snd is not None:
            out.update(datagrams=snd.datagrams, syscalls=snd.syscalls, dropped=snd.dropped,
                       eagain=snd.eagain, errors=snd.errors)  # fmt: skip
        return out

    def _ticked(self) -> None:
        """After a tick: publish, or make sure a write follows within PUBLISH_EVERY."""
        wait = self._published_at + PUBLISH_EVERY - float(self.reactor.seconds())
        if wait <= 0:
            self.publish()
        elif self._trailing is None and self.board is not None:
            self._trailing = self.reactor.callLater(wait, self.publish)

    def publish(self) -> None:
        """Write the counters and the changed sessions' rows to the board."""
        if self._trailing is not None:
            if self._trailing.active():
                self._trailing.cancel()
            self._trailing = None
        self._published_at = float(self.reactor.seconds())
        board, node = self.board, self.node
        if board is None or node is None:
            return
        stats, written, keys = node.engine.stats.sessions, self._written, self._keys
        rows = []
        for sid, s in node.scheduler.sessions.items():
            st = stats.get(sid)
            key = keys.get(sid)
            if key is None:
                key = keys[sid] = session_key(sid)
            row = BoardRow(
                key, self.generations.get(sid, 0) & 0xFFFFFFFF, s.cursor_block,
                s.cursor_packet, s.node_seq, st.packets if st else 0, st.bytes if st else 0,
                st.late_packets if st else 0, st.max_late if st else 0.0,
            )  # fmt: skip
            if written.get(sid) != row:
                written[sid] = row
                rows.append((sid, row))
        board.publish(self.counters(), rows)

    @WorkerStart.responder
    def start(self, session: str, generation: int, media: str, size: int, block_size: int,
              block_starts: list[float], duration: float, payload: int, clock_rate: int,
              blocks: list[int], start_ct: float, start_mt: float, host: str, port: int,
              ssrc: int, seq_base: int, ts_base: int, node_index: int, offset: float,
              state: list[float] | None = None,
              batch: float | None = None) -> dict[str, Any]:  # fmt: skip
        assert self.node is not None
        self.offset = offset
        timing = self.timings.get(media)
        if timing is None or (timing.size, timing.block_size, timing.block_starts) != (
            size,
            block_size,
            tuple(block_starts),
        ):
            timing = self.timings[media] = MediaTiming(
                media, size, block_size, tuple(block_starts), duration, payload, clock_rate
            )
        self.generations[session] = generation
        node = self.node
        node.destinations[session] = Destination(
            host, port, ssrc, seq_base, ts_base, node_index, timing.clock_rate,
            start_ct=start_ct, start_mt=start_mt, batch=batch or 0.0,
        )  # fmt: skip
        s = node.scheduler.add(session, timing, blocks, start_ct, start_mt,
                               node.ahead(batch or 0.0))  # fmt: skip
        if state is not None:
            apply_state(s, state)
        node.engine.poke()
        self.publish()
        return {"packets": sum(timing.packet_count(b) for b in s.my_blocks)}

    @WorkerControl.responder
    def control(
        self, session: str, action: StreamAction, at: float, value: float, offset: float
    ) -> dict[str, Any]:
        assert self.node is not None
        self.offset = offset
        answer = self.node.control(session, action, at, value)
        if action == StreamAction.STOP:
            self.generations.pop(session, None)
            self._keys.pop(session, None)
            self._written.pop(session, None)
            if self.board is not None:
                self.board.forget(session)
        self.publish()
        return answer

    @WorkerClock.responder
    def clock(self, offset: float) -> dict[str, Any]:
        self.offset = offset
        return {}

    @WorkerNack.responder
    def nack(self, session: str, node_seqs: list[int], gseqs: list[int] | None = None) -> Any:
        assert self.node is not None
        answer = self.node.nack(session, node_seqs, gseqs)
        self.publish()
        return answer

    @WorkerState.responder
    def state(self, start: int, offset: float) -> dict[str, Any]:
        self.offset = offset
        node = self.node
        if node is None:
            return {"sessions": [], "next": -1, "counters": []}
        sessions = node.scheduler.sessions
        names = sorted(sessions)[start : start + STATE_PAGE]
        rows = [
            {"session": sid, "generation": self.generations.get(sid, 0),
             "cursor_block": sessions[sid].cursor_block,
             "cursor_packet": sessions[sid].cursor_packet,
             "node_seq": sessions[sid].node_seq}
            for sid in names
        ]  # fmt: skip
        nxt = start + STATE_PAGE if start + STATE_PAGE < len(sessions) else -1
        counters = self.counters()
        return {
            "sessions": rows,
            "next": nxt,
            "counters": [{"name": k, "value": int(v)} for k, v in counters.items()],
        }


class _Channel(amp.AMP):
    """The worker's end of the AMP channel: ``on_lost`` runs when the main process
    goes (the process entry, :func:`main`, stops its reactor then)."""

    def __init__(self, delivery: WorkerDelivery, on_lost: Callable[[], None]) -> None:
        super().__init__(locator=delivery)
        self.on_lost = on_lost
        self.delivery = delivery

    def dataReceived(self, data: bytes) -> None:
        self.delivery.heard()
        super().dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.on_lost()


def main() -> None:
    """Run one worker until the main process closes the channel."""
    from twisted.internet import reactor, stdio
    from twisted.logger import FileLogObserver, formatEvent, globalLogBeginner

    # Plain lines: the main process logs each with its own time stamp.
    def line(event: dict[str, Any]) -> str:
        text = formatEvent(event) or ""
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        return text + "\n"

    observer = FileLogObserver(sys.stderr, line)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    sock = socket.socket(fileno=DATA_FD)
    sock.setblocking(False)
    delivery = WorkerDelivery(node_reactor(reactor), sock)

    def stop() -> None:
        if reactor.running:  # type: ignore[attr-defined]
            reactor.stop()  # type: ignore[attr-defined]

    channel = _Channel(delivery, stop)
    delivery.main = channel
    stdio.StandardIO(channel, reactor=reactor)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
