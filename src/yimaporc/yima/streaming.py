"""Node-side streaming control: sessions set up over cluster RPC, one engine per node.

The RTSP node (any node) plans a session and tells every member, over AMP,
which media to play from which media time, at which cluster instant, and where
to send (the client itself for opted-in players, or the RTSP node's relay for
standard players).  Each node then serves *its own* blocks (bipartite, Yima-2);
in master-slave mode (Yima-1) only the master schedules and it fetches the
other nodes' blocks over RPC.  Flow-control feedback and NACKs arrive here as
RPCs too (forwarded by the RTSP node) or straight from the player.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from ..cluster.rpc import RpcRegistry
from ..rtp import RtpHeaderTemplate
from .control import StreamAction, StreamActionArgument, UnknownValue
from .engine import DeliveryEngine
from .schedule import MediaTiming, NodeScheduler, Packet, Run

#: Default memory bound of the delivery block cache (``--block-cache-mb``).
DEFAULT_CACHE_BYTES = 256 << 20
#: How many stopped sessions a node remembers (:attr:`StreamingNode.stopped`).
STOPPED_KEPT = 4096


class StreamStart(amp.Command):
    """Serve this node's share of ``media`` for session ``session``."""

    commandName = b"yima.stream-start"
    arguments = [
        (b"session", amp.Unicode()),
        (b"media", amp.Unicode()),
        (b"start_ct", amp.Float()),
        (b"start_mt", amp.Float()),
        (b"host", amp.Unicode()),
        (b"port", amp.Integer()),
        (b"ssrc", amp.Integer()),
        (b"seq_base", amp.Integer()),
        (b"ts_base", amp.Integer()),
        (b"node_index", amp.Integer()),
        (b"all_blocks", amp.Boolean()),
        # The RTSP node that planned the session: should it leave the cluster, every
        # node stops its share (nobody relays or plans it any more).
        (b"origin", amp.Unicode(optional=True)),
        # Seconds of the session's packets sent at once (a relayed session: its relay
        # holds them to their due instants anyway, ``--relay-batch-ms``); none or 0:
        # the node's own send-ahead, as for a fan-out player.
        (b"batch", amp.Float(optional=True)),
    ]
    response = [(b"packets", amp.Integer())]


class StreamControl(amp.Command):
    """A :class:`~.control.StreamAction`: ``pause``, ``resume`` (at cluster time ``at``),
    ``speed`` (``value`` from ``at``) or ``stop``; an action word this node does not
    know is an ``UNKNOWN_VALUE`` error answer (:class:`~.control.UnknownValue`)."""

    commandName = b"yima.stream-control"
    arguments = [
        (b"session", amp.Unicode()),
        (b"action", StreamActionArgument()),
        (b"at", amp.Float()),
        (b"value", amp.Float()),
    ]
    response = []  # type: ignore[var-annotated]
    errors = {UnknownValue: UnknownValue.code}


class StreamNack(amp.Command):
    """Resend the packets with these per-node (or, relayed, global) sequence numbers, once each."""

    commandName = b"yima.stream-nack"
    arguments = [
        (b"session", amp.Unicode()),
        (b"node_seqs", amp.ListOf(amp.Integer())),
        (b"gseqs", amp.ListOf(amp.Integer(), optional=True)),
    ]
    response = [(b"resent", amp.Integer())]


@attrs.frozen
class Destination:
    """Where and how a session's packets go."""

    host: str
    port: int
    ssrc: int
    seq_base: int
    ts_base: int
    node_index: int
    clock_rate: int = 90000
    start_ct: float = 0.0
    start_mt: float = 0.0
    #: Seconds of packets sent at once (see :class:`StreamStart`'s ``batch``); 0: the
    #: engine's send-ahead.
    batch: float = 0.0


Packetize = Callable[[Packet, Destination, bytes], bytes]
#: ``send_segments(buffer, size, addr)``: datagrams of ``size`` bytes cut from the
#: buffer (the last may be shorter), see :class:`~.sendpath.DatagramSender`.
SendSegments = Callable[[memoryview, int, tuple[str, int]], None]


