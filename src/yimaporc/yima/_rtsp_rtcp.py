"""RTCP of relayed sessions: client feedback (NACK, flow control) routed to the
nodes that own the packets, and the sender reports and BYE this node sends.

A mixin of :class:`~.rtspservice.YimaStreamingService` (its methods, moved here
unchanged), typed against :class:`~._rtsp_host.StreamingHost`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..rtp import (
    Bye,
    SdesChunk,
    SdesItem,
    SenderReport,
    SourceDescription,
    ntp_timestamp,
    serialize_rtcp,
)
from ._rtsp_plan import (
    SR_INTERVAL,
    _Plan,
)
from .control import StreamAction
from .store import BlockKey
from .streaming import (
    StreamControl,
    StreamNack,
)

if TYPE_CHECKING:
    from ._rtsp_host import StreamingHost


class RtcpMixin:
    """RTCP of :class:`~.rtspservice.YimaStreamingService`: feedback routing, SR, BYE."""

    def _send_rtcp_reply(self: StreamingHost, data: bytes, addr: Any) -> None:
        if self.rtcp_port is not None and addr is not None:
            self.rtcp_port.write(data, addr)  # type: ignore[attr-defined]

    def session_for(self: StreamingHost, media_ssrc: int) -> str | None:
        """The relayed session (client did not opt in to fan-out) with this SSRC."""
        for sid, plan in self.plans.items():
            if plan.ssrc == media_ssrc and not plan.fanout:
                return sid
        return None

    def nack(self: StreamingHost, session: str, gseqs: list[int]) -> None:
        """Forward a NACK of 16-bit global seqs to the nodes (each resends what it sent)."""
        plan = self.plans.get(session)
        if plan is None or plan.relay is None:
            return
        base = plan.relay.next
        full = []
        for seq16 in gseqs[:512]:
            g = (seq16 - plan.seq_offset) & 0xFFFF
            full.append(base + ((g - base + 0x8000) & 0xFFFF) - 0x8000)
        self._nack_owners(session, plan, full)

    def _nack_owners(self: StreamingHost, session: str, plan: _Plan, gseqs: list[int]) -> None:
        """Ask each packet's owner (the node whose share holds its block; this node for
        a share it took over) to resend it; nobody else is bothered."""
        by_owner: dict[str | None, list[int]] = {}
        for g in gseqs:
            by_owner.setdefault(self._owner(plan, g), []).append(g)
        members = {m.node_id: m.address for m in self.node.view.members}
        for owner, some in by_owner.items():
            if owner is None or (owner not in plan.takeovers and owner not in members):
                # Unknown owner (no layout) or gone and not taken over: every member.
                targets = [n for n in members if n not in plan.takeovers]
            else:
                targets = [owner]
            for node_id in targets:
                if node_id in plan.takeovers:
                    self.streaming.nack(plan.takeovers[node_id], [], some)
                elif node_id == self.node.node_id:
                    self.streaming.nack(session, [], some)
                else:
                    d = self.node.rpc.call(members[node_id], StreamNack, session=session,
                                           node_seqs=[], gseqs=some)  # fmt: skip
                    d.addErrback(lambda f: None)

    def _owner(self: StreamingHost, plan: _Plan, gseq: int) -> str | None:
        """The node whose share holds global packet ``gseq`` (its block's first place)."""
        if plan.timing is None or self.mode != "bipartite":
            return self.node.node_id if self.mode != "bipartite" else None
        block = gseq // plan.timing.packets_per_block
        got = plan.owners.get(block)
        if got is None:
            try:
                places = self.storage.places(self.storage.media_info(plan.media), BlockKey(block))
            except Exception:
                places = []
            got = places[0].node_id if places else ""
            if len(plan.owners) >= 4096:
                plan.owners.clear()
            plan.owners[block] = got
        return got or None

    def control(
        self: StreamingHost, session: str, action: StreamAction, at: float, value: float
    ) -> None:
        """Forward flow-control feedback to every node of the session (and its takeovers)."""
        plan = self.plans.get(session)
        for local in plan.takeovers.values() if plan is not None else ():
            self.streaming.control(local, action, at, value)
        if plan is not None and plan.relay is not None:
            # The relay plays out on the nodes' schedule: it follows the same change.
            if action == StreamAction.SPEED and value > 0 and plan.playing:
                plan.position, plan.started_ct = self._media_position(plan, at), at
                plan.speed = value
            elif action == StreamAction.PAUSE and plan.playing:
                plan.position = value if value > 0 else self._media_position(plan, at)
                plan.playing, plan.paused_ct = False, at
            elif action == StreamAction.RESUME and not plan.playing and plan.played:
                plan.started_ct, plan.playing = at, True
        for m in self.node.view.members:
            if m.node_id == self.node.node_id:
                self.streaming.control(session, action, at, value)
            elif self.mode == "bipartite":
                d = self.node.rpc.call(m.address, StreamControl, session=session, action=action,
                                       at=at, value=value)  # fmt: skip
                d.addErrback(lambda f: None)

    def touch(self: StreamingHost, session: str) -> None:
        """Client RTCP keeps its RTSP session alive."""
        self.factory.touch(session)

    # --- IRtspHandler -------------------------------------------------------------

    def _send_rtcp(self: StreamingHost, plan: _Plan, data: bytes) -> None:
        if plan.tcp_channel is not None:
            if plan.session is not None:
                plan.session.send_interleaved(plan.tcp_channel + 1, data)
        else:
            self._send(data, (plan.dest_host, plan.dest_port + 1))

    def _sender_report(self: StreamingHost, plan: _Plan) -> bytes:
        """SR + SDES CNAME (a compound packet, RFC 3550 §6.1) for the relayed stream.

        The RTP timestamp is the last forwarded packet's, advanced by the wall
        time since it was sent while playing, so players can map RTP to NTP time.
        """
        now = self.reactor.seconds()
        rtp_ts = plan.last_rtp_ts or plan.ts_base
        if plan.playing and plan.last_rtp_ts is not None:
            rtp_ts += round((now - plan.last_sent_at) * plan.clock_rate)
        cname = f"yima@{self.node.config.cluster_host}".encode()
        return serialize_rtcp((
            SenderReport(plan.ssrc, ntp_timestamp(now), rtp_ts & 0xFFFFFFFF,
                         plan.packets & 0xFFFFFFFF, plan.octets & 0xFFFFFFFF),
            SourceDescription((SdesChunk(plan.ssrc, ((SdesItem.CNAME, cname),)),)),
        ))  # fmt: skip

    def _sr_tick(self: StreamingHost, session_id: str) -> None:
        plan = self.plans.get(session_id)
        if plan is None or plan.bye_sent:
            return
        if plan.packets:
            try:
                self._send_rtcp(plan, self._sender_report(plan))
            except Exception:
                self.log.failure("rtsp: sender report for {s} failed", s=session_id)
        plan.sr_timer = self.reactor.callLater(SR_INTERVAL, self._sr_tick, session_id)

    def _bye(self: StreamingHost, plan: _Plan, reason: bytes = b"end of stream") -> None:
        """RTCP BYE (after the last packet, or when the stream cannot go on), so
        players end the stream."""
        if plan.bye_sent:
            return
        plan.bye_sent = True
        data = self._sender_report(plan) + serialize_rtcp(Bye((plan.ssrc,), reason[:255]))
        self._send_rtcp(plan, data)
