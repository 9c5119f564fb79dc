#!/usr/bin/env python3
"""Cost model of the scaling 2 shared cores cannot show (issue 9): SIMULATED, NOT MEASURED.

    .venv/bin/python bench/model.py [--results JSON] [--quick] [--plot PNG]

Every node gets its own core and its own disk; each operation costs what the
bench measured on this machine (figures from a results JSON, else documented
constants).  Pure Python, no network, no processes; seeded, so it replays.

Yima (the real scheduler and placement, costs added per 1 s bin):
    one clip timing per pool entry (a synthetic 4 Mbit/s VBR clip of 256-payload
    blocks, ``yimaporc.sim.player.vbr_media``) is run through the real
    ``NodeScheduler`` (1 s ticks), which gives each block's packets and bytes per
    second; the real SCADDAR placement (``placement.disks_of``) puts the blocks on
    N nodes.  Sessions are added one by one, each a pool clip at a random
    (cyclic) offset, until some node's core or disk would be busy more than the
    1 s of a bin: the capacity is the number that fitted.  Per packet a node pays
    ``send`` CPU; for the three designs:

    Yima-1 master-slave   one master (node 1, where the clients connect) sends
                          every packet and fetches the (N-1)/N of the bytes the
                          slaves hold; per fetched byte both ends pay ``fetch``
    Yima-2 fan-out        every node sends its own blocks' packets to the client
    Yima-2 relay          a standard client: its RTSP node (sessions round robin
                          over the nodes) also receives and forwards the other
                          nodes' packets, ``relay`` CPU each

Porcupine (the mail cost model ``bench/mailmodel/mailsim.py``: the real TRM
cores, user map, user managers, LoadBalancer on a cores-only network, with a CPU
cost per operation; the shipped nodes' simulation is ``yimaporc.sim.mail``): 16
closed-loop SMTP clients per node, deliveries/s at saturation for replicas
R = 1, 2, 3 (R copies, each a durable write plus an update-log write).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from yimaporc.porcupine.reconstruct import READ_LEASE
from yimaporc.sim.player import vbr_media
from yimaporc.yima.placement import ScalingHistory, disks_of
from yimaporc.yima.schedule import PAYLOAD, MediaTiming, NodeScheduler

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests, parts)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from mailmodel.mailsim import CpuCost, MailConfig, MailSim

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results" / "results.json"
REFERENCE_JSON = HERE / "reference" / "full-run" / "results.json"
TITLE = "cost model (simulated: one core and one disk per node; NOT measured)"

YIMA_NODES = list(range(1, 9))
PORC_NODES = [1, 2, 3, 4, 6, 8]
REPLICAS = [1, 2, 3]
DESIGNS = ["master-slave", "fanout", "relay"]
DESIGN_LABELS = {
    "master-slave": "Yima-1 master-slave",
    "fanout": "Yima-2 fan-out",
    "relay": "Yima-2 relay",
}
BLOCK_PACKETS = 256  # DEFAULT_TS_BLOCK: 256 RTP payloads of 1316 bytes
BIN_S = 1.0  # a node must keep up within each second
CLIENTS_PER_NODE = 16  # the bench's 16 SMTP connections, per node here

# Used when a figure is missing from both this run and the results JSON.
FALLBACKS: dict[str, tuple[float, str]] = {
    "clip_mbps": (4.35, "the bench clip, docs/benchmarks.md"),
    "yima_cpu_pct_per_stream": (6.2, "bipartite x1, full run of 2026-12-03"),
    "relay_factor": (1.5, "assumed: receive + reorder + resend ~ 1.5 sends"),
    "porc_cpu_s_per_msg": (0.0013, "1 node, docs/benchmarks.md profile"),
    "porc_rpc_s": (0.0003, "assumed: one AMP call end on a Twisted reactor"),
    "porc_copy_s": (0.002, "3 nodes, replicas 2-3 vs 1, full run of 2026-12-03"),
}
# Constants the bench JSON does not carry (each from a measured figure in docs/).
# fetch: reorganisation moves blocks over the same RPC at 136-189 MB/s on 2 cores
# with an fsync per block (docs/storage.md): <= 2 core-s per 160 MB, both ends.
FETCH_S_PER_BYTE = 2.0 / 160e6 / 2  # per end
FETCH_SRC = "per end; 2 cores / 160 MB/s block moves, docs/storage.md"
DISK_BPS = 316e6  # durable block writes, ingest (docs/storage.md); reads assumed no slower
DISK_SRC = "durable block writes at ingest, docs/storage.md"
FSYNC_S = 0.0033  # one fsync on this disk (docs/mail.md)
FSYNC_ROUNDS = 3  # a store batch: body fsyncs, directory fsyncs, WAL commit (docs/mail.md)
GROUP = 16  # assumed messages per group commit at saturation (16 in flight per node)
STORE_SHARE = 0.43  # of a message's CPU at the storing node: write_body 25 % + commit 18 %


# --------------------------------------------------------------------------- inputs
def load_results(path: Path | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(name, results) of ``path``, or of bench/results/ and then the reference run."""
    out = []
    for p in [path] if path is not None else [RESULTS_JSON, REFERENCE_JSON]:
        try:
            name = str(p.resolve().relative_to(HERE.parent))
        except ValueError:
            name = str(p)
        try:
            out.append((name, json.loads(p.read_text())))
        except (ValueError, OSError):
            continue
    return out


