"""How evenly an N-node Yima-2 fan-out spreads its streams over the nodes.

Starts N ``yima-node``s (no CPU quota, in-process delivery), ingests the scaling
bench's clip (``--clip-seconds`` of the bench scenes at 1 Mbit/s video), and plays
one ``rtsp_load.py --fanout`` trial of S sessions per window length in
``--windows`` (all through node 1's RTSP port), the sessions starting spread over
the first ``--spread`` seconds of the clip. For each node it reads its CPU time from
/proc around each trial, minus its idle CPU, and fits CPU = set-up + streaming x
window: the streaming slope is the node's share of the load, the intercept what the
trial's set-up, warm-up and TEARDOWN cost it (node 1 also does every RTSP exchange).

    .venv/bin/python bench/fanout_balance.py --nodes 8 --sessions 100 \\
        --clip-seconds 90 --spread 30
    .venv/bin/python bench/fanout_balance.py --nodes 8 --sessions 100 \\
        --clip-seconds 240 --spread 185

Prints each node's slope and intercept and, over the nodes other than node 1, the
busiest node's slope / the mean: 1.0 is a perfect spread; an N-node cluster held to a
quota per node sustains about N / that ratio times one node's streams.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

from parts.cgroup import proc_ticks
from parts.clip import make_clip
from parts.cluster import Cluster, require_service
from parts.common import PEERS, PORTS, PY, WORK, Settings, scoped
from parts.scaling import _ingest


def cpu_s(pids: list[int]) -> list[float]:
    hz = os.sysconf("SC_CLK_TCK")
    return [(proc_ticks(p) or 0) / hz for p in pids]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--clip-seconds", type=int, default=240)
    ap.add_argument("--spread", type=float, default=185.0)
    ap.add_argument("--windows", default="4,14,4,14", help="window lengths of the trials, s")
    a = ap.parse_args()
    s = Settings(True)
    clip = make_clip(s, s.scaling_clip_video_mbps, a.clip_seconds)
    windows = [float(w) for w in a.windows.split(",")]
    with scoped():
        c = Cluster(
            "yima", a.nodes, WORK / f"balance-{a.nodes}", ["--mode", "bipartite", "--workers", "1"]
        )
        c.start()
        _ingest(s, c, clip)
        require_service(c, "rtsp", PORTS["rtsp"])
        time.sleep(3)
        before, t0 = cpu_s(c.pids), time.monotonic()
        time.sleep(10)
        idle = [
            (b - x) / (time.monotonic() - t0) for x, b in zip(before, cpu_s(c.pids), strict=True)
        ]
        print("idle CPU per node (cores):", " ".join(f"{x:.4f}" for x in idle))
        url = f"rtsp://{c.hosts[0]}:{PORTS['rtsp']}/test"
        used: list[tuple[float, list[float]]] = []
        for w in windows:
            argv = [PY, str(PEERS / "rtsp_load.py"), "--fanout", "--url", url, "--sessions", str(a.sessions),
                    "--warmup", "1", "--window", str(w), "--spread", str(a.spread), "--prio", "nice"]  # fmt: skip
            time.sleep(2)
            before, t0 = cpu_s(c.pids), time.monotonic()
            r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            wall = time.monotonic() - t0
            cpu = [b - x - i * wall for x, b, i in zip(before, cpu_s(c.pids), idle, strict=True)]
            trial = next(
                (ln.strip() for ln in r.stdout.splitlines() if ln.strip().startswith("trial")),
                r.stderr[-300:],
            )
            print(f"window {w:g} s: {trial[:100]}")
            print("  CPU s per node, minus idle:", " ".join(f"{x:.2f}" for x in cpu))
            used.append((w, cpu))
    ws = [w for w, _ in used]
    slopes, cuts = [], []
    for k in range(a.nodes):
        ys = [cpu[k] for _, cpu in used]
        fit = statistics.linear_regression(ws, ys)
        slopes.append(fit.slope)
        cuts.append(fit.intercept)
    print("streaming, cores per node:", " ".join(f"{x:.4f}" for x in slopes))
    print("set-up etc., CPU s per node:", " ".join(f"{x:.2f}" for x in cuts))
    others = slopes[1:] or slopes
    print(
        f"busiest / mean streaming load (nodes 2..N): {max(others) / statistics.mean(others):.2f}"
    )
    print(f"set-up CPU per session on nodes 2..N: {1000 * statistics.mean(cuts[1:] or cuts) / a.sessions:.2f} ms"
          f" (node 1, the RTSP node: {1000 * cuts[0] / a.sessions:.2f} ms)")  # fmt: skip


if __name__ == "__main__":
    main()
