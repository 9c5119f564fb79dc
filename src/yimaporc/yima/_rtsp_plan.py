"""What the RTSP front keeps per session (:class:`_Plan`), its tunables, and the
media-timing helpers the planner, relay and RTCP parts share."""

from __future__ import annotations

import socket
from typing import Any

import attrs
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import DatagramProtocol

from ..rtsp import RtspStatusError
from ..rtsp._machine import ServerSession
from ._relay_clock import RelayWake
from .media import (
    KIND_WAV,
    PTS_WRAP,
    MediaInfo,
    packet_bytes,
    pes_starts,
)
from .relay import Reorderer
from .schedule import MediaTiming

START_LEAD = 0.5
# A delivery tick also takes what falls due within this many seconds: a session's
# packets then leave in batches of several per system call (one GSO send) instead of
# one wake-up each; players buffer far more than this (docs/benchmarks.md).
SEND_AHEAD = 0.01
# Relayed sessions: the nodes send this far ahead of the playout instant and the relay
# holds each packet until it is due, so an overdue packet can be asked again of its
# owner or, the owner being silent, its share served from parity here before the
# player misses it (docs/wire.md, "Lead, overdue packets and early takeover").
RELAY_LEAD = 1.5
# The relay looks for overdue packets this often; a packet is overdue this long after
# its node should have sent it; the owner's share is taken over when a NACK went
# unanswered this long and nothing came from that node for SILENT seconds.
WATCH_INTERVAL = 0.05
OVERDUE = 0.15
RETRY = 0.25
SILENT = 0.3
# A watch that runs this much later than WATCH_INTERVAL after the one before found this
# node stalled (its own CPU, a throttled CPU group): the packets it misses may wait
# unread in its sockets, so it NACKs but takes no share over in that run.
WATCH_STALL = 0.1
# A node that went silent is read around (parity) for this long, unless it is heard again.
SUSPECT_FOR = 30.0
# A TS seek looks this many blocks back for a keyframe (GOPs longer than this many
# blocks' worth of media start at the packet playing at the requested time).
KEYFRAME_SEARCH_BLOCKS = 32
# The end-of-stream BYE waits this long after the last packet: a player ends on
# BYE, and one whose RTP socket still holds the last packets (a busy receiver,
# GStreamer's udpsrc) would drop them.
BYE_GRACE = 1.0
SR_INTERVAL = 5.0  # RFC 3550's minimum interval; the first SR goes 1 s after PLAY
TRACK = "track1"


_TIMINGS: dict[int, tuple[MediaInfo, MediaTiming]] = {}


def media_timing(info: MediaInfo) -> MediaTiming:
    """What the scheduler needs of a catalog entry (computed once per catalog entry:
    the time index with its per-block packet counts, ready for bisection)."""
    got = _TIMINGS.get(id(info))
    if got is not None and got[0] is info:
        return got[1]
    timing = _media_timing(info)
    if len(_TIMINGS) >= 256:
        _TIMINGS.clear()
    _TIMINGS[id(info)] = (info, timing)
    return timing