def _get(d: Any, *path: str) -> float | None:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return float(d) if isinstance(d, int | float) and d == d and d > 0 else None


def _derived(res: dict[str, Any]) -> dict[str, Any]:
    """The figures the model needs, from one results dict (None where missing)."""
    out: dict[str, Any] = {}
    out["clip_mbps"] = _get(res, "clip", "mbps")
    out["yima_cpu_pct_per_stream"] = _get(res, "yima", "bipartite-1", "server_cpu_pct_per_stream")
    # relay: (bipartite - fan-out) CPU per stream at the same N, per relayed packet,
    # relative to the fan-out's CPU per sent packet in the same minutes
    factors = []
    for n in range(2, 9):
        b = _get(res, "yima", f"bipartite-{n}", "server_cpu_pct_per_stream")
        f = _get(res, "yima", f"bipartite-fanout-{n}", "server_cpu_pct_per_stream")
        if b and f:
            factors.append((b - f) / ((n - 1) / n) / f)
    out["relay_factor"] = min(4.0, max(0.25, statistics.median(factors))) if factors else None
    cl = res.get("porcupine_cluster", {}) if isinstance(res, dict) else {}
    out["porc_cpu_s_per_msg"] = _get(cl, "1", "server_cpu_s_per_msg") or _get(
        res, "mail", "porcupine", "smtp", "server_cpu_s_per_msg"
    )
    # extra CPU per message at N nodes: a per-call cost once the simulator says how
    # many calls between nodes a delivery makes at N
    one = out["porc_cpu_s_per_msg"]
    out["porc_extra"] = {
        n: v - one for n in range(2, 9) if one and (v := _get(cl, str(n), "server_cpu_s_per_msg"))
    } or None
    rep = res.get("porcupine_replicas", {}) if isinstance(res, dict) else {}
    r1 = _get(rep, "1", "server_cpu_s_per_msg")
    copies = [
        (v - r1) / (r - 1)
        for r in (2, 3)
        if r1 and (v := _get(rep, str(r), "server_cpu_s_per_msg")) and v > r1
    ]
    out["porc_copy_s"] = statistics.median(copies) if copies else None
    out["udp_pps_per_core"] = _get(res, "udp", "sendto", "tx_pps_per_core")
    return out


def remote_calls_per_delivery(n: int, seed: int = 1) -> float:
    """Calls between two nodes per delivery in the simulator at ``n`` nodes (R = 1)."""
    sim = MailSim(n, seed, MailConfig(users_per_node=50))
    sim.converge()
    before = sum(c["delivery"] for c in sim.calls_by.values())
    d0 = sim.deliveries
    sim.run(2.0, 100.0 * n)
    sim.net.run_until(sim.net.now + 0.5)
    calls = sum(c["delivery"] for c in sim.calls_by.values()) - before
    return calls / max(1, sim.deliveries - d0)


