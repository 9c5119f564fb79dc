"""How long the RTSP node takes to find a seek's first packet: the packet walk main used
before (summing every block's packet count per packet) against the time-index bisection.

    python bench/seek_index.py [--old]

A 5-minute 8 Mbit/s file in 256 KiB blocks, seeks to 20 s and 120 s (docs/benchmarks.md).
"""

from __future__ import annotations

import sys
import time

from yimaporc.yima.schedule import PAYLOAD, MediaTiming, NodeScheduler


def walk(m: MediaTiming, t: float) -> int:
    """The former search: packet by packet, the total recomputed for each one."""
    first = 0
    while first < sum(m.packet_count(b) for b in range(m.blocks)) and m.gseq_time(first) < t:
        first += 1
    return first


def main() -> None:
    """Print the time of each search."""
    old = "--old" in sys.argv
    bs = 256 * 1024 // PAYLOAD * PAYLOAD
    size = 300 * 8_000_000 // 8
    blocks = -(-size // bs)
    m = MediaTiming("m", size, bs, tuple(i * 300 / blocks for i in range(blocks)), 300.0)
    for t in (20.0, 120.0):
        t0 = time.perf_counter()
        first = walk(m, t) if old else m.first_gseq_at(t)
        t1 = time.perf_counter()
        NodeScheduler().add("s", m, [b for b in range(blocks) if b % 3 == 0], 0.0, t)
        t2 = time.perf_counter()
        print(f"{'walk' if old else 'bisection'} npt={t:g}-: packet {first} found in "
              f"{t1 - t0:.4f} s; a node's scheduler start {t2 - t1:.4f} s")  # fmt: skip


if __name__ == "__main__":
    main()
