"""Node side of the player's RTCP: Generic NACKs, ``YIMA`` flow-control feedback, time probes.

Every node listens for RTCP on its own port (advertised per node in
``x-yima-nodes``).  :class:`FeedbackReceiver` turns what arrives into actions
on this node's :class:`~yimaporc.yima.streaming.StreamingNode`:

- a Generic NACK (RFC 4585) for a fan-out session names this node's own
  per-node sequence numbers (low 16 bits, unwrapped against the node's
  counter); the node resends each packet at most once, from the last few
  seconds it sent;
- ``YIMA`` APP feedback (pause / resume / speed / delta p) re-anchors this
  node's schedule of the session at the cluster instant the packet names;
- a ``YIMT`` APP probe is answered at once, to the address it came from, with
  this node's cluster time and the session's start instant, packet count and
  packets per block: the player measures its round trip, the offset of the
  cluster clock and when the session started (docs/wire.md).

For a relayed session (a client that did not opt in to fan-out) the RTSP
node gets the client's RTCP; its NACKs name *global* sequence numbers and it
forwards them, and the feedback, to the owning nodes over RPC (``relay``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.logger import Logger
from twisted.protocols import amp

from ..rtp import (
    App,
    GenericNack,
    MalformedPacket,
    YimaFeedback,
    YimaKind,
    is_rtcp,
    parse_rtcp,
    serialize_rtcp,
    unwrap_seq,
)
from .control import StreamAction
from .streaming import StreamingNode

PROBE_NAME = b"YIMT"
PROBE_REQUEST = 0
PROBE_REPLY = 1
_REQ = struct.Struct("!IIq")  # media ssrc, token, client time (us)
_REPLY = struct.Struct("!IIqqqqII")  # + cluster time, start_ct, start_mt (us), total, ppb

# A retransmission carries, in the two padding bytes of the Yima extension block,
# the one-byte element ID 2, L=0, data 0x01 (docs/wire.md); the header stays 24 bytes.
RETRANSMISSION_MARK = b"\x20\x01"


def mark_retransmission(data: bytes) -> bytes:
    """An RTP packet Yima built (24-byte header) marked as a retransmission."""
    if len(data) >= 24 and data[12:14] == b"\xbe\xde" and data[16] == 0x14:
        return data[:22] + RETRANSMISSION_MARK + data[24:]
    return data


def is_retransmission(data: bytes) -> bool:
    """True for a packet :func:`mark_retransmission` marked."""
    return len(data) >= 24 and data[22:24] == RETRANSMISSION_MARK and data[12:14] == b"\xbe\xde"


class StreamPorts(amp.Command):
    """Where this node sends RTP from and takes RTCP at (asked at SETUP for ``x-yima-nodes``)."""

    commandName = b"yima.stream-ports"
    arguments = []  # type: ignore[var-annotated]
    response = [(b"rtp", amp.Integer()), (b"rtcp", amp.Integer())]


@attrs.frozen
class ProbeRequest:
    """``YIMT`` subtype 0: the player asks for the time (and the session's facts)."""

    ssrc: int
    media_ssrc: int
    token: int
    client_us: int


@attrs.frozen
class ProbeReply:
    """``YIMT`` subtype 1: the node's answer, echoing ``token`` and ``client_us``."""

    ssrc: int
    media_ssrc: int
    token: int
    client_us: int
    cluster_us: int
    start_ct_us: int
    start_mt_us: int
    total: int
    packets_per_block: int


def probe_request(ssrc: int, media_ssrc: int, token: int, client_us: int) -> bytes:
    """The bytes of a time probe."""
    data = _REQ.pack(media_ssrc & 0xFFFFFFFF, token & 0xFFFFFFFF, client_us)
    return serialize_rtcp(App(PROBE_REQUEST, ssrc & 0xFFFFFFFF, PROBE_NAME, data))


def probe_reply(r: ProbeReply) -> bytes:
    """The bytes of a probe answer."""
    data = _REPLY.pack(
        r.media_ssrc,
        r.token,
        r.client_us,
        r.cluster_us,
        r.start_ct_us,
        r.start_mt_us,
        r.total & 0xFFFFFFFF,
        r.packets_per_block & 0xFFFFFFFF,
    )
    return serialize_rtcp(App(PROBE_REPLY, r.ssrc, PROBE_NAME, data))


def parse_probe(app: App) -> ProbeRequest | ProbeReply | None:
    """A ``YIMT`` APP as request or reply (None for anything else)."""
    if app.name != PROBE_NAME:
        return None
    if app.subtype == PROBE_REQUEST and len(app.data) == _REQ.size:
        return ProbeRequest(app.ssrc, *_REQ.unpack(app.data))
    if app.subtype == PROBE_REPLY and len(app.data) == _REPLY.size:
        return ProbeReply(app.ssrc, *_REPLY.unpack(app.data))
    return None


class Relay(Protocol):
    """What the RTSP node does with RTCP of sessions it relays."""

    def session_for(self, media_ssrc: int) -> str | None:
        """The relayed session with this SSRC, if any."""

    def nack(self, session: str, gseqs: list[int]) -> None:
        """Forward a NACK of global sequence numbers to the owning nodes."""

    def control(self, session: str, action: StreamAction, at: float, value: float) -> None:
        """Forward flow-control feedback to every node of the session."""

    def touch(self, session: str) -> None:
        """The client is alive (RTCP counts as keep-alive)."""

    def handover(self, media_ssrc: int, node_index: int, gseq: int) -> None:
        """A fan-out player asks for the share holding global packet ``gseq`` (node
        ``node_index``'s, 0xFFFFFFFF: unknown) to be served elsewhere from there on."""


class FeedbackReceiver:
    """Handles the RTCP datagrams that reach this node."""

    log = Logger()

    def __init__(
        self,
        streaming: StreamingNode,
        cluster_time: Callable[[], float],
        send: Callable[[bytes, Any], None],
        relay: Relay | None = None,
        ssrc: int = 0,
    ) -> None:
        self.streaming = streaming
        self.cluster_time = cluster_time
        self.send = send
        self.relay = relay
        self.ssrc = ssrc
        self.last_feedback: dict[str, int] = {}
        self.received = 0
        self.malformed = 0
        self.nacked = 0
        self.feedback_applied = 0

    def _session(self, media_ssrc: int) -> str | None:
        got = self._sessions(media_ssrc)
        return got[0] if got else None

    def _sessions(self, media_ssrc: int) -> list[str]:
        """Every session of this node stamped with ``media_ssrc``: its own share and any
        share it took over (they all serve the same stream); its own first."""
        out = [sid for sid, d in self.streaming.destinations.items() if d.ssrc == media_ssrc]
        return sorted(out, key=lambda sid: "+" in sid)

    def datagram(self, data: bytes, addr: Any) -> None:
        """One datagram from a client (RTP on a muxed port is ignored)."""
        if not is_rtcp(data):
            return
        try:
            parts = parse_rtcp(data)
        except MalformedPacket as e:
            self.malformed += 1
            self.log.debug("rtcp: malformed datagram from {addr}: {e}", addr=addr, e=e)
            return
        self.received += 1
        for part in parts:
            try:
                self._handle(part, addr)
            except Exception:
                self.log.failure("rtcp: handling {p!r} failed", p=part)

    def _handle(self, part: object, addr: Any) -> None:
        if isinstance(part, GenericNack):
            self._nack(part)
        elif isinstance(part, YimaFeedback):
            self._feedback(part)
        elif isinstance(part, App):
            probe = parse_probe(part)
            if isinstance(probe, ProbeRequest):
                self._probe(probe, addr)

    def _relayed(self, media_ssrc: int) -> str | None:
        if self.relay is None:
            return None
        sid = self.relay.session_for(media_ssrc)
        if sid is not None:
            self.relay.touch(sid)
        return sid

    def _nack(self, nack: GenericNack) -> None:
        lost = nack.lost()
        relayed = self._relayed(nack.media_ssrc)
        if relayed is not None:
            assert self.relay is not None
            self.relay.nack(relayed, lost)
            return
        # The NACK names per-node numbers of one of this node's sessions of the stream
        # (its own share or one it took over); each resends what it holds of them.
        for sid in self._sessions(nack.media_ssrc):
            s = self.streaming.scheduler.sessions.get(sid)
            if s is None:
                continue
            seqs = [unwrap_seq(s.node_seq, pid) for pid in lost]
            self.nacked += len(seqs)
            self.streaming.nack(sid, [n for n in seqs if n >= 0])

    def _feedback(self, fb: YimaFeedback) -> None:
        if fb.kind == YimaKind.HANDOVER:
            if self.relay is not None:
                self.relay.handover(fb.media_ssrc, fb.value, fb.aux)
            return
        relayed = self._relayed(fb.media_ssrc)
        sids = [relayed] if relayed is not None else self._sessions(fb.media_ssrc)
        if not sids:
            return
        sid = sids[0]
        last = self.last_feedback.get(sid)
        if last is not None and not 0 < (fb.feedback_seq - last) % (1 << 32) < (1 << 31):
            return  # not newer than the last one applied (UDP reordered or duplicated it)
        now = self.cluster_time()
        at = fb.at_us / 1e6 if fb.at_us else now
        if fb.kind == YimaKind.PAUSE:
            action, value = StreamAction.PAUSE, fb.value / 1000  # the position to stop at (0: none)
        elif fb.kind == YimaKind.RESUME:
            action, value = StreamAction.RESUME, 0.0
        elif fb.kind == YimaKind.SPEED and fb.value > 0:
            action, value = StreamAction.SPEED, fb.speed
        elif fb.kind == YimaKind.DELTA_P and fb.value > 0:
            s = self.streaming.scheduler.sessions.get(sid)
            if s is None:
                return
            total = s.media.total
            step = s.media.duration / max(1, total)  # delta p at real time
            action, value = StreamAction.SPEED, step / (fb.value / 1e6)
        else:
            return  # BUFFER reports change nothing
        self.last_feedback[sid] = fb.feedback_seq
        self.feedback_applied += 1
        if relayed is not None:
            assert self.relay is not None
            self.relay.control(sid, action, at, value)
        else:
            for one in sids:  # every session of the stream here, taken-over shares too
                self.streaming.control(one, action, at, value)

    def _probe(self, req: ProbeRequest, addr: Any) -> None:
        relayed = self._relayed(req.media_ssrc)
        sid = relayed if relayed is not None else self._session(req.media_ssrc)
        start_ct = start_mt = 0.0
        total = ppb = 0
        dest = self.streaming.destinations.get(sid) if sid is not None else None
        s = self.streaming.scheduler.sessions.get(sid) if sid is not None else None
        if dest is not None and s is not None:
            start_ct, start_mt = dest.start_ct, dest.start_mt
            total = s.media.total
            ppb = s.media.packets_per_block
        reply = ProbeReply(
            self.ssrc,
            req.media_ssrc,
            req.token,
            req.client_us,
            round(self.cluster_time() * 1e6),
            round(start_ct * 1e6),
            round(start_mt * 1e6),
            total,
            ppb,
        )
        self.send(probe_reply(reply), addr)
