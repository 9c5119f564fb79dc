#!/usr/bin/env python3
"""``make bench``: yimaporc against the servers users would pick instead, in one run.

    .venv/bin/python bench/run.py [--quick] [--only PART,PART] [--keep-work]

Parts (all by default, in this order):

    udp           loopback ceiling: plain sendto and UDP GSO (UDP_SEGMENT) from one Python process
    mail-peers    Postfix + Dovecot (Maildir) and a minimal twisted.mail server
    mail-target   one ``twistd -n porcupine-node`` (SMTP, POP3, IMAP), fresh data dir
    mail-cluster  Porcupine deliveries/s with 1, 2, 3 nodes (load spread over their SMTP ports)
    rtsp-peer     GStreamer's RTSP server on a 4 Mbit/s VBR MPEG-TS clip
    rtsp-target   ``twistd -n yima-node``: bipartite and master-slave with 1, 2, 3 nodes
    model         cost model, SIMULATED: 1-8 nodes with a core and a disk each (bench/model.py)

Every part runs the same load generator (``bench/peers/``) against its servers,
then the run prints a table of yimaporc / peer ratios, writes
``bench/results/results.json`` and PNG plots in ``bench/results/``.  A part that
cannot start or serve its server is recorded with a one-line reason; the run then
exits non-zero (after printing everything that did work) and no ratio is ever
computed against a missing figure.  Everything started here is stopped by PID.
Each part is a module of ``bench/parts/`` (shared helpers in ``parts/common.py``,
the table and plots in ``parts/report.py``); this file only runs them in order.
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from parts import common
from parts.clip import clip_info, make_clip
from parts.common import (
    PEER_HOST,
    PORC_NET,
    PROCS,
    RESULTS,
    ROOT,
    WORK,
    YIMA_NET,
    PartFailed,
    Settings,
    ensure_loopback_alias,
    install,
    run,
    say,
)
from parts.mail_cluster import part_mail_cluster
from parts.mail_peers import part_mail_peers
from parts.mail_target import part_mail_target
from parts.model import part_model
from parts.report import plots, print_table, ratio_rows
from parts.retransmit import part_retransmit
from parts.rtsp_peer import part_rtsp_peer
from parts.rtsp_target import part_rtsp_target
from parts.scaling import part_scaling_mail, part_scaling_model, part_scaling_yima
from parts.udp import part_udp

PARTS = common.PARTS


def git_rev() -> str:
    r = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], 10)
    return r.stdout.strip() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="short settings (make bench QUICK=1)")
    ap.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts of {PARTS} ('scaling' = both scaling parts)",
    )
    ap.add_argument(
        "--scaling-quota",
        type=float,
        help="cores per scaled-down node in the scaling parts (default 0.1)",
    )
    ap.add_argument(
        "--scaling-nodes",
        help="node counts of the scaling parts, e.g. 1,2,4,8 (default 1..8; 1,2,4,8 with --quick)",
    )
    ap.add_argument(
        "--scaling-yima-s",
        type=float,
        help="time budget of the Yima scaling ramps, in seconds (default 540 with --quick, "
        "else 2400): a ramp cut by it is a failed row, so give the 1- and 8-node ramps enough",
    )
    ap.add_argument(
        "--total-s",
        type=float,
        help="time budget of the parts before scaling, in seconds (default 150 with --quick, "
        "else 800): the streaming ramps get what is left of it",
    )
    ap.add_argument(
        "--rtsp-budget",
        type=float,
        help="seconds per streaming ramp (peer and targets; default 25/15 with --quick, "
        "else 90/60)",
    )
    ap.add_argument(
        "--rtsp-max",
        type=int,
        help="largest N a streaming ramp tries (default 256 with --quick, else 512)",
    )
    ap.add_argument(
        "--rtsp-peer-start",
        type=int,
        help="first N of GStreamer's ramp (default 128 with --quick, else 32); give its last "
        "known limit: from a start given here the ramp grows x1.25 per passing trial instead "
        "of x2, then bisects, so it finds the limit in fewer, cheaper trials",
    )
    ap.add_argument(
        "--yima-layouts",
        help="rtsp-target layouts MODE-N, e.g. bipartite-1,bipartite-fanout-1 (default: all)",
    )
    ap.add_argument(
        "--yima-workers",
        help="rtsp-target: run each layout once per --workers value, e.g. 1,2 (default: the "
        "nodes' own default, one worker per core)",
    )
    ap.add_argument(
        "--yima-send-ahead",
        help="rtsp-target: and once per yima-node --send-ahead-ms value, e.g. 10,40 (default: "
        "the nodes' own, 10 ms)",
    )
    ap.add_argument(
        "--mail-workers",
        type=int,
        help="mail-target: run the node with porcupine-node --mail-workers N (default 0: "
        "the main process serves POP3/IMAP)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="sample the yimaporc targets with py-spy under load (top frames in results.json)",
    )
    a = ap.parse_args()
    common.PROFILE = a.profile
    parts = [p.strip() for p in a.only.split(",") if p.strip()]
    parts = [q for p in parts for q in common.ALIASES.get(p, [p])]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        print(f"error: unknown part(s) {bad}; choose from {PARTS}", file=sys.stderr)
        return 2
    s = Settings(a.quick)
    if a.scaling_quota is not None:
        if not 0.01 <= a.scaling_quota <= 1.0:
            print("error: --scaling-quota must be between 0.01 and 1 core", file=sys.stderr)
            return 2
        s.scaling_quota = a.scaling_quota
    if a.scaling_nodes:
        try:
            ns = sorted({int(x) for x in a.scaling_nodes.split(",") if x.strip()})
        except ValueError:
            ns = []
        if not ns or ns[0] != 1 or ns[-1] > 8:
            print("error: --scaling-nodes must list counts from 1 up to at most 8", file=sys.stderr)
            return 2
        s.scaling_nodes = ns
    if a.scaling_yima_s is not None:
        if a.scaling_yima_s < 60:
            print("error: --scaling-yima-s must be at least 60 seconds", file=sys.stderr)
            return 2
        s.scaling_yima_total_s = a.scaling_yima_s
    if a.total_s is not None:
        if a.total_s < 30:
            print("error: --total-s must be at least 30 seconds", file=sys.stderr)
            return 2
        s.total_s = a.total_s
    if a.rtsp_budget is not None:
        if a.rtsp_budget < 10:
            print("error: --rtsp-budget must be at least 10 seconds", file=sys.stderr)
            return 2
        s.rtsp_budget_peer = s.rtsp_budget_target = a.rtsp_budget
    if a.rtsp_max is not None:
        if not 8 <= a.rtsp_max <= 2048:
            print("error: --rtsp-max must be between 8 and 2048", file=sys.stderr)
            return 2
        s.rtsp_max = a.rtsp_max
    if a.rtsp_peer_start is not None:
        if not 1 <= a.rtsp_peer_start <= s.rtsp_max:
            print(
                f"error: --rtsp-peer-start must be between 1 and --rtsp-max ({s.rtsp_max})",
                file=sys.stderr,
            )
            return 2
        s.rtsp_start_peer = a.rtsp_peer_start
        s.rtsp_growth_peer = 1.25
    if a.yima_layouts:
        layouts = []
        for item in a.yima_layouts.split(","):
            mode, _, n = item.strip().rpartition("-")
            if mode not in ("bipartite", "bipartite-fanout", "master-slave") or not n.isdigit():
                print(f"error: --yima-layouts: {item!r} is not MODE-N", file=sys.stderr)
                return 2
            layouts.append((mode, int(n)))
        s.yima_configs = layouts
    if a.mail_workers is not None:
        if not 0 <= a.mail_workers <= 64:
            print("error: --mail-workers must be 0 to 64", file=sys.stderr)
            return 2
        s.mail_workers = a.mail_workers
    if a.yima_workers:
        ws = [w.strip() for w in a.yima_workers.split(",") if w.strip()]
        if not ws or not all(w == "auto" or w.isdigit() for w in ws):
            print("error: --yima-workers must list auto or whole numbers", file=sys.stderr)
            return 2
        s.yima_workers = ws
    if a.yima_send_ahead:
        sas = [x.strip() for x in a.yima_send_ahead.split(",") if x.strip()]
        if not sas or not all(x.isdigit() and int(x) <= 200 for x in sas):
            print("error: --yima-send-ahead must list milliseconds 0..200", file=sys.stderr)
            return 2
        s.yima_send_ahead = sas
    t0 = time.monotonic()

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    if set(parts) - {"model"}:
        install()
    else:
        install(peers=False)  # the model needs no server, only matplotlib
    for h in (PEER_HOST, f"{PORC_NET}.1", f"{YIMA_NET}.1"):
        ensure_loopback_alias(h)
    WORK.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "make bench" + (" QUICK=1" if a.quick else ""),
        "parts": parts,
        "git": git_rev(),
        "machine": {
            "cores": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "loadavg_start": os.getloadavg(),
        },
        "settings": s.as_dict(),
    }
    errors: list[str] = []
    try:
        timings: dict[str, float] = res.setdefault("part_seconds", {})

        def timed(name: str, title: str, fn: Callable[[], None]) -> None:
            if name not in parts:
                return
            say(f"# {title}  [{s.left():.0f} s of the run's time left]")
            t = time.monotonic()
            fn()
            timings[name] = round(time.monotonic() - t, 1)

        def udp() -> None:
            try:
                part_udp(s, res)
            except PartFailed as e:
                errors.append(f"udp ceiling: {e}")

        timed("udp", "udp ceiling", udp)
        timed(
            "mail-peers",
            "mail peers: postfix+dovecot, twisted.mail",
            lambda: part_mail_peers(s, res, errors),
        )
        timed(
            "mail-target", "mail target: porcupine-node", lambda: part_mail_target(s, res, errors)
        )
        timed(
            "mail-cluster",
            "porcupine cluster: 1, 2, 3 nodes, replicas",
            lambda: part_mail_cluster(s, res, errors),
        )
        if {"rtsp-peer", "rtsp-target", "retransmit"} & set(parts):
            clip = make_clip(s)
            res["clip"] = clip_info(clip)
            say(f"# clip: {res['clip']}")
            timed(
                "rtsp-peer",
                "streaming peer: GStreamer RTSP server",
                lambda: part_rtsp_peer(s, res, errors, clip),
            )
            timed(
                "rtsp-target",
                "streaming target: yima-node",
                lambda: part_rtsp_target(s, res, errors, clip),
            )
            timed(
                "retransmit",
                "retransmission: missing at playout vs loss (simulator, then yimaporc play)",
                lambda: part_retransmit(s, res, errors, clip),
            )
        timed(
            "scaling-yima",
            "scaling: Yima streams, 1..N scaled-down nodes (own CPU group each)",
            lambda: part_scaling_yima(s, res, errors),
        )
        timed(
            "scaling-mail",
            "scaling: Porcupine deliveries and retrievals, 1..N scaled-down nodes",
            lambda: part_scaling_mail(s, res, errors),
        )
        if {"scaling-yima", "scaling-mail"} & set(parts):
            part_scaling_model(s, res, errors)
        timed(
            "model",
            "cost model (simulated): 1-8 nodes, one core and one disk each",
            lambda: part_model(s, res, errors),
        )
    except KeyboardInterrupt:
        errors.append("interrupted")
    finally:
        PROCS.stop_all()
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    res["errors"] = errors
    rows = ratio_rows(res)
    res["ratios"] = rows
    print_table(res, rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    try:
        made = plots(res, rows)
        say(f"\nwrote {RESULTS / 'results.json'} and {', '.join(made)} in {RESULTS}")
    except Exception as e:  # plots must not hide the figures above
        errors.append(f"plots: {e!r}")
    say(f"elapsed {res['elapsed_s']:.0f} s")
    if errors:
        print("\nFAILED parts (no ratio is reported against them):", file=sys.stderr)
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