def inputs(run: dict[str, Any] | None = None, path: Path | None = None) -> dict[str, Any]:
    """Every input with its source: this run's figure, else the first results JSON's
    that has it (bench/results/, then the reference run), else a documented constant."""
    sources = [("this run", _derived(run or {}))]
    sources += [(name, _derived(res)) for name, res in load_results(path)]
    got: dict[str, dict[str, Any]] = {}

    def find(key: str) -> tuple[Any, str] | None:
        for src, d in sources:
            if d.get(key) is not None:
                return d[key], src
        return None

    def pick(key: str) -> float:
        hit = find(key)
        if hit is not None:
            got[key] = {"value": hit[0], "source": f"measured, {hit[1]}"}
            return float(hit[0])
        v, why = FALLBACKS[key]
        got[key] = {"value": v, "source": f"constant: {why}"}
        return v

    mbps = pick("clip_mbps")
    cpu_pct = pick("yima_cpu_pct_per_stream")
    relay = pick("relay_factor")
    pkt_rate = mbps * 1e6 / 8 / PAYLOAD
    send = cpu_pct / 100 / pkt_rate
    got["yima_send_s_per_packet"] = {
        "value": send,
        "source": "CPU %/stream / packets per stream-second",
    }
    got["yima_relay_s_per_packet"] = {"value": relay * send, "source": "relay_factor x send"}
    got["yima_fetch_s_per_byte"] = {"value": FETCH_S_PER_BYTE, "source": FETCH_SRC}
    got["disk_bytes_per_s"] = {"value": DISK_BPS, "source": DISK_SRC}
    floor = find("udp_pps_per_core")
    if floor:
        got["udp_sendto_s_per_packet"] = {
            "value": 1 / floor[0],
            "source": f"loopback sendto ceiling, {floor[1]} (for comparison, not used)",
        }
    cpu1 = pick("porc_cpu_s_per_msg")
    # the extra CPU per message of the measured multi-node clusters, per call end
    raw = find("porc_extra")
    rpc = None
    if raw:
        per = []
        for n, extra in raw[0].items():
            ends = 2 * remote_calls_per_delivery(n)
            if extra > 0 and ends > 0:
                per.append(extra / ends)
        if per:
            rpc = statistics.median(per)
            got["porc_rpc_s"] = {
                "value": rpc,
                "source": f"measured, {raw[1]}: (CPU/msg at N - at 1) / call ends per delivery"
                " (sim)",
            }
    if rpc is None:
        rpc = pick("porc_rpc_s")
    copy = pick("porc_copy_s")
    store = STORE_SHARE * cpu1
    # an extra copy costs a call (both ends, remote 2 times in 3 at 3 nodes), a store and
    # the log entry: the log is what the measured copy cost leaves
    log = max(0.0, copy - 2 * rpc * 2 / 3 - store)
    got["porc_cpu"] = {
        "value": {"smtp": cpu1 - store, "rpc": rpc, "store": store, "log": log},
        "source": f"smtp + store = CPU/msg at 1 node (store {STORE_SHARE:.0%}, profile); "
        "log = copy - call - store",
    }
    got["porc_disk_s"] = {
        "value": {
            "store": FSYNC_ROUNDS * FSYNC_S / GROUP,
            "log": FSYNC_S / GROUP,
        },
        "source": f"{FSYNC_ROUNDS} fsync rounds of {FSYNC_S * 1e3:.1f} ms per batch "
        f"(docs/mail.md), a log write 1 round, {GROUP} messages per group commit (assumed)",
    }
    return got


