"""Relayed against fan-out CPU per stream at a fixed load (issue 19's relay target).

    cd TREE && flock /tmp/yimaporc-bench.lock env PYTHONPATH=TREE/src \\
        YIMAPORC_BENCH_WORK=/tmp/bench-relay .venv/bin/python bench/relay_ab.py \\
        [--nodes 8] [--sessions 32] [--rounds 2] [--quota 0.1] [--node-flag=--relay-send-ahead-ms=40]
        [--profile]

The scaling part's layout (bench/parts/scaling.py): N bipartite ``yima-node``s, each in
its own CPU group of ``--quota`` cores, the 90 s, 1 Mbit/s-video bench clip, the load
generator's sessions round robin over the nodes' RTSP ports and spread over the clip.
Then, ``--rounds`` times, S fan-out sessions (``x-yima-fanout``: every node sends to the
player) and S relayed ones (a standard player: its RTSP node relays the others' packets),
one after the other on the same cluster, each measured over rtsp_load's window
(``server_cpu_pct`` of every node process, /proc).  The ramp of the scaling part measures
the same ratio at each design's own limit; a fixed S below both limits measures CPU per
stream at the same load, in two minutes.  Prints per trial the nodes' counters (packets
sent, send system calls, relay reads, NACKs: the difference over the trial, from
``/api/status``) and their user and system CPU ticks, then the medians and their ratio.
``--profile``: py-spy samples every node at 1 kHz over every trial and prints the top
frames of all of them together (own and inclusive, idle left out); its sampling costs
CPU, so a profiled run's figures are not the ones to report.
"""

from __future__ import annotations

import argparse
import glob
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from parts import cgroup
from parts.clip import make_clip
from parts.cluster import Cluster, admin_status, require_service
from parts.common import (
    PEERS,
    PORTS,
    PY,
    VENV_BIN,
    WORK,
    Settings,
    parse_result,
    profile_summary,
    run,
    scoped,
)
from parts.scaling import _ingest, _node_flags


def cpu_ticks(pids: list[int]) -> tuple[int, int]:
    """User and system clock ticks of every thread of ``pids``."""
    user = system = 0
    for pid in pids:
        for path in glob.glob(f"/proc/{pid}/task/*/stat"):
            try:
                fields = Path(path).read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            user, system = user + int(fields[11]), system + int(fields[12])
    return user, system


def counters(c: Cluster) -> dict[str, float]:
    """The nodes' streaming counters, summed (``/api/status``)."""
    total: dict[str, float] = {}
    for i in range(c.n):
        st = (admin_status(c.admin(i), c.token) or {}).get("streaming", {})
        flat: dict[str, Any] = {k: st.get(k, 0) for k in ("packets_sent", "engine_ticks",
                                                          "handed_to_relay")}  # fmt: skip
        for group in ("send", "relay", "rtcp"):
            for k, v in (st.get(group) or {}).items():
                flat[f"{group}.{k}"] = v
        for k, v in flat.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
    return total


def _spy(pids: list[int], name: str) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """py-spy (1 kHz, raw stacks, idle left out) on every pid, until :func:`_spied`."""
    out = WORK / "relay-ab-profiles"
    out.mkdir(parents=True, exist_ok=True)
    spies = []
    for pid in pids:
        path = out / f"{name}-{pid}.txt"
        argv = [str(VENV_BIN / "py-spy"), "record", "-p", str(pid), "-r", "1000", "--format",
                "raw", "--nonblocking", "-o", str(path)]  # fmt: skip
        spies.append((subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL), path))  # fmt: skip
    return spies


def _spied(spies: list[tuple[subprocess.Popen[bytes], Path]], name: str) -> None:
    """Stop the spies; print the top frames over all of them (one merged profile)."""
    for p, _ in spies:
        p.send_signal(signal.SIGINT)
    for p, _ in spies:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    if not spies:
        return
    merged = spies[0][1].with_name(f"{name}-all.txt")
    merged.write_text("".join(path.read_text(errors="replace") for _, path in spies
                              if path.exists()))  # fmt: skip
    sm = profile_summary(merged)
    print(f"    profile {name}: {sm['samples']} samples ({merged})")
    for kind in ("top_self", "top_inclusive"):
        for fn, pct in sm[kind]:
            if "twisted/scripts" in fn or "twisted/application" in fn or "(twistd)" in fn:
                continue
            print(f"      {kind[4:]:4s} {pct:5.1f}%  {fn}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--sessions", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quota", type=float, default=0.1)
    ap.add_argument("--node-flag", action="append", default=[],
                    help="an extra yima-node flag, e.g. --node-flag=--relay-send-ahead-ms=40")  # fmt: skip
    ap.add_argument("--profile", action="store_true",
                    help="py-spy every node over every trial (their figures then include it)")  # fmt: skip
    a = ap.parse_args()
    s = Settings(True)
    clip = make_clip(s, s.scaling_clip_video_mbps, s.scaling_clip_seconds)
    flags = [x for f in a.node_flag for x in f.split("=", 1)]
    per: dict[str, list[float]] = {"fanout": [], "relay": []}
    with scoped():
        c = Cluster("yima", a.nodes, WORK / "relay-ab",
                    ["--mode", "bipartite", *_node_flags("yima"), *flags], quota=a.quota)  # fmt: skip
        c.start()
        _ingest(s, c, clip)
        require_service(c, "rtsp", PORTS["rtsp"])
        c.limit()
        for r in range(a.rounds):
            for design in ("fanout", "relay"):
                meter = cgroup.CpuMeter(c.groups)
                t0, n0 = cpu_ticks(c.pids), counters(c)
                argv = [PY, str(PEERS / "rtsp_load.py"), "--sessions", str(a.sessions),
                        "--warmup", "3", "--window", "10", "--spread", "20", "--late-ms", "500",
                        "--teardown-timeout", "10", "--label", design,
                        *(["--fanout"] if design == "fanout" else []),
                        *[x for h in c.hosts for x in ("--url", f"rtsp://{h}:{PORTS['rtsp']}/test")],
                        *[x for p in c.pids for x in ("--server-pid", str(p))]]  # fmt: skip
                spies = _spy(c.pids, f"{design}-{r}") if a.profile else []
                out = run(argv, 240)
                _spied(spies, f"{design}-{r}")
                cores = [row["cores"] for row in meter.stop()]
                t1, n1 = cpu_ticks(c.pids), counters(c)
                kv = parse_result(out.stdout, "rtsp") or {}
                if "server_cpu_pct" not in kv:
                    print(out.stdout[-2000:], out.stderr[-2000:])
                    return 1
                cpu = float(kv["server_cpu_pct"])
                per[design].append(cpu / a.sessions)
                print(f"{design} round {r}: server_cpu_pct {cpu:g}, CPU %/stream "
                      f"{cpu / a.sessions:.3f}, agg_mbps {kv.get('agg_mbps')}, node cores "
                      f"{' '.join(f'{x:.3f}' for x in cores)}, user/sys ticks "
                      f"{t1[0] - t0[0]}/{t1[1] - t0[1]}", flush=True)  # fmt: skip
                print("  counters:", {k: v - n0.get(k, 0) for k, v in n1.items()
                                      if v - n0.get(k, 0)}, flush=True)  # fmt: skip
    f, r_ = statistics.median(per["fanout"]), statistics.median(per["relay"])
    print(f"RESULT relay_ab fanout_cpu_pct_per_stream={f:.3f} relay_cpu_pct_per_stream={r_:.3f} "
          f"ratio={r_ / f:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
