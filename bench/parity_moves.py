#!/usr/bin/env python3
"""Blocks moved and load balance of one scaling step, per parity placement version.

First-fit (version 1, files ingested before sticky placement) against sticky
(version 2, the default), on 20,000 data blocks plus parity, one disk per node
unless stated.  "moved" counts data and parity blocks; "optimum" is k/(N+k)
for an add and the removed disk's share of the blocks for a remove.

    .venv/bin/python bench/parity_moves.py
"""

from __future__ import annotations

from collections import Counter

from yimaporc.yima.parity import FIRST_FIT, STICKY, FilePlacement
from yimaporc.yima.placement import LogicalDisk, ScalingHistory

N_BLOCKS = 20_000


def disk(node: int, k: int = 0) -> LogicalDisk:
    return LogicalDisk(f"n{node}d{k}", f"n{node}", f"n{node}d{k}")


def grid(nodes: int, per_node: int = 1) -> list[LogicalDisk]:
    return [disk(i, k) for i in range(nodes) for k in range(per_node)]


CASES: list[tuple[str, list[LogicalDisk], LogicalDisk | int, int]] = [
    ("3 nodes, add a node", grid(3), disk(3), 2),
    ("3 nodes, add a disk to n0", grid(3), disk(0, 1), 2),
    ("6 nodes, add a node", grid(6), disk(6), 4),
    ("10 nodes, add a node", grid(10), disk(10), 4),
    ("20 nodes, add a node", grid(20), disk(20), 4),
    ("4 nodes x 2 disks, add a disk to n0", grid(4, 2), disk(0, 2), 3),
    ("4 nodes x 2 disks, remove one", grid(4, 2), 0, 3),
    ("6 nodes, remove one", grid(6), 2, 4),
]


def measure(
    h0: ScalingHistory, h1: ScalingHistory, group: int, version: int
) -> tuple[float, float, float, float]:
    fp = FilePlacement(7, N_BLOCKS, group, version)
    a, b = fp.layout(h0), fp.layout(h1)
    before = [h0.disks[d].disk_id for d in (*a.data, *a.parity)]
    after = [h1.disks[d].disk_id for d in (*b.data, *b.parity)]
    moved = sum(x != y for x, y in zip(before, after)) / len(before)
    load = Counter(after)
    mean = len(after) / h1.n_disks
    gone = set(h0.disk_ids) - set(h1.disk_ids)
    share = sum(x in gone for x in before) / len(before)
    return moved, max(load.values()) / mean, min(load.get(i, 0) for i in h1.disk_ids) / mean, share


def main() -> None:
    print("| step | G | optimum | first-fit moved | sticky moved | first-fit max/min load "
          "| sticky max/min load |")  # fmt: skip
    print("|---|--:|--:|--:|--:|--:|--:|")
    for name, initial, change, group in CASES:
        h0 = ScalingHistory(initial)
        if isinstance(change, LogicalDisk):
            h1 = h0.add([change])
            optimum = 1 / h1.n_disks
        else:
            h1 = h0.remove([change])
        v1, v2 = measure(h0, h1, group, FIRST_FIT), measure(h0, h1, group, STICKY)
        if not isinstance(change, LogicalDisk):
            optimum = v2[3]  # the removed disk's blocks
        print(f"| {name} | {group} | {optimum:.3f} | {v1[0]:.3f} | {v2[0]:.3f} "
              f"| {v1[1]:.2f} / {v1[2]:.2f} | {v2[1]:.2f} / {v2[2]:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
