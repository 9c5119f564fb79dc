#!/usr/bin/env python3
"""Placement computations per second: ``disk_of`` (one block) and ``disks_of`` (batch),
with 0 and 10 scaling operations in the history, and the parity-aware layout
(sticky, the default, and first-fit, placement version 1).

    .venv/bin/python bench/placement_rate.py
"""

from __future__ import annotations

import time

from yimaporc.yima.parity import FIRST_FIT, STICKY, FilePlacement
from yimaporc.yima.placement import LogicalDisk, ScalingHistory, disk_of, disks_of

SEED = 12345


def rates(h: ScalingHistory, label: str, version: int = STICKY) -> None:
    n = 20_000
    t = time.perf_counter()
    for i in range(n):
        disk_of(SEED, i, h)
    single = n / (time.perf_counter() - t)
    n = 500_000
    t = time.perf_counter()
    disks_of(SEED, n, h)
    batch = n / (time.perf_counter() - t)
    fp = FilePlacement(SEED, 100_000, 3, version)
    t = time.perf_counter()
    fp.layout(h)
    layout = 100_000 / (time.perf_counter() - t)
    name = "sticky" if version == STICKY else "first-fit"
    print(f"{label:>7}, {h.n_disks} disks: disk_of {single / 1e3:.0f}k/s, "
          f"disks_of {batch / 1e6:.2f}M/s, {name} parity layout (G=3) {layout / 1e3:.0f}k blocks/s")  # fmt: skip


def main() -> None:
    h = ScalingHistory([LogicalDisk(f"d{i}", f"n{i % 4}") for i in range(8)])
    rates(h, "0 ops")
    rates(h, "0 ops", FIRST_FIT)
    for k in range(5):
        h = h.add([LogicalDisk(f"e{k}", f"n{k % 4}")]).remove([0])
    rates(h, "10 ops")
    rates(h, "10 ops", FIRST_FIT)


if __name__ == "__main__":
    main()
