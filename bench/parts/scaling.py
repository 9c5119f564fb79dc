"""Parts ``scaling-yima`` and ``scaling-mail`` (``scaling`` runs both): scaling measured on
this machine with scaled-down nodes, beside the cost model's prediction.

Every node runs in its own cgroup v1 CPU group with the same quota (``Settings.scaling_quota``
cores, 0.1 by default; bench/parts/cgroup.py), so 1..8 nodes fit on 2 cores without one node
using another's CPU. The quota is lifted while a cluster starts, joins and is loaded with
media or users, and held from the first measured trial on; after each measurement the CPU
each node used (from /proc, over the wall time) is checked against it, and a node over its
quota fails the layout.

Yima: streams sustained (ramp and bisection, a trial failing when more than 0.1 % of the
window's packets are lost or late at the clients) for 1..N nodes in Yima-2 fan-out
(``x-yima-fanout``), Yima-2 relayed (a standard client; the RTSP node relays in order) and
Yima-1 master-slave; one bipartite cluster serves both the fan-out and the relayed ramp. The
clip is the bench's scenes at a lighter rate (``scaling_clip_video_mbps``) so that a tenth of
a core carries several streams.

Porcupine: SMTP deliveries/s for 1..N nodes with users of replicas 1, 2, 3 (one cluster per
N, one user set per replication factor, the load spread over every node's SMTP port), and
POP3 retrievals/s (replicas 1) on the same cluster.

The prediction: bench/model.py with its costs taken from these scaled-down measurements (the
1-node CPU per stream and per message, the extra CPU per message with more nodes and more
replicas, all in CPU seconds), Yima's with each cost divided by the quota (a node of 0.1 core
takes ten times as long per packet), Porcupine's with a whole core per node and its rates
times the quota (dividing its costs would also stretch every call past the simulator's
RPC timeouts).
"""

from __future__ import annotations

import copy
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from parts import cgroup
from parts.clip import clip_info, make_clip
from parts.cluster import Cluster, add_users, cli_missing, require_service
from parts.common import (
    DOMAIN,
    PORTS,
    RESULTS,
    VENV_BIN,
    WORK,
    PartFailed,
    Profiler,
    Settings,
    fmt,
    model_module,
    run,
    say,
    scoped,
)
from parts.loads import mail_load, rtsp_ramp
from parts.mail_target import deliver_for_retrieval

DESIGNS = {  # name: (node --mode, client asks for fan-out)
    "fanout": ("bipartite", True),
    "relay": ("bipartite", False),
    "master-slave": ("master-slave", False),
}
LABELS = {
    "fanout": "Yima-2 fan-out",
    "relay": "Yima-2 relay",
    "master-slave": "Yima-1 master-slave",
}
GEN_LIMIT_PCT = 80.0  # a generator process above this share of a core may be the limit


def _require_cgroups() -> None:
    why = cgroup.available()
    if why is not None:
        raise PartFailed(f"scaled-down nodes need cgroup v1 CPU groups: {why}")
    gone = cgroup.cleanup_stale()
    if gone:
        say(f"  removed stale CPU groups of an earlier run: {', '.join(gone)}")


def _node_flags(kind: str) -> list[str]:
    """One delivery process per scaled-down node where the node has ``--workers``."""
    r = run([str(VENV_BIN / "twistd"), f"{kind}-node", "--help"], 60)
    return ["--workers", "1"] if "--workers" in r.stdout else []


def _quota_rows(c: Cluster, meter: cgroup.CpuMeter, label: str) -> dict[str, Any]:
    """The CPU each node used over the measurement against its quota; PartFailed if over."""
    rows = meter.stop()
    cores = [r["cores"] for r in rows]
    throttled = [r["throttled"] / r["periods"] if r["periods"] else 0.0 for r in rows]
    out = {
        "node_cores": [round(x, 4) for x in cores],
        "node_throttled_share": [round(x, 3) for x in throttled],
        "quota": c.quota,
        "quota_held": all(cgroup.quota_held(r) for r in rows),
    }
    if not out["quota_held"]:
        raise PartFailed(
            f"{label}: a node used more CPU than its quota ({max(cores):.3f} cores of "
            f"{c.quota}): the CPU group did not hold, the figure would not be scaled down"
        )
    return out


