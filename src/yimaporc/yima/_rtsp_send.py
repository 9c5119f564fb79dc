"""The send path of :class:`~.rtspservice.YimaStreamingService`: RTP header
templates per destination, packets built (L16 converted from WAV), datagrams out
through the batched sender.

A mixin of the service (its methods, moved here unchanged), typed against
:class:`~._rtsp_host.StreamingHost`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..rtp import PT_MP2T, RtpHeaderTemplate, l16_payload_type
from .feedback import mark_retransmission
from .media import KIND_WAV, WavFormat, to_l16
from .schedule import Packet
from .streaming import Destination

if TYPE_CHECKING:
    from ._rtsp_host import StreamingHost

__all__ = ["SendMixin"]


class SendMixin:
    """Packets of :class:`~.rtspservice.YimaStreamingService` built and sent."""

    def _template_for(
        self: StreamingHost, session: str, dest: Destination
    ) -> tuple[RtpHeaderTemplate, WavFormat | None, int]:
        key = (dest.ssrc, dest.node_index)
        got = self._templates.get(key)
        if got is None:
            if len(self._templates) >= 1024:  # relayed sessions get a new SSRC per seek
                self._templates.clear()
            s = self.streaming.scheduler.sessions.get(session)
            info = self.storage.media_info(s.media.name) if s is not None else None
            wav = info.wav if info is not None and info.kind == KIND_WAV else None
            pt = PT_MP2T if wav is None else l16_payload_type(wav.sample_rate, wav.channels)
            got = self._templates[key] = (RtpHeaderTemplate(pt, dest.ssrc, dest.node_index), wav,
                                          info.block_size if info is not None else 0)  # fmt: skip
        return got

    def _template(self: StreamingHost, session: str, dest: Destination) -> RtpHeaderTemplate | None:
        """The batched path's header template; None for L16 (converted packet by packet)."""
        tpl, wav, _ = self._template_for(session, dest)
        return tpl if wav is None else None

    def _packetize(self: StreamingHost, pkt: Packet, dest: Destination, payload: bytes) -> bytes:
        tpl, wav, block_size = self._template_for(pkt.session, dest)
        if wav is None:
            ts = dest.ts_base + round(pkt.media_time * dest.clock_rate)
            return tpl.build(dest.seq_base + pkt.gseq, ts, payload, pkt.node_seq)
        # L16: only the data chunk's samples, big-endian; timestamp = first sample frame.
        at = pkt.block * block_size + pkt.offset
        lo = max(at, wav.data_offset)
        hi = min(at + len(payload), wav.data_offset + wav.data_size)
        pcm = payload[lo - at : hi - at] if hi > lo else b""
        ts = dest.ts_base + (max(0, lo - wav.data_offset) // wav.frame_size)
        return tpl.build(dest.seq_base + pkt.gseq, ts & 0xFFFFFFFF, to_l16(pcm, wav.bits, wav.encoding),
                         pkt.node_seq)  # fmt: skip

    def _packetize_marked(
        self: StreamingHost, pkt: Packet, dest: Destination, payload: bytes
    ) -> bytes:
        data = self._packetize(pkt, dest, payload)
        return mark_retransmission(data) if pkt.retransmission else data

    def _send(self: StreamingHost, data: bytes, addr: tuple[str, int]) -> None:
        if self.sender is not None:
            self.sender.send(data, addr)
        elif self.data_port is not None:
            self.data_port.write(data, addr)  # type: ignore[attr-defined]

    def _send_batch(self: StreamingHost, packets: list[bytes], addr: tuple[str, int]) -> None:
        """Several datagrams to one address: one batch when they are equal-size (the
        last may be shorter), else one by one."""
        size = len(packets[0])
        if (
            self.sender is None
            or len(packets) == 1
            or len(packets[-1]) > size
            or any(len(d) != size for d in packets[1:-1])
        ):
            for data in packets:
                self._send(data, addr)
            return
        self.sender.send_segments(b"".join(packets), size, addr)

    def _send_segments(
        self: StreamingHost, buf: memoryview, size: int, addr: tuple[str, int]
    ) -> None:
        if self.sender is not None:
            self.sender.send_segments(buf, size, addr)
        elif self.data_port is not None:  # a test's memory port: one write per datagram
            for at in range(0, len(buf), size):
                self.data_port.write(bytes(buf[at : at + size]), addr)  # type: ignore[attr-defined]

    def _flush(self: StreamingHost) -> None:
        if self.sender is not None:
            self.sender.flush()