# --------------------------------------------------------------------------- Yima
class Clip:
    """One clip's packets and bytes per block per 1 s bin, from the real scheduler."""

    def __init__(
        self, seed: int, mbps: float, duration: float, block_packets: int = BLOCK_PACKETS
    ) -> None:
        # vbr_media's mean rate is below its nominal one (blocks at low rates last
        # longer): scale the clock so the mean is the bench clip's, for ``duration``
        k = 1.0
        for _ in range(2):
            rng = random.Random(seed)
            m = vbr_media(f"c{seed}", rng, mbps * 1e6, duration / k, block_packets, 0.8, 2.5)
            k = m.size * 8 / m.duration / (mbps * 1e6)
        m = MediaTiming(
            m.name, m.size, m.block_size, tuple(t * k for t in m.block_starts), m.duration * k
        )
        self.media = m
        self.bins = int(m.duration // BIN_S) + 1
        self.blocks: list[dict[int, list[int]]] = [{} for _ in range(m.blocks)]
        sched = NodeScheduler()
        sched.add("s", m, range(m.blocks), start_ct=0.0)
        t = 0
        while sched.next_deadline() is not None:
            t += 1
            for pkt in sched.tick(t * BIN_S):
                cell = self.blocks[pkt.block].setdefault(t - 1, [0, 0])
                cell[0] += 1
                cell[1] += pkt.length

    def per_node(self, n: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
        """(packets, bytes) per node per bin, placed on ``n`` nodes with the file seed ``seed``."""
        owner = disks_of(seed, self.media.blocks, ScalingHistory([f"d{i}" for i in range(n)]))
        pk = [[0] * self.bins for _ in range(n)]
        by = [[0] * self.bins for _ in range(n)]
        for b, cells in enumerate(self.blocks):
            for t, (p, nb) in cells.items():
                pk[owner[b]][t] += p
                by[owner[b]][t] += nb
        return pk, by


def yima_capacity(
    design: str,
    n: int,
    clips: Sequence[Clip],
    send: float,
    relay: float,
    fetch: float,
    disk_bps: float,
    seed: int = 0,
    limit: int = 5000,
) -> int:
    """Streams that fit before some node's core or disk is over 1 s of work in a 1 s bin.

    Session ``i`` plays a file of its own (its own placement seed) with the timing of
    ``clips[i % len]``, from a random offset, looping.
    """
    rng = random.Random(seed * 7919 + n)
    bins = min(c.bins for c in clips)
    cpu = [[0.0] * bins for _ in range(n)]
    disk = [[0.0] * bins for _ in range(n)]
    for i in range(limit):
        pk, by = clips[i % len(clips)].per_node(n, 1000 * seed + i)
        off = rng.randrange(bins)
        rtsp = i % n if design == "relay" else 0
        add_cpu = [[0.0] * bins for _ in range(n)]
        for t in range(bins):
            src = (t + off) % bins
            total_p = sum(pk[k][src] for k in range(n))
            total_b = sum(by[k][src] for k in range(n))
            for k in range(n):
                p, b = pk[k][src], by[k][src]
                disk[k][t] += b / disk_bps
                if design == "master-slave":
                    if k == 0:
                        add_cpu[k][t] += send * total_p + fetch * (total_b - b)
                    else:
                        add_cpu[k][t] += fetch * b
                else:
                    add_cpu[k][t] += send * p
            if design == "relay":
                add_cpu[rtsp][t] += relay * (total_p - pk[rtsp][src])
        over = False
        for k in range(n):
            for t in range(bins):
                cpu[k][t] += add_cpu[k][t]
                if cpu[k][t] > BIN_S or disk[k][t] > BIN_S:
                    over = True
        if over:
            return i
    return limit


def yima_table(
    inp: dict[str, Any], quick: bool, nodes: Sequence[int] = YIMA_NODES
) -> dict[str, Any]:
    """Max concurrent streams per design and node count."""
    mbps = inp["clip_mbps"]["value"]
    pool = 3 if quick else 6
    clips = [Clip(seed, mbps, 30.0 if quick else 60.0) for seed in range(1, pool + 1)]
    args = (
        inp["yima_send_s_per_packet"]["value"],
        inp["yima_relay_s_per_packet"]["value"],
        inp["yima_fetch_s_per_byte"]["value"],
        inp["disk_bytes_per_s"]["value"],
    )
    seeds = [1, 2] if quick else [1, 2, 3]
    out: dict[str, Any] = {
        "nodes": list(nodes),
        "clips": pool,
        "clip_s": clips[0].media.duration,
        "seeds": seeds,
    }
    for design in DESIGNS:
        out[design] = [
            round(statistics.mean(yima_capacity(design, n, clips, *args, seed=s) for s in seeds), 1)
            for n in nodes
        ]
    return out


# --------------------------------------------------------------------------- Porcupine
def porcupine_rate(n: int, replicas: int, inp: dict[str, Any], seed: int, window: float) -> float:
    """Saturation deliveries/s of ``n`` simulated nodes with ``replicas`` copies."""
    c = inp["porc_cpu"]["value"]
    dk = inp["porc_disk_s"]["value"]
    cfg = MailConfig(
        users_per_node=50,
        replicas=replicas,
        spread_limit=max(2, replicas),
        disk_time=dk["store"],
        log_disk_time=dk["log"],
        cpu=CpuCost(smtp=c["smtp"], rpc=c["rpc"], store=c["store"], log=c["log"]),
    )
    sim = MailSim(n, seed, cfg)
    sim.converge()
    # The read lease: for READ_LEASE after a view change, buckets that moved get no
    # UID mark (a reader of the old view may still list); the steady rate is after it.
    sim.net.run_until(sim.net.now + READ_LEASE)
    # Warm-up 1 s: the UID scheme's one-time writes (each bucket's first mark and each
    # (user, node) holder record, on a majority of the nodes) are made before the
    # measured window, which is the steady rate; with 0.3 s they fell into the window
    # and cost more the more nodes there are (3 disk writes each on 4 nodes, 1 on 1).
    return sim.closed_loop(CLIENTS_PER_NODE * n, window, warmup=1.0)


def porcupine_table(
    inp: dict[str, Any], quick: bool, nodes: Sequence[int] = PORC_NODES
) -> dict[str, Any]:
    """Deliveries/s per replication factor and node count (None where R > N)."""
    seeds = [1] if quick else [1, 2]
    window = 1.0 if quick else 2.0
    out: dict[str, Any] = {"nodes": list(nodes), "seeds": seeds, "window_s": window}
    for r in REPLICAS:
        out[str(r)] = [
            statistics.mean(porcupine_rate(n, r, inp, s, window) for s in seeds) if r <= n else None
            for n in nodes
        ]
    return out


# --------------------------------------------------------------------------- report
def run_model(
    run: dict[str, Any] | None = None, quick: bool = False, path: Path | None = None
) -> dict[str, Any]:
    """Inputs, the Yima and Porcupine tables, and how long it took."""
    t0 = time.monotonic()
    inp = inputs(run, path)
    out = {
        "title": TITLE,
        "simulated": True,
        "quick": quick,
        "inputs": inp,
        "yima": yima_table(inp, quick),
        "porcupine": porcupine_table(inp, quick),
    }
    out["elapsed_s"] = round(time.monotonic() - t0, 1)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def report(out: dict[str, Any]) -> list[str]:
    """The printed section."""
    lines = [f"== {out['title']}"]
    lines.append("  inputs:")
    for k, d in out["inputs"].items():
        lines.append(f"    {k} = {_fmt(d['value'])}  ({d['source']})")
    y = out["yima"]
    lines.append(
        f"  Yima: max concurrent {out['inputs']['clip_mbps']['value']:.2f} Mbit/s VBR streams "
        f"(model; real scheduler and placement, {y['clips']} clip timings of {y['clip_s']:.0f} s, "
        f"mean of {len(y['seeds'])} seeds)"
    )
    lines.append(f"    {'nodes':>5} " + " ".join(f"{DESIGN_LABELS[d]:>20}" for d in DESIGNS))
    for i, n in enumerate(y["nodes"]):
        lines.append(f"    {n:>5} " + " ".join(f"{y[d][i]:>20.0f}" for d in DESIGNS))
    p = out["porcupine"]
    lines.append(
        "  Porcupine: deliveries/s at saturation (model; mailsim with a CPU per node, "
        f"{CLIENTS_PER_NODE} clients per node)"
    )
    lines.append(
        f"    {'nodes':>5} "
        + " ".join(f"{'R=' + str(r):>9}" for r in REPLICAS)
        + f" {'R=1 x of 1 node':>16}"
    )
    one = p["1"][0] if p["nodes"][0] == 1 else None
    for i, n in enumerate(p["nodes"]):
        cells = [p[str(r)][i] for r in REPLICAS]
        lines.append(
            f"    {n:>5} "
            + " ".join(f"{'-' if v is None else f'{v:.0f}':>9}" for v in cells)
            + (f" {cells[0] / one:>16.2f}" if one else "")
        )
    lines.append(f"  (model ran {out['elapsed_s']:.1f} s)")
    return lines


def plot(out: dict[str, Any], path: Path) -> None:
    """Streams vs nodes (Yima-1/Yima-2) and deliveries/s vs nodes (R = 1, 2, 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    y = out["yima"]
    for d, style in zip(DESIGNS, ("s--", "D-", "o-"), strict=True):
        a.plot(y["nodes"], y[d], style, label=DESIGN_LABELS[d])
    if y["nodes"][0] == 1:
        line = [n * y["fanout"][0] for n in y["nodes"]]
        a.plot(y["nodes"], line, ":", color="gray", label="N x 1 node")
    a.set_xlabel("nodes (one core, one disk each)")
    a.set_ylabel("concurrent 4 Mbit/s streams")
    a.set_title("Yima: streams vs nodes (cost model, NOT measured)")
    a.set_ylim(bottom=0)
    a.set_xticks(y["nodes"])
    a.legend()
    p = out["porcupine"]
    for r, style in zip(REPLICAS, ("o-", "^-", "v-"), strict=True):
        pts = [(n, v) for n, v in zip(p["nodes"], p[str(r)], strict=True) if v is not None]
        b.plot([x for x, _ in pts], [v for _, v in pts], style, label=f"replicas {r}")
    if p["nodes"][0] == 1:
        line = [n * p["1"][0] for n in p["nodes"]]
        b.plot(p["nodes"], line, ":", color="gray", label="N x 1 node")
    b.set_xlabel("nodes (one core, one disk each)")
    b.set_ylabel("SMTP deliveries / s")
    b.set_title("Porcupine: deliveries vs nodes (cost model, NOT measured)")
    b.set_ylim(bottom=0)
    b.set_xticks(p["nodes"])
    b.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, help="results JSON to take the figures from")
    ap.add_argument("--quick", action="store_true", help="fewer clips and a shorter window")
    ap.add_argument("--plot", type=Path, help="write the PNG here")
    ap.add_argument("--json", action="store_true", help="print the output as JSON instead")
    a = ap.parse_args(argv)
    out = run_model(None, a.quick, a.results)
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print("\n".join(report(out)))
    if a.plot:
        plot(out, a.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