# --------------------------------------------------------------------------- Yima
def _ingest(s: Settings, c: Cluster, clip: Path) -> None:
    block = str(s.scaling_block_payloads * 1316)
    argv = ["media", "ingest", str(clip), "--name", "test", "--block-size", block]
    r = c.cli(*argv, "--admin", c.admin(0), timeout=600)
    if r.returncode != 0:
        if cli_missing(r):
            raise PartFailed("yimaporc has no 'media ingest' command yet")
        raise PartFailed(f"yimaporc media ingest: {r.stderr.strip()[-300:]}")


def _yima_ramp(
    s: Settings, c: Cluster, design: str, start: int, budget: float, log: Path
) -> dict[str, Any]:
    n = c.n
    label = f"scaled-{design}-{n}"
    url = f"rtsp://{c.hosts[0]}:{PORTS['rtsp']}/test"
    # sessions start spread over the clip (its blocks, so the nodes), each with time to
    # set up and play its warm-up and window before the clip ends
    spread = max(0.0, s.scaling_clip_seconds - s.rtsp_warmup - s.rtsp_window - 45.0)
    # every ramp starts on one full view (an earlier ramp's overload may have split it)
    waited = c.wait_full_view(60.0)
    meter = cgroup.CpuMeter(c.groups)
    row: dict[str, Any] = {"design": design, "nodes": n, "spread_s": spread,
                           "full_view_wait_s": round(waited, 1)}  # fmt: skip
    row.update(
        rtsp_ramp(
            s,
            url,
            label,
            c.pids,
            budget,
            max(1, start),
            log,
            DESIGNS[design][1],
            resolution=s.scaling_resolution,
            max_sessions=s.scaling_max_streams,
            extra=[
                *("--spread", f"{spread:.1f}", "--growth", str(s.scaling_growth)),
                *("--late-ms", str(s.scaling_late_ms)),
                *("--teardown-timeout", "10", "--quiet-s", "60"),
                # Yima-2: sessions' RTSP nodes round robin over the nodes (as in the
                # model); Yima-1: every client at the one master
                *[
                    a
                    for h in (c.hosts[1:] if design != "master-slave" else [])
                    for a in ("--url", f"rtsp://{h}:{PORTS['rtsp']}/test")
                ],
            ],
        )
    )
    row.update(_quota_rows(c, meter, label))
    gen = row.get("gen_cpu_pct")
    row["generator_limited"] = isinstance(gen, float) and gen > GEN_LIMIT_PCT
    say(
        f"  {label}: {row['max_sessions']:.0f} streams (first failing {row.get('first_fail')}), "
        f"nodes {', '.join(f'{x:.3f}' for x in row['node_cores'])} cores of {c.quota} over the "
        f"ramp, generator {fmt(gen)} % of a core"
        + (" (GENERATOR NEAR A CORE: it may be the limit)" if row["generator_limited"] else "")
    )
    return row