def rtp_time(info: MediaInfo, timing: MediaTiming, gseq: int, ts_base: int) -> int:
    """The RTP timestamp of global packet ``gseq``, as :meth:`YimaStreamingService._packetize`
    stamps it (media time for MPEG-TS; the first sample frame for L16)."""
    if info.kind == KIND_WAV and info.wav is not None:
        ppb = timing.packets_per_block
        at = (gseq // ppb) * info.block_size + (gseq % ppb) * timing.payload
        frames = max(0, max(at, info.wav.data_offset) - info.wav.data_offset) // info.wav.frame_size
        return (ts_base + frames) & 0xFFFFFFFF
    return (ts_base + round(timing.gseq_time(gseq) * timing.clock_rate)) & 0xFFFFFFFF


def lavf_quirk(user_agent: str) -> bool:
    """libavformat's RTSP client (ffmpeg, ffplay, mpv, players built on it) names its
    MPEG-TS seek positions on the stream's own PTS clock: ``-ss T`` asks for
    ``npt=(first PTS + T)``, in seconds, not for npt T (RFC 2326 §3.6)."""
    return user_agent.startswith("Lavf")


def lavf_npt(info: MediaInfo, npt: float) -> float:
    """The media time a libavformat client means by ``npt`` (its PTS clock in seconds):
    that PTS less the first PCR's, unwrapped; 0 for anything before the start."""
    if info.pcr_origin is None:
        return npt
    rel = (round(npt * 90000) - info.pcr_origin // 300) % PTS_WRAP
    return 0.0 if rel >= PTS_WRAP // 2 else rel / 90000


def _media_timing(info: MediaInfo) -> MediaTiming:
    if info.index_digest and not info.block_times:
        # Never guess the timing: the index is loaded (off the reactor) before any use.
        raise RtspStatusError(503, f"{info.name}: time index not loaded yet")
    starts = tuple(t / 1e6 for t in info.block_times) or tuple(float(i) for i in range(info.blocks))
    if info.kind == KIND_WAV and info.wav is not None:
        return MediaTiming(info.name, info.size, info.block_size, starts, info.duration or 0.0,
                           packet_bytes(info.wav), info.wav.sample_rate)  # fmt: skip
    return MediaTiming(info.name, info.size, info.block_size, starts, info.duration or 0.0)


def _last_keyframe(info: MediaInfo, data: bytes, target: float) -> tuple[int, float] | None:
    """(offset, media time) of the last random access point of ``info``'s PCR PID in the
    block ``data`` whose PTS (on the media timeline) is at or before ``target``
    (blocking: a scan of the block's packets, run in a thread)."""
    assert info.pcr_pid is not None and info.pcr_origin is not None
    origin = info.pcr_origin // 300
    for pes in reversed(pes_starts(data, info.pcr_pid)):
        if not pes.key or pes.pts is None:
            continue
        t = ((pes.pts - origin + PTS_WRAP // 2) % PTS_WRAP - PTS_WRAP // 2) / 90000
        if t <= target + 1e-6:
            return pes.offset, max(0.0, t)
    return None


def _big_buffers(port: IListeningPort, size: int = 4 << 20) -> None:
    """A few MB of socket buffer: the default 208 KB is ~0.2 s of one stream (bench finding)."""
    sock = getattr(port, "socket", None)
    if sock is None:
        return
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
        except OSError:
            pass


def _header_length(data: bytes) -> int:
    """Bytes of RTP header (fixed part, CSRCs, extension) in front of the payload."""
    n = 12 + 4 * (data[0] & 0x0F)
    if data[0] & 0x10 and len(data) >= n + 4:
        n += 4 + 4 * int.from_bytes(data[n + 2 : n + 4], "big")
    return min(n, len(data))


class _Udp(DatagramProtocol):
    def __init__(self, on_datagram: Any = None, on_run: Any = None) -> None:
        self.on_datagram = on_datagram
        self.on_run = on_run

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if self.on_datagram is not None:
            self.on_datagram(data, addr)

    def datagramsReceived(self, data: bytes, size: int, addr: Any) -> None:
        """A run of ``size``-byte datagrams in one read (:mod:`.recvpath`, UDP GRO)."""
        if self.on_run is not None:
            self.on_run(data, size, addr)
        else:
            for at in range(0, len(data), size):
                self.datagramReceived(data[at : at + size], addr)


@attrs.define
class _Plan:
    """One RTSP session as this (RTSP) node planned it."""

    media: str
    dest_host: str
    dest_port: int
    fanout: bool
    tcp_channel: int | None
    ssrc: int
    seq_base: int
    ts_base: int
    relay: Reorderer | None = None
    relay_port: IListeningPort | None = None
    relay_addr: tuple[str, int] = ("", 0)  # where the nodes send this session's packets
    relay_timer: IDelayedCall | RelayWake | None = None  # its next release
    bye_timer: IDelayedCall | None = None
    # The client opted in to the Yima extension (x-yima-fanout): relayed packets keep it.
    extension: bool = False
    # The SSRC the nodes stamp on this session's packets: the client's for fan-out;
    # for a relayed session a fresh one per seek, so the relay tells a packet of the
    # new position from one of the old that was still on its way.
    node_ssrc: int = 0
    # Relayed: the sequence number the client sees is gseq + seq_offset (mod 2^16),
    # re-based at each seek so that it goes on by one (RTP-Info names the first).
    seq_offset: int = 0
    # Media position at cluster time started_ct (the last PLAY or resume).
    position: float = 0.0
    started_ct: float = 0.0
    # A PLAY started the nodes (started_ct holds then).
    played: bool = False
    playing: bool = False
    # Node ids in node-index order at PLAY; local sessions serving departed nodes' shares.
    members: tuple[str, ...] = ()
    takeovers: dict[str, str] = attrs.field(factory=dict)
    session: ServerSession | None = None
    total: int = 0
    bye_sent: bool = False
    clock_rate: int = 90000
    # Sender statistics of the relayed stream, for RTCP sender reports.
    packets: int = 0
    octets: int = 0
    last_rtp_ts: int | None = None
    last_sent_at: float = 0.0
    sr_timer: IDelayedCall | None = None
    # Relayed: how far ahead of playout the nodes send (RELAY_LEAD), the media's timing
    # (packet times), the overdue watch, NACKs sent for overdue packets (gseq -> when),
    # when each node index was last heard, and block -> owning node (primary place).
    lead: float = 0.0
    # The overdue watch starts here (a relayed PLAY: once every node has started).
    watch_from: float = 0.0
    # A relayed PLAY's burst: a missing packet is waited for until this instant at
    # least (the nodes' start plus the lead), however due the packets after it are.
    hold_gaps_until: float = 0.0
    paused_ct: float = 0.0
    # Delivery speed of a relayed session (YIMA feedback from a client that opted in).
    speed: float = 1.0
    timing: MediaTiming | None = None
    watch_timer: IDelayedCall | None = None
    watch_last: float | None = None  # reactor time of the watch's last run
    relay_timer_at: float | None = None
    nacked: dict[int, float] = attrs.field(factory=dict)
    heard: dict[int, float] = attrs.field(factory=dict)
    owners: dict[int, str] = attrs.field(factory=dict)
    # Node index of each taken-over share: a new one (past the members'), so the player's
    # per-node gap detection starts afresh and its NACKs and speed changes reach the node
    # that now sends (docs/wire.md).
    takeover_index: dict[str, int] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self.node_ssrc, self.seq_offset = self.ssrc, self.seq_base
