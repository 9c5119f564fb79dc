"""Part ``mail-cluster``: Porcupine deliveries/s with 1, 2, 3 nodes, then replicas 1-3."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from parts.cluster import Cluster, add_users, require_service
from parts.common import PORC_NET, PORTS, WORK, PartFailed, Settings, fmt, say, scoped
from parts.internode import Internode
from parts.loads import mail_load


def cluster_smtp(
    s: Settings, n: int, replicas: int | None, work: Path, log: Path
) -> dict[str, Any]:
    """SMTP load spread over n porcupine nodes; deliveries/s summed, internode bytes counted."""
    c = Cluster("porcupine", n, work)
    c.start()
    require_service(c, "smtp", PORTS["smtp"])
    add_users(c, [f"user{i:03d}" for i in range(1, s.mail_users + 1)], replicas)
    # one generator per node, the same C connections in total, spread evenly
    per = [s.mail_conns // n + (1 if i < s.mail_conns % n else 0) for i in range(n)]
    with Internode(PORC_NET) as net, ThreadPoolExecutor(max_workers=n) as ex:
        t_launch = time.monotonic()
        futs = [
            ex.submit(
                mail_load,
                s,
                "smtp",
                host,
                PORTS["smtp"],
                f"porcupine-{n}n{f'-r{replicas}' if replicas else ''}-{host}",
                c.pids if i == 0 else [],
                None,
                per[i],
                max(1, 2 // n),
                log,
            )
            for i, host in enumerate(c.hosts)
        ]
        rows = [f.result() for f in futs]
        time.sleep(0.3)  # a counter sample after the window's end
        # mail_load's window opens 0.2 s + warm-up after it starts (~0.15 s to start)
        w0 = t_launch + 0.35 + s.mail_warmup
        inter = net.between(w0, w0 + s.mail_duration)
    rate = sum(r["msgs_per_s"] for r in rows)
    cpu = rows[0].get("server_cpu_pct")
    row: dict[str, Any] = {
        "nodes": n,
        "replicas": replicas,
        "msgs_per_s": rate,
        "p50_ms": max(r["p50_ms"] for r in rows),
        "p99_ms": max(r["p99_ms"] for r in rows),
        "server_cpu_pct": cpu,
        "server_cpu_s_per_msg": cpu / 100.0 / rate if cpu and rate else None,
        "per_node": rows,
    }
    if inter is not None and rate:
        b, pk, _own = inter
        row["internode_bytes_per_msg"] = b / s.mail_duration / rate
        row["internode_packets_per_msg"] = pk / s.mail_duration / rate
    else:
        row["internode"] = net.error or "not measured"
    say(
        f"  porcupine {n} node(s){f' replicas {replicas}' if replicas else ''}: "
        f"{rate:.1f} deliveries/s, internode bytes/message "
        f"{fmt(row.get('internode_bytes_per_msg'), row.get('internode'))}"
    )
    return row


def part_mail_cluster(s: Settings, res: dict[str, Any], errors: list[str]) -> None:
    out = res.setdefault("porcupine_cluster", {})
    log = WORK / "mail" / "load.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    for n in s.cluster_nodes:
        try:
            with scoped():
                out[str(n)] = cluster_smtp(s, n, None, WORK / f"porcupine-cluster-{n}", log)
        except PartFailed as e:
            errors.append(f"target porcupine cluster of {n}: {e}")
            out[str(n)] = {"nodes": n, "error": str(e)}
    # Porcupine's replication experiment: 3 nodes, users made with --replicas R
    rep = res.setdefault("porcupine_replicas", {})
    three = out.get("3", {})
    for r in s.replicas:
        if "error" in three:
            rep[str(r)] = {"replicas": r, "error": "the 3-node cluster failed (see above)"}
            continue
        try:
            with scoped():
                rep[str(r)] = cluster_smtp(s, 3, r, WORK / f"porcupine-replicas-{r}", log)
        except PartFailed as e:
            errors.append(f"target porcupine 3 nodes, replicas {r}: {e}")
            rep[str(r)] = {"replicas": r, "error": str(e)}