def part_scaling_yima(s: Settings, res: dict[str, Any], errors: list[str]) -> None:
    out = res.setdefault("scaling", {}).setdefault("yima", {})
    out["quota"] = s.scaling_quota
    out["late_ms"] = s.scaling_late_ms
    try:
        _require_cgroups()
        clip = make_clip(s, s.scaling_clip_video_mbps, s.scaling_clip_seconds)
        out["clip"] = clip_info(clip)
        say(f"  scaling clip: {out['clip']}")
        extra = _node_flags("yima")
    except PartFailed as e:
        errors.append(f"scaling yima: {e}")
        out["error"] = str(e)
        return
    log = WORK / "scaling" / "load.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    for d in DESIGNS:
        out.setdefault(d, {})
    t_end = time.monotonic() + s.scaling_yima_total_s

    def wanted(d: str, n: int) -> bool:
        # QUICK: fan-out at every count, relay and master-slave at the first and the last
        if n == 1:
            return d == "fanout"
        return not s.quick or d == "fanout" or n == s.scaling_nodes[-1]

    ramps_left = sum(1 for n in s.scaling_nodes for d in DESIGNS if wanted(d, n))

    def guess(design: str, n: int) -> int:
        one = out["fanout"].get("1", {}).get("max_sessions")
        if not one:
            return s.scaling_start
        if design == "master-slave":
            return int(one)
        prev = [
            (int(k), v["max_sessions"])
            for k, v in out[design].items()
            if isinstance(v, dict) and v.get("max_sessions")
        ]
        # the most this design sustained with fewer nodes; grow from there
        return max(1, int(max(p[1] for p in prev))) if prev else int(one)

    for n in s.scaling_nodes:
        for mode in ("bipartite", "master-slave"):
            if n == 1 and mode == "master-slave":
                continue  # one node: the same server as bipartite (no one to fetch from)
            designs = [d for d in DESIGNS if DESIGNS[d][0] == mode and wanted(d, n)]
            if not designs:
                continue
            key = f"{mode}-{n}"
            try:
                with scoped():
                    c = Cluster(
                        "yima",
                        n,
                        WORK / f"scaling-yima-{key}",
                        ["--mode", mode, *extra],
                        quota=s.scaling_quota,
                    )
                    t0 = time.monotonic()
                    c.start()
                    _ingest(s, c, clip)
                    require_service(c, "rtsp", PORTS["rtsp"])
                    say(f"  yima {key}: started and ingested in {time.monotonic() - t0:.1f} s")
                    c.limit()
                    for d in designs:
                        left = t_end - time.monotonic()
                        budget = max(s.scaling_ramp_min_s, left / max(1, ramps_left))
                        ramps_left -= 1
                        try:
                            out[d][str(n)] = _yima_ramp(s, c, d, guess(d, n), budget, log)
                        except PartFailed as e:
                            errors.append(f"scaling yima {d} {n} node(s): {e}")
                            out[d][str(n)] = {"design": d, "nodes": n, "error": str(e)}
            except PartFailed as e:
                for d in designs:
                    if str(n) in out[d]:
                        continue
                    ramps_left -= 1
                    errors.append(f"scaling yima {d} {n} node(s): {e}")
                    out[d][str(n)] = {"design": d, "nodes": n, "error": str(e)}
    # one node: the three designs are one server
    one = out["fanout"].get("1")
    if one is not None:
        out["relay"]["1"] = out["master-slave"]["1"] = one


# --------------------------------------------------------------------------- Porcupine
def _spread(
    s: Settings, c: Cluster, proto: str, label: str, extra: list[str], log: Path
) -> dict[str, Any]:
    """One generator per node, ``scaling_mail_conns`` connections each; rates summed."""
    port = PORTS[proto]
    with ThreadPoolExecutor(max_workers=c.n) as ex:
        futs = [
            ex.submit(
                mail_load,
                s,
                proto,
                host,
                port,
                f"{label}-{host}",
                c.pids if i == 0 else [],
                # each generator its own users' draw (one seed for all: the N generators
                # would log in as, or deliver to, the same user at the same moment)
                [*extra, "--seed", str(i + 1)],
                s.scaling_mail_conns,
                1,
                log,
            )
            for i, host in enumerate(c.hosts)
        ]
        rows = [f.result() for f in futs]
    key = "msgs_per_s"
    rate = sum(r[key] for r in rows)
    cpu = rows[0].get("server_cpu_pct")
    gens = [r.get("gen_cpu_pct") for r in rows]
    out = {
        key: rate,
        "p99_ms": max(r["p99_ms"] for r in rows),
        "server_cpu_pct": cpu,
        "server_cpu_s_per_msg": cpu / 100.0 / rate if isinstance(cpu, float) and rate else None,
        "gen_cpu_pct": [g for g in gens if isinstance(g, float)],
        "generator_limited": any(isinstance(g, float) and g > GEN_LIMIT_PCT for g in gens),
    }
    if proto != "smtp":
        out["sessions_per_s"] = sum(r["sessions_per_s"] for r in rows)
    return out


