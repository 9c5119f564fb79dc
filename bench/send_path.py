"""CPU per packet of one node's delivery, in process (issue 19): scheduler, engine,
RTP packing and the send path, S sessions of one clip on a simulated clock, every
datagram really sent over loopback (to a socket nobody reads: the kernel drops them
at the receiver, the sender's cost is the real one).

    PYTHONPATH=src .venv/bin/python bench/send_path.py --path gso        # batched
    PYTHONPATH=src .venv/bin/python bench/send_path.py --packet-by-packet
    # before/after: run with PYTHONPATH=<an export of the old tree>/src --packet-by-packet
    farm-bench --vs "sh -c 'PYTHONPATH=OLD/src exec python bench/send_path.py --packet-by-packet'" \\
        -- sh -c 'PYTHONPATH=src exec python bench/send_path.py'

Prints packets, CPU seconds and packets per CPU-second (and, batched, the send
calls). It measures the code path only: no RTSP, no relay, no disk.
"""

from __future__ import annotations

import argparse
import socket
import time
from typing import Any

from twisted.internet.task import Clock, deferLater

from yimaporc.rtp import PT_MP2T, RtpHeaderTemplate
from yimaporc.yima.schedule import PAYLOAD, MediaTiming
from yimaporc.yima.streaming import StreamingNode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=5.0, help="simulated seconds of streaming")
    ap.add_argument("--path", default="auto", help="auto|gso|sendmmsg|sendto (batched)")
    ap.add_argument("--packet-by-packet", action="store_true", help="emit() per packet")
    ap.add_argument("--send-ahead", type=float, default=0.01)
    ap.add_argument(
        "--share",
        default="0/1",
        help="K/N: serve the blocks b with b %% N == K, one node of an N-node fan-out",
    )
    ap.add_argument("--block-payloads", type=int, default=700, help="RTP payloads per block")
    ap.add_argument(
        "--spread",
        action="store_true",
        help="sessions start at positions spread over the clip (not all at its start)",
    )
    a = ap.parse_args()
    k, n_nodes = (int(x) for x in a.share.split("/"))
    block = a.block_payloads * PAYLOAD  # 700: ~0.92 MB, ~2 s at 3.7 Mbit/s
    duration = 20.0
    blocks = round(duration * 3.7e6 / 8 / block)
    mine = [b for b in range(blocks) if b % n_nodes == k]
    m = MediaTiming("clip", blocks * block, block,
                    tuple(i * duration / blocks for i in range(blocks)), duration)  # fmt: skip
    data = bytes(block)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setblocking(False)
    addr = rx.getsockname()
    clock = Clock()
    templates: dict[int, RtpHeaderTemplate] = {}

    def template(sid: str, d: Any) -> RtpHeaderTemplate:
        t = templates.get(d.ssrc)
        if t is None:
            t = templates[d.ssrc] = RtpHeaderTemplate(PT_MP2T, d.ssrc, d.node_index)
        return t

    def packetize(p: Any, d: Any, payload: bytes) -> bytes:
        ts = d.ts_base + round(p.media_time * d.clock_rate)
        return template(p.session, d).build(d.seq_base + p.gseq, ts, payload, p.node_seq)

    def send(datagram: bytes, to: tuple[str, int]) -> None:
        try:
            tx.sendto(datagram, to)
        except OSError:
            pass

    kw: dict[str, Any] = {}
    sender = None
    if not a.packet_by_packet:
        from yimaporc.yima.sendpath import DatagramSender

        sender = DatagramSender(tx, a.path)
        kw = dict(template=template, send_segments=sender.send_segments, flush=sender.flush,
                  send_ahead=a.send_ahead)  # fmt: skip
    node = StreamingNode(
        clock, clock.seconds, timing=lambda n: m, my_blocks=lambda n: mine,
        read_block=lambda n, b: deferLater(clock, 0.002, lambda: data),
        packetize=packetize, send=send, **kw,
    )  # fmt: skip
    for i in range(a.sessions):
        at = (i * duration / a.sessions) * 0.5 if a.spread else 0.0
        node.start(f"s{i}", "clip", 0.1 + i * 0.0007, at, addr[0], addr[1], 1000 + i, 0, 0, 0,
                   False)  # fmt: skip
    t0 = time.process_time()
    while clock.seconds() < a.seconds:
        clock.advance(0.001)
    cpu = time.process_time() - t0
    n = node.engine.sent
    line = (f"packets={n} cpu_s={cpu:.2f} packets_per_cpu_s={n / cpu:.0f} "
            f"ticks={node.engine.ticks} share={a.share}")  # fmt: skip
    if sender is not None:
        line += f" path={sender.path} send_calls={sender.syscalls}"
    print(line)


if __name__ == "__main__":
    main()
