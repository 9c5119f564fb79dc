"""What the RTSP mixins (``_rtsp_play``, ``_rtsp_relay``, ``_rtsp_rtcp``) expect of the
class they are mixed into: :class:`StreamingHost`, a typing Protocol that
:class:`~.rtspservice.YimaStreamingService` satisfies.

The mixins' methods take ``self: StreamingHost``, so mypy checks each of them against
the members named here, and checks at every call through the service that the
service provides them with these types (a Protocol self-type is how mypy types a
mixin; see its docs, "Mixin classes").  Nothing here runs: it is a type.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from .._reactor import INodeReactor

if TYPE_CHECKING:
    from ..cluster.node import ClusterNode
    from ..rtp import RtpHeaderTemplate
    from ..rtsp import RtspServerFactory
    from ..rtsp._machine import ServerSession
    from ..rtsp._wire import NptRange
    from ..rtsp.interfaces import PlayReply
    from ._relay_clock import RelayClock
    from ._rtsp_plan import _Plan
    from .control import StreamAction
    from .interfaces import IMediaStorage
    from .media import MediaInfo, WavFormat
    from .relay import RelayStats
    from .schedule import MediaTiming, Packet
    from .sendpath import DatagramSender
    from .streaming import Destination, StreamingNode


class StreamingHost(Protocol):
    """The streaming service as its mixins use it: state, collaborators, methods."""

    # --- collaborators and state (set by YimaStreamingService.__init__) ------------
    log: Logger
    node: ClusterNode
    reactor: INodeReactor
    storage: IMediaStorage
    mode: str
    rng: random.Random
    streaming: StreamingNode
    factory: RtspServerFactory
    plans: dict[str, _Plan]
    lost_sessions: int
    suspects: dict[str, float]
    relay_totals: RelayStats
    orphans_stopped: int
    early_handovers: int
    rtsp_port: IListeningPort | None
    rtcp_port: IListeningPort | None
    sender: DatagramSender | None
    data_port: IListeningPort | None
    _templates: dict[tuple[int, int], tuple[RtpHeaderTemplate, WavFormat | None, int]]
    relay_clock: RelayClock
    relay_send_ahead: float
    relay_batch: float
    _ends: dict[str, tuple[MediaInfo, float]]

    # --- the service's own methods ------------------------------------------------
    def _media(self, url: str) -> MediaInfo: ...

    def _send(self, data: bytes, addr: tuple[str, int]) -> None: ...

    def _send_batch(self, packets: list[bytes], addr: tuple[str, int]) -> None: ...

    # --- SendMixin ----------------------------------------------------------------
    def _template_for(
        self, session: str, dest: Destination
    ) -> tuple[RtpHeaderTemplate, WavFormat | None, int]: ...

    def _packetize(self, pkt: Packet, dest: Destination, payload: bytes) -> bytes: ...

    # --- PlayMixin ----------------------------------------------------------------
    def _timing_ready(self, name: str) -> Deferred[MediaTiming]: ...

    def _play(
        self, session: ServerSession, range: NptRange | None, timing: MediaTiming
    ) -> Deferred[PlayReply]: ...

    def _seek(
        self,
        sid: str,
        plan: _Plan,
        info: MediaInfo,
        timing: MediaTiming,
        start_mt: float,
        keyframe: tuple[int, float] | None,
    ) -> Deferred[PlayReply]: ...

    def _play_out_now(self, sid: str, plan: _Plan) -> None: ...

    def _keyframe_start(
        self, info: MediaInfo, timing: MediaTiming, target: float
    ) -> Deferred[tuple[int, float] | None]: ...

    @staticmethod
    def _pcr_time(info: MediaInfo, data: bytes, at: int, default: float) -> float: ...

    def _start_everywhere(
        self, sid: str, plan: _Plan, at: float, start_mt: float
    ) -> list[Deferred[Any]]: ...

    def _play_reply(
        self,
        plan: _Plan,
        info: MediaInfo,
        timing: MediaTiming,
        first: int,
        shown: float | None = None,
    ) -> PlayReply: ...

    def _track_url(self, plan: _Plan) -> str: ...

    def _range_end(self, info: MediaInfo, duration: float | None) -> float | None: ...

    def _control(self, session_id: str, action: StreamAction, at: float) -> Deferred[Any]: ...

    @staticmethod
    def _media_position(plan: _Plan, at: float) -> float: ...

    # --- RelayMixin ---------------------------------------------------------------
    def _open_relay(self, session_id: str, plan: _Plan) -> None: ...

    @staticmethod
    def _destination(plan: _Plan) -> tuple[str, int]: ...

    @staticmethod
    def _relay_due(plan: _Plan, gseq: int) -> float: ...

    @staticmethod
    def _relay_due_upto(plan: _Plan, now: float) -> int: ...

    def _relayed(self, session_id: str, data: bytes) -> None: ...

    def _relayed_read(self, session_id: str, data: bytes) -> None: ...

    def _relayed_run(self, session_id: str, data: bytes, size: int) -> None: ...

    def _heard_lately(self, node_id: str, now: float) -> bool: ...

    def _relayed_many(self, session_id: str, view: memoryview, size: int) -> None: ...

    def _relay_one(self, plan: _Plan, data: bytes, now: float) -> list[bytes]: ...

    def _to_client(self, plan: _Plan, data: bytes) -> bytes: ...

    def _forward_late(self, plan: _Plan, data: bytes, gseq: int) -> None: ...

    def _forward(self, session_id: str, plan: _Plan, packets: list[bytes]) -> None: ...

    def _send_run(self, buf: bytearray, lengths: list[int], addr: tuple[str, int]) -> None: ...

    def _relay_tick(self, session_id: str) -> None: ...

    def _watch(self, session_id: str) -> None: ...

    def _look_again(self, session_id: str) -> None: ...

    def _look(self, session_id: str, plan: _Plan, stalled: bool) -> None: ...

    def _share_lost(self, sid: str, plan: _Plan, node_id: str) -> None: ...

    def _take_over(
        self,
        sid: str,
        plan: _Plan,
        node_id: str,
        early: bool = False,
        from_mt: float | None = None,
    ) -> None: ...

    def _serve_share(
        self,
        sid: str,
        plan: _Plan,
        node_id: str,
        blocks: list[int],
        from_mt: float | None = None,
    ) -> None: ...

    # --- RtcpMixin ----------------------------------------------------------------
    def _nack_owners(self, session: str, plan: _Plan, gseqs: list[int]) -> None: ...

    def _owner(self, plan: _Plan, gseq: int) -> str | None: ...

    def _send_rtcp(self, plan: _Plan, data: bytes) -> None: ...

    def _sender_report(self, plan: _Plan) -> bytes: ...

    def _sr_tick(self, session_id: str) -> None: ...

    def _bye(self, plan: _Plan, reason: bytes = b"end of stream") -> None: ...
