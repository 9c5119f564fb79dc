"""Session planning: PLAY (start instant, seek, keyframe search, RTP-Info), PAUSE
and the media position of a session.

A mixin of :class:`~.rtspservice.YimaStreamingService` (its methods, moved here
unchanged), typed against :class:`~._rtsp_host.StreamingHost`."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred, succeed
from twisted.python.failure import Failure

from ..rtsp import RtspStatusError
from ..rtsp._machine import ServerSession
from ..rtsp._wire import NptRange, RtpInfo
from ..rtsp.interfaces import PlayReply
from ._rtsp_plan import (
    _TIMINGS,
    KEYFRAME_SEARCH_BLOCKS,
    OVERDUE,
    RELAY_LEAD,
    START_LEAD,
    TRACK,
    WATCH_INTERVAL,
    _last_keyframe,
    _media_timing,
    _Plan,
    lavf_npt,
    lavf_quirk,
    rtp_time,
)
from .control import StreamAction
from .media import (
    KIND_TS,
    PCR_HZ,
    PCR_WRAP,
    TS_PACKET,
    MediaInfo,
    last_pat_before,
    packet_pcr,
)
from .schedule import MediaTiming
from .store import BlockKey
from .streaming import (
    StreamControl,
    StreamStart,
)

if TYPE_CHECKING:
    from ._rtsp_host import StreamingHost


class PlayMixin:
    """Session planning of :class:`~.rtspservice.YimaStreamingService`: PLAY, seek, PAUSE."""

    def _timing_ready(self: StreamingHost, name: str) -> Deferred[MediaTiming]:
        """The media's time index loaded (from disk or a peer) and its timing computed,
        both off the reactor (the timing is computed once per catalog entry)."""

        def computed(info: MediaInfo) -> MediaTiming | Deferred[MediaTiming]:
            got = _TIMINGS.get(id(info))
            if got is not None and got[0] is info:
                return got[1]
            d: Deferred[MediaTiming] = self.storage.run_blocking(_media_timing, info)

            def keep(timing: MediaTiming) -> MediaTiming:
                if len(_TIMINGS) >= 256:
                    _TIMINGS.clear()
                _TIMINGS[id(info)] = (info, timing)
                return timing

            return d.addCallback(keep)

        loaded: Deferred[MediaInfo] = maybeDeferred(self.storage.time_index, name)
        return loaded.addCallback(computed)

    def play(
        self: StreamingHost, session: ServerSession, range: NptRange | None
    ) -> Deferred[PlayReply]:
        """Start, resume, or seek (a Range with a start, in Ready or Playing) on every node.

        The first packet is found by bisection in the media's time index (loaded
        and prepared off the reactor); the reply's RTP-Info names that packet's
        sequence number and timestamp.
        """
        plan = self.plans[session.session_id]
        self._media(plan.media)  # 404/415 at once
        ready = self._timing_ready(plan.media)
        now: list[Any] = []

        def grab(result: Any) -> Any:
            now.append(result)
            return result

        ready.addBoth(grab)
        if not now:  # being loaded: answer when it is
            return ready.addCallback(lambda timing: self._play(session, range, timing))
        # Loaded already (the usual case: loaded when the catalog record arrived): go on
        # in this call, so a refusal is raised here.
        ready.addErrback(lambda _: None)
        if isinstance(now[0], Failure):
            now[0].raiseException()
        return self._play(session, range, now[0])

    def _play(
        self: StreamingHost,
        session: ServerSession,
        range: NptRange | None,
        timing: MediaTiming,
    ) -> Deferred[PlayReply]:
        sid = session.session_id
        plan = self.plans.get(sid)
        if plan is None:
            raise RtspStatusError(454, "session torn down while loading the time index")
        info = self._media(plan.media)
        if not plan.fanout and plan.relay_port is None:
            self._open_relay(sid, plan)
        at = self.node.cluster_time() + START_LEAD
        seek = range is not None and range.start is not None
        if plan.played and not seek:
            d: Deferred[Any] = succeed(None)
            if not plan.playing:  # resume where PAUSE stopped
                plan.started_ct, plan.playing = at, True
                # (A PAUSE that overtook a PLAY's start left the overdue watch waiting.)
                plan.watch_from = min(plan.watch_from, at + OVERDUE)
                d = self._control(sid, StreamAction.RESUME, at)
            if plan.relay is not None:
                # The next packet the relay forwards (it stopped at PAUSE, or goes on);
                # its timer, idle while paused, is armed for it (the nodes may have
                # nothing more to send: the rest of the title is held already).
                first = plan.relay.next
                self._forward(sid, plan, [])
            else:
                first = timing.first_gseq_at(self._media_position(plan, at))
            return d.addCallback(lambda _: self._play_reply(plan, info, timing, first))
        start_mt = range.start if range is not None and range.start is not None else 0.0
        if info.kind == KIND_TS and lavf_quirk(session.user_agent):
            start_mt = lavf_npt(info, start_mt)
        # Past the end the SDP announced (the last frame's, after the last PCR) is 457;
        # short of it a seek starts at the keyframe before, as anywhere else.
        duration = self._range_end(info, info.duration or timing.duration) or 0.0
        if duration > 0 and start_mt > duration:
            raise RtspStatusError(
                457, f"Invalid Range: npt={start_mt:g}- starts past the end ({duration:.3f} s)"
            )
        if plan.played and plan.relay is not None:
            # Seeking a started stream: the client gets nothing more of the old position
            # while the keyframe is looked up (its numbers go on from relay.next).
            plan.node_ssrc = (plan.node_ssrc + 1 + self.rng.getrandbits(31)) & 0xFFFFFFFF
            plan.relay.reset(plan.relay.next)
            if plan.relay_timer is not None and plan.relay_timer.active():
                plan.relay_timer.cancel()
            # Nor is anything of it overdue: the watch waits for the new position's
            # nodes (it would otherwise ask the owners for the whole old lead, and take
            # over every node it no longer hears, the old packets being stale now).
            plan.watch_from = float("inf")
            plan.nacked.clear()
        if info.kind == KIND_TS and start_mt > 0:
            found = self._keyframe_start(info, timing, start_mt)
        else:
            found = succeed(None)
        return found.addCallback(lambda kf: self._seek(sid, plan, info, timing, start_mt, kf))

    def _seek(
        self: StreamingHost,
        sid: str,
        plan: _Plan,
        info: MediaInfo,
        timing: MediaTiming,
        start_mt: float,
        keyframe: tuple[int, float] | None,
    ) -> Deferred[PlayReply]:
        """Start every node from ``start_mt`` or, for MPEG-TS, from the packet
        ``keyframe`` names (``(gseq, media time of the keyframe)``)."""
        if self.plans.get(sid) is not plan:
            raise RtspStatusError(454, "session torn down while seeking")
        now = self.node.cluster_time()
        at = now + START_LEAD
        shown: float | None = None
        if keyframe is not None:
            first, shown = keyframe
            start_mt = timing.gseq_time(first)  # the nodes' first packet is exactly ``first``
        else:
            first = timing.first_gseq_at(start_mt)
        seeking = plan.played
        if plan.relay is not None:
            # Quick start with the full lead: the nodes' schedule is anchored RELAY_LEAD
            # in the past, so they send the first RELAY_LEAD seconds at once (a burst to
            # the relay) and the rest RELAY_LEAD ahead of playout; the relay plays out
            # from the PLAY reply (``started`` moves the playout instant there: every
            # node has started by then), not RELAY_LEAD + START_LEAD after it.  Until
            # the reply, the playout instant is the latest it can be (``at``) and the
            # overdue watch waits (``watch_from``).
            plan.lead = at - (now - RELAY_LEAD)
            plan.watch_from = float("inf")
            # A gap in the burst (a share still on its way) is held the whole lead,
            # never given up because the packets after it are all due at once.
            plan.hold_gaps_until = at + plan.lead
        plan.position, plan.started_ct, plan.playing, plan.played = start_mt, at, True, True
        plan.speed = 1.0  # the nodes start the new position at real time
        plan.total = timing.total
        plan.clock_rate = timing.clock_rate
        plan.timing = timing
        plan.nacked.clear()
        plan.owners.clear()
        if plan.relay is not None:
            if plan.watch_timer is None or not plan.watch_timer.active():
                plan.watch_timer = self.reactor.callLater(WATCH_INTERVAL, self._watch, sid)
            if seeking:
                # The client's numbers go on by one from the last the relay handed it.
                plan.seq_offset += plan.relay.next - first
                if plan.last_rtp_ts is not None:
                    # Its RTP timestamps go on with wall time (as live555's and
                    # gst-rtsp-server's do), never back: a packet of the old position
                    # read after the player's flush (UDP) then precedes the new clock
                    # base, where GStreamer would take it as media played past the new
                    # start and end the stream that much early (its NPT-stop estimate).
                    since = max(0.0, self.reactor.seconds() - plan.last_sent_at)
                    step = max(1, round(since * timing.clock_rate))
                    now_first = rtp_time(info, timing, first, plan.ts_base)
                    plan.ts_base = (plan.ts_base + plan.last_rtp_ts + step - now_first) & 0xFFFFFFFF
                plan.node_ssrc = (plan.node_ssrc + 1 + self.rng.getrandbits(31)) & 0xFFFFFFFF
                if plan.relay_timer is not None and plan.relay_timer.active():
                    plan.relay_timer.cancel()
                if plan.bye_timer is not None and plan.bye_timer.active():
                    plan.bye_timer.cancel()
                plan.bye_timer, plan.bye_sent = None, False
            plan.relay.reset(first)
            if plan.sr_timer is None or not plan.sr_timer.active():
                plan.sr_timer = self.reactor.callLater(1.0, self._sr_tick, sid)
            if first >= plan.total:  # a seek to the very end: nothing to send, say so
                self._forward(sid, plan, [])
        d = DeferredList(self._start_everywhere(sid, plan, at, start_mt), consumeErrors=True)

        def started(results: list[tuple[bool, Any]]) -> PlayReply:
            failed = [r for ok, r in results if not ok]
            if len(failed) == len(results):
                raise RtspStatusError(503, "no node could start the stream")
            for f in failed:
                self.log.warn("rtsp: a node did not start {s}: {e}", s=sid,
                              e=f.getErrorMessage())  # fmt: skip
            if plan.relay is not None and plan.started_ct == at and plan.playing:
                self._play_out_now(sid, plan)
            return self._play_reply(plan, info, timing, first, shown)

        return d.addCallback(started)

    def _play_out_now(self: StreamingHost, sid: str, plan: _Plan) -> None:
        """Every node has started a relayed PLAY: the relay's playout starts now (the
        lead shrinks by what is left of the provisional wait, to RELAY_LEAD plus the
        time the nodes took to start) and the overdue watch begins.  The relay's next
        release is a timer, so it follows the PLAY reply."""
        now = self.node.cluster_time()
        if now < plan.started_ct:
            plan.lead -= plan.started_ct - now
            plan.started_ct = now
        # A gap in the burst is waited for as long as any packet: the lead from now.
        plan.hold_gaps_until = now + plan.lead
        # The burst (everything the nodes' schedule has due by now) is overdue OVERDUE
        # after the nodes started, like any packet OVERDUE after its send time.
        plan.watch_from = now + OVERDUE
        self._forward(sid, plan, [])  # re-arms the relay timer for the new deadline

    @inlineCallbacks
    def _keyframe_start(
        self: StreamingHost, info: MediaInfo, timing: MediaTiming, target: float
    ) -> Generator[Deferred[Any], Any, tuple[int, float] | None]:
        """The packet to start an MPEG-TS seek to ``target`` from: the last PAT before the
        last random access point of the PCR PID whose PTS is at or before ``target``
        (both on the media timeline: PTS less the first PCR), and that keyframe's time.

        Reads blocks backwards from the one playing at ``target`` (a keyframe's bytes
        arrive before it is presented), at most :data:`KEYFRAME_SEARCH_BLOCKS` of them;
        None when there is no such keyframe (the plain time seek is used).
        """
        if info.pcr_pid is None or info.pcr_origin is None or not timing.blocks:
            return None
        run = self.storage.run_blocking
        block = max(0, bisect_right(timing.block_starts, target) - 1)  # O(log blocks)
        found: tuple[int, int, float] | None = None
        data = prev = b""
        for b in range(block, max(-1, block - KEYFRAME_SEARCH_BLOCKS), -1):
            try:
                data = yield self.storage.read_block(info.name, b)
            except Exception:
                self.log.failure("rtsp: seek in {m}: block {b} unreadable", m=info.name, b=b)
                return None
            # Scanning a block's packets is CPU work: in the pool, never on the reactor.
            hit = yield run(_last_keyframe, info, data, target)
            if hit is not None:
                found = (b, *hit)
                break
        if found is None:
            return None
        b, offset, shown = found
        pat = yield run(last_pat_before, data, offset)
        if pat is None and b > 0:  # the PAT/PMT went out at the end of the previous block
            try:
                prev = yield self.storage.read_block(info.name, b - 1)
            except Exception:
                prev = b""
            before = (yield run(last_pat_before, prev, len(prev))) if prev else None
            if before is not None:
                b, pat, data = b - 1, before, prev  # time it from that block's PCRs
        start = offset if pat is None else pat
        shown = yield run(self._pcr_time, info, data, start - start % timing.payload, shown)
        return b * timing.packets_per_block + start // timing.payload, shown

    @staticmethod
    def _pcr_time(info: MediaInfo, data: bytes, at: int, default: float) -> float:
        """Media time of byte ``at`` of ``data`` from the next PCR after it (exact,
        where the time index interpolates over a whole block); ``default`` if none."""
        assert info.pcr_origin is not None
        for k in range(at, len(data) - TS_PACKET + 1, TS_PACKET):
            found = packet_pcr(data, k)
            if found is not None and found[0] == info.pcr_pid:
                rel = (found[1] - info.pcr_origin) % PCR_WRAP
                return 0.0 if rel >= PCR_WRAP // 2 else rel / PCR_HZ
        return default

    def _start_everywhere(
        self: StreamingHost, sid: str, plan: _Plan, at: float, start_mt: float
    ) -> list[Deferred[Any]]:
        """StreamStart on every node of the session (and its local takeovers), from ``start_mt``.

        Node indices are those of the first PLAY, so a seek after a takeover keeps
        every node's (and the taken share's) number.
        """
        members = {m.node_id: m for m in self.node.view.members}
        if not plan.members:
            plan.members = tuple(members)
        me = self.node.node_id
        dest_host, dest_port = self._destination(plan)
        common: dict[str, Any] = dict(media=plan.media, start_ct=at - plan.lead,
                                      start_mt=start_mt, host=dest_host, port=dest_port,
                                      ssrc=plan.node_ssrc, seq_base=plan.seq_base,
                                      ts_base=plan.ts_base)  # fmt: skip
        if plan.relay_port is not None and self.relay_batch > 0:
            # Relayed: the relay holds every packet to its due instant, so the nodes
            # send it in runs of --relay-batch-ms (fewer sends and relay reads).
            common["batch"] = self.relay_batch
        calls: list[Deferred[Any]] = []
        for i, node_id in enumerate(plan.members):
            m = members.get(node_id)
            if m is None or (self.mode == "master-slave" and node_id != me):
                continue
            if node_id in plan.takeovers:
                continue  # taken over early (silent, not yet gone): served here
            kwargs = dict(common, session=sid, node_index=i,
                          all_blocks=self.mode == "master-slave")  # fmt: skip
            if node_id == me:
                calls.append(maybeDeferred(self.streaming.start, **kwargs))
            else:
                # The RTSP node's id: should it leave, the node stops this share.
                calls.append(self.node.rpc.call(m.address, StreamStart, origin=me, **kwargs))
        for node_id, local in plan.takeovers.items():
            served = self.streaming.scheduler.sessions.get(local)
            if served is not None:
                blocks = list(served.my_blocks)
            else:
                info = self.storage.media_info(plan.media)
                blocks = [i for i in range(info.blocks)
                          if (p := self.storage.places(info, BlockKey(i))) and p[0].node_id == node_id]  # fmt: skip
            index = plan.takeover_index.setdefault(
                node_id, len(plan.members) + len(plan.takeover_index)
            )
            kwargs = dict(common, session=local, node_index=index,
                          all_blocks=False, blocks=blocks)  # fmt: skip
            calls.append(maybeDeferred(self.streaming.start, **kwargs))
        return calls

    def _play_reply(
        self: StreamingHost,
        plan: _Plan,
        info: MediaInfo,
        timing: MediaTiming,
        first: int,
        shown: float | None = None,
    ) -> PlayReply:
        """Range from the first packet's media time (for an MPEG-TS seek ``shown``, that
        of the PAT before the keyframe by the next PCR: players such as GStreamer time
        the stream from it); RTP-Info with the absolute URL and that packet's sequence
        number (as the client gets it) and timestamp."""
        duration = info.duration or timing.duration
        start = min(timing.gseq_time(first), duration) if first < timing.total else duration
        duration = self._range_end(info, duration) or duration
        if shown is not None:
            start = min(shown, duration)
        offset = plan.seq_base if plan.relay is None else plan.seq_offset
        rtptime = rtp_time(info, timing, first, plan.ts_base)
        return PlayReply(NptRange(round(start, 3), duration),
                         (RtpInfo(self._track_url(plan), (first + offset) & 0xFFFF, rtptime),))  # fmt: skip

    def _range_end(self: StreamingHost, info: MediaInfo, duration: float | None) -> float | None:
        """The end every Range answer names: the presentation's end DESCRIBE found (the
        SDP's ``a=range``) when known for this catalog entry, else ``duration``."""
        end = self._ends.get(info.name)
        return end[1] if end is not None and end[0] is info else duration

    def _track_url(self: StreamingHost, plan: _Plan) -> str:
        """The stream's absolute URL as the client set it up (players match RTP-Info
        against their control URL and ignore a relative one)."""
        if plan.session is not None and plan.session.streams:
            return next(iter(plan.session.streams))
        host, port = self.node.config.cluster_host, 554
        if self.rtsp_port is not None:
            port = self.rtsp_port.getHost().port  # type: ignore[attr-defined]
        host = f"[{host}]" if ":" in host else host
        return f"rtsp://{host}:{port}/{plan.media}/{TRACK}"

    def _control(
        self: StreamingHost, session_id: str, action: StreamAction, at: float
    ) -> Deferred[Any]:
        plan = self.plans.get(session_id)
        for local in plan.takeovers.values() if plan is not None else ():
            self.streaming.control(local, action, at, 0.0)
        calls = []
        for m in self.node.view.members:
            if m.node_id == self.node.node_id:
                self.streaming.control(session_id, action, at, 0.0)
            elif self.mode == "bipartite":
                calls.append(self.node.rpc.call(m.address, StreamControl, session=session_id,
                                                action=action, at=at, value=0.0))  # fmt: skip
        return DeferredList(calls, consumeErrors=True)

    def pause(self: StreamingHost, session: ServerSession) -> Deferred[NptRange | None]:
        """Pause on every node at one cluster instant; answers the Range from the pause point."""
        plan = self.plans.get(session.session_id)
        now = self.node.cluster_time()
        at = now + 0.05
        if plan is not None and plan.playing:
            if plan.relay is not None:
                # The relay stops now, before the reply (RFC 2326 §10.6: a PAUSE without
                # Range halts delivery at once): a player flushes at PAUSE, and GStreamer
                # takes a frame of the old position that follows the reply as the timing
                # base of the next PLAY's, corrupting what it decodes after a seek.  What
                # fell due by now goes first; the nodes stop at ``at`` (the relay holds
                # what they send meanwhile, a slightly longer lead on resume).
                plan.position = self._media_position(plan, now)
                plan.playing, plan.paused_ct = False, now
                self._forward(session.session_id, plan, plan.relay.tick(now))
            else:
                plan.position = self._media_position(plan, at)
                plan.playing, plan.paused_ct = False, at

        def paused(_: Any) -> NptRange | None:
            if plan is None:
                return None
            info = self.storage.media_info(plan.media)
            return NptRange(round(plan.position, 3), self._range_end(info, info.duration))

        return self._control(session.session_id, StreamAction.PAUSE, at).addCallback(paused)

    @staticmethod
    def _media_position(plan: _Plan, at: float) -> float:
        """Media time playing at cluster time ``at`` (ignoring client speed feedback)."""
        if not plan.playing:
            return plan.position
        return plan.position + max(0.0, at - plan.started_ct) * plan.speed

    # --- sessions follow membership ----------------------------------------------