def spread_users(owners: list[str], nodes: list[str], users: int) -> tuple[int, list[int]]:
    """F such that the retrieval users pop(F+1)..pop(F+USERS) have their managers (the
    bucket owners in ``owners``) and their homes (rendezvous over ``nodes``, as
    ``MailCluster.home_of``) spread as evenly as the count allows, so no node carries
    more of the retrieval path than its share (pop001..pop010 put 7 of 10 managers on
    one node of 2, 3 on one of 8).  Not a prefix: the bucket hash is CRC-32, affine
    over GF(2), so a different prefix only XORs every bucket with one constant and
    keeps the counts per range; other numbers change them.  The first F from 0 that
    is as even as possible, else the most even of F < 3000; with it, the users per
    node (managers)."""
    from yimaporc.porcupine.softstate import bucket_of as raw_bucket_of
    from yimaporc.porcupine.usermap import bucket_of

    best: tuple[int, int, list[int]] | None = None
    floor = 2 * -(-users // len(nodes))
    for first in range(0, 3000):
        managers = dict.fromkeys(nodes, 0)
        homes = dict.fromkeys(nodes, 0)
        for u in range(first + 1, first + users + 1):
            address = f"pop{u:03d}@{DOMAIN}"
            owner = owners[bucket_of(address)]
            managers[owner] = managers.get(owner, 0) + 1
            home = max(nodes, key=lambda n, a=address: raw_bucket_of(f"{a}|{n}", 1 << 31))
            homes[home] += 1
        score = max(managers.values()) + max(homes.values())
        if best is None or score < best[0]:
            best = (score, first, [managers[n] for n in nodes])
        if score <= floor:
            break
    assert best is not None
    return best[1], best[2]


def _bucket_owners(c: Cluster, nodes: list[str], wait: float = 60.0) -> list[str]:
    """The bucket map as node 1 knows it (``GET /api/buckets``), once every node of
    ``nodes`` manages some buckets (the last join's map installed), or after ``wait`` s."""
    import json
    import urllib.request

    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.urlopen(c.admin(0) + "/api/buckets", timeout=10) as f:
                owners = [str(o) for o in json.load(f)["owners"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PartFailed(f"GET /api/buckets failed: {e!r}") from e
        if set(nodes) <= set(owners) or time.monotonic() > deadline:
            return owners
        time.sleep(0.5)


def part_scaling_mail(s: Settings, res: dict[str, Any], errors: list[str]) -> None:
    out = res.setdefault("scaling", {}).setdefault("porcupine", {})
    out["quota"] = s.scaling_quota
    try:
        _require_cgroups()
    except PartFailed as e:
        errors.append(f"scaling porcupine: {e}")
        out["error"] = str(e)
        return
    log = WORK / "scaling" / "mail-load.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    for r in s.scaling_replicas:
        out.setdefault(str(r), {})
    out.setdefault("retrieval", {})
    users = [f"{i:03d}" for i in range(1, s.mail_users + 1)]
    for n in s.scaling_nodes:
        reps = [r for r in s.scaling_replicas if r <= n]
        try:
            with scoped():
                c = Cluster(
                    "porcupine",
                    n,
                    WORK / f"scaling-porcupine-{n}",
                    quota=s.scaling_quota,
                    extra=["--forward-deliveries"],  # the hand-over (docs/mail.md)
                )
                t0 = time.monotonic()
                c.start()
                require_service(c, "smtp", PORTS["smtp"])
                require_service(c, "pop3", PORTS["pop3"])
                for r in reps:
                    add_users(c, [f"r{r}u{u}" for u in users], r)
                # logins spread over the managers and homes (not pop001..: see spread_users)
                ids = [f"pb{i}" for i in range(1, n + 1)]
                first, per_node = spread_users(_bucket_owners(c, ids), ids, s.mail_users)
                say(f"  porcupine {n}: retrieval users pop{first + 1:03d}.., managers {per_node}")
                out["retrieval_users"] = out.get("retrieval_users", {})
                out["retrieval_users"][str(n)] = {"first": first, "managers": per_node}
                add_users(c, [f"pop{first + int(u):03d}" for u in users])
                deliver_for_retrieval(s, c.hosts, first)
                say(f"  porcupine {n}: started, users made in {time.monotonic() - t0:.1f} s")
                c.limit()
                for r in reps:
                    label = f"scaled-porcupine-{n}n-r{r}"
                    meter = cgroup.CpuMeter(c.groups)
                    try:
                        with Profiler(label, c.pids, out):  # --profile: py-spy on every node
                            row = _spread(s, c, "smtp", label, ["--user-prefix", f"r{r}u"], log)
                        row.update(_quota_rows(c, meter, label))
                    except PartFailed as e:
                        errors.append(f"scaling porcupine {n} node(s) replicas {r}: {e}")
                        out[str(r)][str(n)] = {"nodes": n, "replicas": r, "error": str(e)}
                        continue
                    out[str(r)][str(n)] = row
                    say(
                        f"  {label}: {row['msgs_per_s']:.1f} deliveries/s, nodes "
                        f"{', '.join(f'{x:.3f}' for x in row['node_cores'])} cores of "
                        f"{c.quota}, generators {', '.join(f'{g:.0f}' for g in row['gen_cpu_pct'])} %"
                    )
                label = f"scaled-porcupine-{n}n-pop3"
                meter = cgroup.CpuMeter(c.groups)
                # a POP3 session on a 0.1-core node takes seconds (the login's scrypt
                # alone ~0.5 s): a longer window, so every generator completes several
                pop = copy.copy(s)
                pop.mail_warmup, pop.mail_duration = s.scaling_pop_warmup, s.scaling_pop_window
                try:
                    pop_args = ["--user-suffix", "@" + DOMAIN, "--login-first", str(first)]
                    row = _spread(pop, c, "pop3", label, pop_args, log)
                    row.update(_quota_rows(c, meter, label))
                    out["retrieval"][str(n)] = row
                    say(
                        f"  {label}: {row['msgs_per_s']:.1f} retrievals/s "
                        f"({row['sessions_per_s']:.1f} sessions/s)"
                    )
                except PartFailed as e:
                    errors.append(f"scaling porcupine {n} node(s) retrieval: {e}")
                    out["retrieval"][str(n)] = {"nodes": n, "error": str(e)}
        except PartFailed as e:
            errors.append(f"scaling porcupine {n} node(s): {e}")
            for r in reps:
                out[str(r)][str(n)] = {"nodes": n, "replicas": r, "error": str(e)}


# --------------------------------------------------------------------------- the model
def _num(d: Any, key: str) -> float | None:
    v = d.get(key) if isinstance(d, dict) else None
    return float(v) if isinstance(v, int | float) and v == v and v > 0 else None


def predict(sc: dict[str, Any], quick: bool, s_block: int = 256) -> dict[str, Any]:
    """bench/model.py's capacities for the measured node counts: its costs from the
    scaled-down measurements (CPU seconds), a core per node, times the quota."""
    m = model_module()
    out: dict[str, Any] = {}
    y = sc.get("yima", {})
    if isinstance(y, dict) and y.get("quota"):
        q = float(y["quota"])
        cpu1 = _num(y.get("fanout", {}).get("1"), "server_cpu_pct_per_stream")
        mbps = _num(y.get("clip"), "mbps")
        if cpu1 and mbps:
            fake: dict[str, Any] = {"clip": {"mbps": mbps}, "yima": {}}
            fake["yima"]["bipartite-1"] = {"server_cpu_pct_per_stream": cpu1}
            for k, v in y.get("relay", {}).items():
                fake["yima"][f"bipartite-{k}"] = v
            for k, v in y.get("fanout", {}).items():
                fake["yima"][f"bipartite-fanout-{k}"] = v
            inp = m.inputs(fake, Path("/nonexistent.json"))
            clips = [m.Clip(seed, mbps, 60.0, block_packets=s_block) for seed in range(1, 4)]
            # Yima's model has no timeouts: a node of q cores is costs / q (and exact)
            args = (
                inp["yima_send_s_per_packet"]["value"] / q,
                inp["yima_relay_s_per_packet"]["value"] / q,
                inp["yima_fetch_s_per_byte"]["value"] / q,
                inp["disk_bytes_per_s"]["value"],
            )
            nodes = sorted({int(k) for d in DESIGNS for k in y.get(d, {})})
            seeds = [1, 2] if quick else [1, 2, 3]
            out["yima"] = {
                "nodes": nodes,
                "inputs": {
                    k: inp[k] for k in ("clip_mbps", "yima_cpu_pct_per_stream", "relay_factor")
                },
                **{
                    d: [
                        statistics.mean(
                            m.yima_capacity(d, n, clips, *args, seed=sd) for sd in seeds
                        )
                        for n in nodes
                    ]
                    for d in DESIGNS
                },
            }
    p = sc.get("porcupine", {})
    if isinstance(p, dict) and p.get("quota"):
        q = float(p["quota"])
        r1 = p.get("1", {})
        if _num(r1.get("1"), "server_cpu_s_per_msg"):
            big = max(
                (int(k) for k, v in p.get("3", {}).items() if _num(v, "server_cpu_s_per_msg")),
                default=None,
            )
            fake = {
                "porcupine_cluster": {k: v for k, v in r1.items()},
                "porcupine_replicas": (
                    {
                        str(r): p[str(r)][str(big)]
                        for r in (1, 2, 3)
                        if str(big) in p.get(str(r), {})
                    }
                    if big
                    else {}
                ),
            }
            inp = m.inputs(fake, Path("/nonexistent.json"))
            nodes = sorted({int(k) for r in ("1", "2", "3") for k in p.get(r, {})})
            seeds = [1] if quick else [1, 2]
            window = 1.0 if quick else 2.0
            out["porcupine"] = {
                "nodes": nodes,
                "inputs": {k: inp[k] for k in ("porc_cpu_s_per_msg", "porc_cpu", "porc_copy_s")},
                **{
                    str(r): [
                        q * statistics.mean(m.porcupine_rate(n, r, inp, sd, window) for sd in seeds)
                        if r <= n
                        else None
                        for n in nodes
                    ]
                    for r in (1, 2, 3)
                },
            }
    return out


def part_scaling_model(s: Settings, res: dict[str, Any], errors: list[str]) -> None:
    sc = res.get("scaling")
    if not sc:
        return
    try:
        sc["model"] = predict(sc, s.quick, s.scaling_block_payloads)
    except Exception as e:  # a model bug must not hide the measured figures
        errors.append(f"scaling prediction (cost model): {e!r}")
        sc["model"] = {"error": repr(e)}


# --------------------------------------------------------------------------- report
def _at(d: dict[str, Any], n: int, key: str) -> float | None:
    return _num(d.get(str(n)), key)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(sc: dict[str, Any]) -> list[dict[str, Any]]:
    """The issues' ratios: (name, value, target text, met)."""
    rows = []
    y = sc.get("yima", {})
    if isinstance(y, dict) and "fanout" in y:
        ns = sorted(int(k) for k in y["fanout"])
        top = ns[-1] if ns else 1
        f = _ratio(_at(y["fanout"], top, "max_sessions"), _at(y["fanout"], 1, "max_sessions"))
        rows.append(
            {
                "name": f"Yima-2 fan-out streams at {top} nodes / at 1",
                "value": f,
                "target": ">= 7",
                "met": f is not None and f >= 7,
            }
        )
        ms = _ratio(
            _at(y["master-slave"], top, "max_sessions"), _at(y["master-slave"], 1, "max_sessions")
        )
        rows.append(
            {
                "name": f"Yima-1 master-slave streams at {top} nodes / at 1",
                "value": ms,
                "target": "near 1 (<= 1.5)",
                "met": ms is not None and ms <= 1.5,
            }
        )
        both = [
            n
            for n in ns
            if n > 1
            and _at(y["relay"], n, "server_cpu_pct_per_stream")
            and _at(y["fanout"], n, "server_cpu_pct_per_stream")
        ]
        if both:
            n = both[-1]
            rc = _ratio(
                _at(y["relay"], n, "server_cpu_pct_per_stream"),
                _at(y["fanout"], n, "server_cpu_pct_per_stream"),
            )
            rows.append(
                {
                    "name": f"relayed CPU per stream / fan-out's, {n} nodes",
                    "value": rc,
                    "target": "<= 1.3",
                    "met": rc is not None and rc <= 1.3,
                }
            )
    p = sc.get("porcupine", {})
    if isinstance(p, dict) and "1" in p:
        ns = sorted(int(k) for k in p["1"])
        top = ns[-1] if ns else 1
        for r in ("1", "2", "3"):
            v = _ratio(_at(p.get(r, {}), top, "msgs_per_s"), _at(p["1"], 1, "msgs_per_s"))
            if r == "1" or v is not None:
                rows.append(
                    {
                        "name": f"Porcupine deliveries/s at {top} nodes, replicas {r} / 1 node",
                        "value": v,
                        "target": ">= 6.5" if r == "1" else "(printed)",
                        "met": (v is not None and v >= 6.5) if r == "1" else None,
                    }
                )
        rt = _ratio(
            _at(p.get("retrieval", {}), top, "msgs_per_s"),
            _at(p.get("retrieval", {}), 1, "msgs_per_s"),
        )
        rows.append(
            {
                "name": f"Porcupine retrievals/s at {top} nodes / 1 node",
                "value": rt,
                "target": "(printed)",
                "met": None,
            }
        )
    return rows


def report_lines(sc: dict[str, Any]) -> list[str]:
    lines = []
    model = sc.get("model", {}) if isinstance(sc.get("model"), dict) else {}
    y = sc.get("yima")
    if isinstance(y, dict):
        mbps = _num(y.get("clip"), "mbps")
        lines.append(
            f"== scaling, measured: every node in its own CPU group of {y.get('quota')} core "
            f"(cgroup v1 quota), beside the cost model's prediction (model)"
        )
        if "error" in y:
            lines.append(f"  Yima: FAILED ({y['error']})")
        else:
            late = y.get("late_ms", 500.0)
            lines.append(
                f"  Yima: concurrent {fmt(mbps)} Mbit/s VBR streams with <= 0.1 % of packets late "
                f"(> {late:.0f} ms after their scheduled send time) or lost at the clients"
            )
            lines.append(
                f"    {'nodes':>5} "
                + " ".join(f"{LABELS[d] + ' (model)':>28}" for d in DESIGNS)
                + f" {'node CPU / quota (max)':>23} {'gen CPU %':>9}"
            )
            ym = model.get("yima", {})
            ns = sorted({int(k) for d in DESIGNS for k in y.get(d, {})})
            for n in ns:
                cells = []
                use, gen = [], []
                for d in DESIGNS:
                    row = y[d].get(str(n), {})
                    v = _num(row, "max_sessions")
                    mv = ym[d][ym["nodes"].index(n)] if ym and n in ym.get("nodes", []) else None
                    cell = ("FAILED" if "error" in row else fmt(v)) + f" ({fmt(mv, '-')})"
                    cells.append(f"{cell:>28}")
                    if row.get("node_cores"):
                        use.append(max(row["node_cores"]) / row["quota"])
                    if isinstance(row.get("gen_cpu_pct"), float):
                        gen.append(row["gen_cpu_pct"])
                lines.append(
                    f"    {n:>5} "
                    + " ".join(cells)
                    + f" {fmt(max(use) if use else None, '-'):>23} {fmt(max(gen) if gen else None, '-'):>9}"
                )
    p = sc.get("porcupine")
    if isinstance(p, dict):
        if "error" in p:
            lines.append(f"  Porcupine: FAILED ({p['error']})")
        else:
            lines.append(
                "  Porcupine: SMTP deliveries/s (users of replicas 1, 2, 3 on the same cluster) "
                "and POP3 retrievals/s (messages fetched, replicas 1)"
            )
            lines.append(
                f"    {'nodes':>5} "
                + " ".join(f"{'R=' + r + ' (model)':>18}" for r in ("1", "2", "3"))
                + f" {'retrievals/s':>13} {'node CPU / quota (max)':>23} {'gen CPU % (sum)':>16}"
            )
            pm = model.get("porcupine", {})
            ns = sorted({int(k) for r in ("1", "2", "3") for k in p.get(r, {})})
            for n in ns:
                cells = []
                use, gen = [], []
                for r in ("1", "2", "3"):
                    row = p.get(r, {}).get(str(n))
                    if row is None:
                        cells.append(f"{'-':>18}")
                        continue
                    mv = pm[r][pm["nodes"].index(n)] if pm and n in pm.get("nodes", []) else None
                    cell = (
                        "FAILED" if "error" in row else fmt(_num(row, "msgs_per_s"))
                    ) + f" ({fmt(mv, '-')})"
                    cells.append(f"{cell:>18}")
                    if row.get("node_cores"):
                        use.append(max(row["node_cores"]) / row["quota"])
                    if row.get("gen_cpu_pct"):
                        gen.append(sum(row["gen_cpu_pct"]))
                rt = p.get("retrieval", {}).get(str(n), {})
                lines.append(
                    f"    {n:>5} "
                    + " ".join(cells)
                    + f" {('FAILED' if 'error' in rt else fmt(_num(rt, 'msgs_per_s'), '-')):>13}"
                    + f" {fmt(max(use) if use else None, '-'):>23} {fmt(max(gen) if gen else None, '-'):>16}"
                )
    if "error" in model:
        lines.append(f"  model: FAILED ({model['error']})")
    tg = targets(sc)
    if tg:
        lines.append("  targets (ratios of this run):")
        for t in tg:
            met = "" if t["met"] is None else ("  met" if t["met"] else "  NOT met")
            lines.append(
                f"    {t['name']:55s} {fmt(t['value'], 'n/a'):>8}  target {t['target']}{met}"
            )
    return lines


def plot(sc: dict[str, Any], path: Path) -> None:
    """Streams vs nodes per design and deliveries/s vs nodes per replication factor,
    measured (solid) and the cost model (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8))
    model = sc.get("model", {}) if isinstance(sc.get("model"), dict) else {}
    y = sc.get("yima", {})
    colors = {"fanout": "tab:blue", "relay": "tab:orange", "master-slave": "tab:red"}
    for d in DESIGNS:
        pts = sorted(
            (int(k), _num(v, "max_sessions"))
            for k, v in (y.get(d, {}) if isinstance(y, dict) else {}).items()
            if _num(v, "max_sessions") is not None
        )
        if pts:
            a.plot(
                [x for x, _ in pts],
                [v for _, v in pts],
                "o-",
                color=colors[d],
                label=f"{LABELS[d]} (measured)",
            )
        ym = model.get("yima")
        if ym:
            a.plot(
                ym["nodes"], ym[d], "--", color=colors[d], alpha=0.6, label=f"{LABELS[d]} (model)"
            )
    a.set_xlabel(
        f"nodes (each {y.get('quota') if isinstance(y, dict) else '?'} core, own CPU group)"
    )
    a.set_ylabel("concurrent streams, <= 0.1 % late/lost")
    a.set_title("Yima: streams vs scaled-down nodes")
    a.set_ylim(bottom=0)
    if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=7)
    p = sc.get("porcupine", {})
    pc = {"1": "tab:blue", "2": "tab:green", "3": "tab:purple"}
    for r in ("1", "2", "3"):
        pts = sorted(
            (int(k), _num(v, "msgs_per_s"))
            for k, v in (p.get(r, {}) if isinstance(p, dict) else {}).items()
            if _num(v, "msgs_per_s") is not None
        )
        if pts:
            b.plot(
                [x for x, _ in pts],
                [v for _, v in pts],
                "o-",
                color=pc[r],
                label=f"deliveries/s, replicas {r}",
            )
        pm = model.get("porcupine")
        if pm:
            mp = [(n, v) for n, v in zip(pm["nodes"], pm[r], strict=True) if v is not None]
            b.plot(
                [x for x, _ in mp],
                [v for _, v in mp],
                "--",
                color=pc[r],
                alpha=0.6,
                label=f"model, replicas {r}",
            )
    rt = sorted(
        (int(k), _num(v, "msgs_per_s"))
        for k, v in (p.get("retrieval", {}) if isinstance(p, dict) else {}).items()
        if _num(v, "msgs_per_s") is not None
    )
    if rt:
        b.plot(
            [x for x, _ in rt], [v for _, v in rt], "s:", color="gray", label="POP3 retrievals/s"
        )
    b.set_xlabel(
        f"nodes (each {p.get('quota') if isinstance(p, dict) else '?'} core, own CPU group)"
    )
    b.set_ylabel("per second")
    b.set_title("Porcupine: deliveries vs scaled-down nodes")
    b.set_ylim(bottom=0)
    if b.get_legend_handles_labels()[0]:
        b.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOT = RESULTS / "scaling.png"