class StreamingNode:
    """This node's sessions: RPC handlers around a scheduler and its engine."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        cluster_time: Callable[[], float],
        *,
        timing: Callable[[str], MediaTiming],
        my_blocks: Callable[[str], list[int] | Deferred[list[int]]],
        read_block: Callable[[str, int], Deferred[bytes]],
        packetize: Packetize,
        send: Callable[[bytes, tuple[str, int]], None],
        retransmit_age: float = 10.0,
        ready: Callable[[str], Deferred[Any]] | None = None,
        template: Callable[[str, Destination], RtpHeaderTemplate | None] | None = None,
        send_segments: SendSegments | None = None,
        flush: Callable[[], object] | None = None,
        send_ahead: float = 0.0,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.timing = timing
        #: Fires once ``timing(media)`` can answer (the media's time index is loaded,
        #: off the reactor); None: always.
        self.ready = ready
        self.my_blocks = my_blocks
        self.packetize = packetize
        self.send = send
        self.scheduler = NodeScheduler()
        self.destinations: dict[str, Destination] = {}
        #: Session -> the RTSP node that started it here (over RPC).
        self.origins: dict[str, str] = {}
        self.cluster_time = cluster_time
        self.retransmit_age = retransmit_age
        self.resent = 0
        #: Destinations inside this process (the RTSP node's own relay sockets): a
        #: packet for one is handed over directly instead of through loopback UDP.
        self.local: dict[tuple[str, int], Callable[[bytes], None]] = {}
        #: The same sinks taking a whole run at once (``view``, datagram ``size``); the
        #: view is only valid during the call.
        self.local_batch: dict[tuple[str, int], Callable[[memoryview, int], None]] = {}
        self.handed_over = 0
        #: Session -> the STOP count when it was last stopped here (the newest
        #: :data:`STOPPED_KEPT`): a StreamStart that waited (the media's time index
        #: loading, a layout computed off the reactor) while a STOP for its session came
        #: must not start it afterwards, or it streams to nobody until the title ends.
        self.stopped: dict[str, int] = {}
        self.stops = 0
        #: StreamStarts dropped that way.
        self.late_starts_dropped = 0
        #: The batched path (both given): a session's header template (None: that
        #: session goes packet by packet, e.g. WAV's L16 conversion) and the sender
        #: of a buffer of datagrams; each run of due packets is packed into
        #: ``_buf`` and sent in one call.
        self.template = template
        self.send_segments = send_segments
        self._buf = bytearray(64 * 1400)
        batched = template is not None and send_segments is not None
        self.engine = DeliveryEngine(
            clock, cluster_time, self.scheduler, read_block, self._emit,
            emit_run=self._emit_run if batched else None, flush=flush,
            send_ahead=send_ahead, cache_bytes=cache_bytes,
        )  # fmt: skip

    def ahead(self, batch: float) -> float:
        """A session's :attr:`~.schedule.Session.ahead` for runs of ``batch`` seconds:
        what the batch adds to the engine's own send-ahead (0: none)."""
        return max(0.0, batch - self.engine.send_ahead)

    def register(self, registry: RpcRegistry) -> None:
        """Answer the streaming RPC commands."""
        registry.register(StreamStart, self.start)
        registry.register(StreamControl, self.control)
        registry.register(StreamNack, self.nack)

    def start(
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
        all_blocks: bool,
        blocks: list[int] | None = None,
        origin: str | None = None,
        batch: float | None = None,
    ) -> dict[str, Any] | Deferred[dict[str, Any]]:
        """StreamStart: schedule our blocks (or all, for a master; or ``blocks``, locally).

        ``batch``: seconds of the session's packets to send at once (a relayed
        session's runs; see :attr:`.schedule.Session.ahead`); none: the engine's
        send-ahead.

        Again for a session this node serves (a seek): the same blocks, from the new
        position, the per-node sequence counter going on.  ``my_blocks`` may answer
        with a Deferred (the storage computing a layout off the reactor); the answer
        then waits for it, as it waits for the media's time index to be loaded.
        """
        args = (session, media, start_ct, start_mt, host, port, ssrc, seq_base, ts_base,
                node_index, all_blocks, blocks, origin, batch or 0.0, self.stops)  # fmt: skip
        if self.ready is not None:
            loaded = self.ready(media)
            if not loaded.called:
                return loaded.addCallback(lambda _: self._start_loaded(*args))
            # Already loaded (a seek, a takeover): start now, in this call.
            failed: list[Any] = []
            loaded.addErrback(failed.append)
            if failed:
                failed[0].raiseException()
        return self._start_loaded(*args)

    def _start_loaded(
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
        all_blocks: bool,
        blocks: list[int] | None,
        origin: str | None,
        batch: float = 0.0,
        mark: int | None = None,
    ) -> dict[str, Any] | Deferred[dict[str, Any]]:
        if mark is not None and self._stopped_since(session, mark):
            return {"packets": 0}
        timing = self.timing(media)
        if origin is not None:
            self.origins[session] = origin
        args = (session, media, start_ct, start_mt, host, port, ssrc, seq_base, ts_base,
                node_index)  # fmt: skip
        current = self.scheduler.sessions.get(session)
        if blocks is None and current is not None and current.media.name == media:
            # A seek of a session this node already serves: same share, no placement walk.
            blocks = list(current.my_blocks)
        if blocks is None:
            if all_blocks:
                blocks = list(range(timing.blocks))
            else:
                mine = self.my_blocks(media)
                if isinstance(mine, Deferred):

                    def got(b: list[int]) -> dict[str, Any]:
                        if mark is not None and self._stopped_since(session, mark):
                            return {"packets": 0}
                        return self._start(*args, timing, b, batch)

                    return mine.addCallback(got)
                blocks = mine
        return self._start(*args, timing, blocks, batch)

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
        self.destinations[session] = Destination(
            host, port, ssrc, seq_base, ts_base, node_index, timing.clock_rate,
            start_ct=start_ct, start_mt=start_mt, batch=batch,
        )  # fmt: skip
        s = self.scheduler.add(session, timing, blocks, start_ct, start_mt, self.ahead(batch))
        self.engine.poke()
        return {"packets": sum(timing.packet_count(b) for b in s.my_blocks)}

    def _stopped_since(self, session: str, mark: int) -> bool:
        """Was ``session`` stopped here after the STOP count ``mark`` (counted)?"""
        if self.stopped.get(session, 0) > mark:
            self.late_starts_dropped += 1
            self.log.info("{s} was stopped while its start waited: not started", s=session)
            return True
        return False

    def note_stop(self, session: str) -> None:
        """Remember a STOP of ``session`` (see :attr:`stopped`)."""
        self.stops += 1
        self.stopped.pop(session, None)
        self.stopped[session] = self.stops
        while len(self.stopped) > STOPPED_KEPT:
            del self.stopped[next(iter(self.stopped))]

    def control(
        self, session: str, action: StreamAction, at: float, value: float
    ) -> dict[str, Any]:
        """StreamControl: pause / resume / speed / stop (a pause's ``value`` > 0: the
        media position to stop at)."""
        if action == StreamAction.PAUSE:
            self.scheduler.pause(session, at if at > 0 else None, value if value > 0 else None)
        elif action == StreamAction.RESUME:
            self.scheduler.resume(session, at)
        elif action == StreamAction.SPEED:
            self.scheduler.set_speed(session, value, at)
        elif action == StreamAction.STOP:
            self.note_stop(session)
            self.scheduler.remove(session)
            self.destinations.pop(session, None)
            self.origins.pop(session, None)
        else:
            raise ValueError(f"unknown stream action {action!r}")
        self.engine.poke()
        return {}

    def nack(
        self, session: str, node_seqs: list[int], gseqs: list[int] | None = None
    ) -> dict[str, Any]:
        """StreamNack: resend what is still buffered (the last few seconds), once each."""
        s = self.scheduler.sessions.get(session)
        if s is None:
            return {"resent": 0}
        wanted = list(node_seqs[:512])
        if gseqs:
            wanted.extend(s.node_seqs_of(gseqs[:512], self.scheduler.retransmit_window))
        packets = self.scheduler.retransmit(
            session, wanted, now=self.cluster_time(), max_age=self.retransmit_age
        )
        for pkt in packets:
            data = self.engine.cache.get((s.media.name, pkt.block))
            if data is not None:
                self._emit(pkt, data[pkt.offset : pkt.offset + pkt.length])
            else:  # the block left the cache: read it again
                d = self.engine.read_block(s.media.name, pkt.block)
                d.addCallbacks(self._resend_read, self._resend_failed, callbackArgs=(pkt,))
        self.resent += len(packets)
        return {"resent": len(packets)}

    def _resend_read(self, data: bytes, pkt: Packet) -> None:
        self._emit(pkt, data[pkt.offset : pkt.offset + pkt.length])

    def _resend_failed(self, failure: Failure) -> None:
        self.log.warn("nack: cannot read the block again: {e}", e=failure.getErrorMessage())

    def _emit_run(self, run: Run, data: bytes) -> None:
        """One run of due packets: packed into one buffer, sent in one call."""
        sid, block, j0, count, node_seq, _d0, _step = run
        dest = self.destinations.get(sid)
        if dest is None:
            return
        assert self.template is not None and self.send_segments is not None
        tpl = self.template(sid, dest)
        if tpl is None:
            for pkt in self.scheduler.run_packets(run):
                self._emit(pkt, data[pkt.offset : pkt.offset + pkt.length])
            return
        media = self.scheduler.sessions[sid].media
        payload = media.payload
        used = tpl.pack_run(
            self._buf, data, j0, count, payload,
            dest.seq_base + block * media.packets_per_block + j0, node_seq,
            dest.ts_base, media.block_starts[block], media.packet_step(block), dest.clock_rate,
            media.block_length(block),
        )  # fmt: skip
        size = tpl.header_size + payload
        addr = (dest.host, dest.port)
        with memoryview(self._buf) as whole, whole[:used] as view:
            batch_sink = self.local_batch.get(addr)
            if batch_sink is not None:
                self.handed_over += count
                batch_sink(view, size)
                return
            sink = self.local.get(addr)
            if sink is None:
                self.send_segments(view, size, addr)
                return
            self.handed_over += count
            for at in range(0, used, size):
                sink(bytes(view[at : at + size]))

    def _emit(self, pkt: Packet, payload: bytes) -> None:
        dest = self.destinations.get(pkt.session)
        if dest is None:
            return
        datagram = self.packetize(pkt, dest, payload)
        sink = self.local.get((dest.host, dest.port))
        if sink is not None:
            self.handed_over += 1
            sink(datagram)
        else:
            self.send(datagram, (dest.host, dest.port))
