"""The ratio table, the paper-experiment lines and the PNG plots."""

from __future__ import annotations

from typing import Any

from parts import scaling
from parts.common import RESULTS, fmt, model_module, say


# --------------------------------------------------------------------------- report
def val(d: dict[str, Any] | None, *path: str) -> float | None:
    cur: Any = d
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return cur if isinstance(cur, int | float) and cur == cur else None


def why(d: dict[str, Any] | None) -> str:
    if isinstance(d, dict) and "error" in d:
        return "FAILED"
    return "n/a"


def ratio_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """(metric, yimaporc, peer, ratio) rows; a ratio only where both sides were measured."""
    rows: list[dict[str, Any]] = []
    mail = res.get("mail", {})
    target = mail.get("porcupine")
    specs = [
        ("smtp", "msgs_per_s", "SMTP messages/s", True),
        ("smtp", "p50_ms", "SMTP p50 latency ms", False),
        ("smtp", "p99_ms", "SMTP p99 latency ms", False),
        ("smtp", "server_cpu_s_per_msg", "SMTP server CPU s/message", False),
        ("pop3", "sessions_per_s", "POP3 sessions/s", True),
        ("pop3", "msgs_per_s", "POP3 messages/s", True),
        ("pop3", "p99_ms", "POP3 p99 session ms", False),
        ("pop3", "server_cpu_s_per_msg", "POP3 server CPU s/message", False),
        ("imap", "sessions_per_s", "IMAP sessions/s", True),
        ("imap", "msgs_per_s", "IMAP messages/s", True),
        ("imap", "p99_ms", "IMAP p99 session ms", False),
        ("imap", "server_cpu_s_per_msg", "IMAP server CPU s/message", False),
    ]
    for peer in ("postfix+dovecot", "twisted.mail"):
        pd = mail.get(peer)
        for proto, key, label, higher in specs:
            pv = val(pd, proto, key)
            tv = val(target, proto, key)
            if pv is None and proto not in (pd or {}) and "error" not in (pd or {}):
                continue  # this peer does not speak the protocol (twisted.mail: no IMAP)
            rows.append(
                {
                    "group": "mail",
                    "metric": label,
                    "peer": peer,
                    "yimaporc": tv,
                    "peer_value": pv,
                    "ratio": tv / pv if tv is not None and pv else None,
                    "higher_is_better": higher,
                    "yimaporc_note": None if tv is not None else why(target),
                    "peer_note": None if pv is not None else why(pd),
                }
            )
    cl = res.get("porcupine_cluster", {})
    pf = val(mail.get("postfix+dovecot"), "smtp", "msgs_per_s")
    for n in ("1", "2", "3"):
        tv = val(cl.get(n), "msgs_per_s")
        if n in cl:
            rows.append(
                {
                    "group": "mail",
                    "metric": f"Porcupine {n} node(s) deliveries/s",
                    "peer": "postfix+dovecot",
                    "yimaporc": tv,
                    "peer_value": pf,
                    "ratio": tv / pf if tv is not None and pf else None,
                    "higher_is_better": True,
                    "yimaporc_note": None if tv is not None else why(cl.get(n)),
                    "peer_note": None if pf is not None else why(mail.get("postfix+dovecot")),
                }
            )
    gst = res.get("rtsp", {}).get("gstreamer")
    yima = res.get("yima", {})
    for key, y in sorted(yima.items()):
        for metric, label, higher in (
            ("max_sessions", "max streams", True),
            ("server_cpu_pct_per_stream", "CPU %/stream", False),
        ):
            mode, _, n = key.rpartition("-")
            # CPU per stream: single-node layouts (bipartite-1, and per --yima-workers run)
            if metric == "server_cpu_pct_per_stream" and n != "1":
                continue
            tv = val(y, metric)
            pv = val(gst, metric)
            # CPU per stream at the last passing trial holds even where that ramp did not
            # find its limit (then its N is not a capacity and no streams ratio is made)
            unfound = [
                side
                for side, d in (("yimaporc", y), ("gstreamer", gst))
                if metric == "server_cpu_pct_per_stream" and val(d, "passing_sessions")
            ]
            rows.append(
                {
                    "group": "streaming",
                    "metric": f"Yima {mode} x{n}: {label}",
                    "peer": "gstreamer",
                    "yimaporc": tv,
                    "peer_value": pv,
                    "ratio": tv / pv if tv is not None and pv else None,
                    "higher_is_better": higher,
                    "yimaporc_note": None if tv is not None else why(y),
                    "peer_note": None if pv is not None else why(gst),
                    **(
                        {
                            "note": "at the last passing N of "
                            + " and ".join(unfound)
                            + " (limit not found)"
                        }
                        if unfound and tv is not None and pv
                        else {}
                    ),
                }
            )
    return rows


def single_node_targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 19's one-node targets, per one-node yima layout of this run: streams and CPU %
    per stream against GStreamer's, datagrams per core-second against the udp part's GSO
    figure (name, value, target text, met); a ratio only where both sides were measured."""
    gst = res.get("rtsp", {}).get("gstreamer")
    gso = val(res.get("udp"), "gso", "tx_pps_per_core")
    rows: list[dict[str, Any]] = []
    for key, y in sorted(res.get("yima", {}).items()):
        if not key.endswith("-1"):
            continue
        name = key[:-2]
        streams = _ratio(val(y, "max_sessions"), val(gst, "max_sessions"))
        cpu = _ratio(val(y, "server_cpu_pct_per_stream"), val(gst, "server_cpu_pct_per_stream"))
        dpc = _ratio(val(y, "datagrams_per_core_s"), gso)
        rows += [
            {
                "name": f"{name}: streams / GStreamer's",
                "value": streams,
                "target": ">= 2.0",
                "met": streams is not None and streams >= 2.0,
            },
            {
                "name": f"{name}: CPU %/stream / GStreamer's",
                "value": cpu,
                "target": "<= 0.5",
                "met": cpu is not None and cpu <= 0.5,
            },
            {
                "name": f"{name}: datagrams per core-s / udp gso's",
                "value": dpc,
                "target": ">= 0.5",
                "met": dpc is not None and dpc >= 0.5,
            },
        ]
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def print_table(res: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    say("")
    say("== yimaporc / peer ratios (same machine, same run, same load generator)")
    say("   ratio > 1 is better where 'better' says higher, < 1 where it says lower")
    head = f"{'metric':48s} {'peer':16s} {'yimaporc':>10s} {'peer':>10s} {'ratio':>7s}  better"
    say(head)
    say("-" * len(head))
    for r in rows:
        say(
            f"{r['metric']:48s} {r['peer']:16s} {fmt(r['yimaporc'], r['yimaporc_note']):>10s} "
            f"{fmt(r['peer_value'], r['peer_note']):>10s} "
            f"{fmt(r['ratio'], '-'):>7s}  {'higher' if r['higher_is_better'] else 'lower'}"
            + (f"  ({r['note']})" if r.get("note") else "")
        )
    cl = res.get("porcupine_cluster", {})
    rep = res.get("porcupine_replicas", {})
    yima = res.get("yima", {})
    if cl or rep or yima or res.get("retransmit"):
        say("")
        say("== paper experiments (yimaporc alone; all nodes share this machine's 2 cores)")
    one = val(cl.get("1"), "msgs_per_s")
    for k, d in sorted(cl.items()):
        v = val(d, "msgs_per_s")
        say(
            f"  Porcupine {k} node(s): deliveries/s {fmt(v, why(d))}"
            + (f"  x{v / one:.2f} of 1 node" if v is not None and one else "")
            + f"  internode bytes/message {fmt(val(d, 'internode_bytes_per_msg'), '-')}"
        )
    for k, d in sorted(rep.items()):
        say(
            f"  Porcupine 3 nodes, replicas {k}: deliveries/s {fmt(val(d, 'msgs_per_s'), why(d))}"
            f"  internode bytes/message {fmt(val(d, 'internode_bytes_per_msg'), '-')}"
        )
    for k, d in yima.items():
        mx = val(d, "max_sessions")
        say(
            f"  Yima {k}: max streams {fmt(mx, why(d))}  internode bytes per delivered "
            f"byte {fmt(val(d, 'internode_bytes_per_delivered_byte'), '-')}"
        )
    rt = res.get("retransmit", {})
    for src in ("simulator", "player"):
        pts = rt.get(src)
        if isinstance(pts, list):
            say(f"  retransmission ({src}): drop -> missing at playout without / with")
            for p in pts:
                say(
                    f"    {p['drop']:6.2%} -> {p['missing_without']:7.3%} / {p['missing_with']:7.3%}"
                )
        elif isinstance(pts, dict):
            say(f"  retransmission ({src}): FAILED")
    u = res.get("udp", {})
    if u:
        say("")
        say("== loopback ceiling, one Python sender process, 1316-byte datagrams")
        for k in ("sendto", "gso"):
            if k in u:
                d = u[k]
                say(
                    f"  {k:7s} {d['tx_pps']:>10.0f} pkt/s  {d['tx_mbps']:>7.0f} Mbit/s  "
                    f"= {d['tx_mbps'] / 4.0:.0f} x 4 Mbit/s streams (sender CPU {d['tx_cpu_pct']:.0f}%,"
                    f" {d.get('tx_pps_per_core', 0) / 1e3:.0f}k pkt/s per core-second)"
                )
        if "sendto" in u and "gso" in u:
            say(f"  gso / sendto = {u['gso']['tx_pps'] / u['sendto']['tx_pps']:.2f}")
        for key, y in sorted(res.get("yima", {}).items()):
            dpc, gso = val(y, "datagrams_per_core_s"), u.get("gso", {}).get("tx_pps_per_core")
            if dpc is not None and gso:
                say(
                    f"  yima {key}: {dpc / 1e3:.0f}k datagrams per core-second = {dpc / gso:.2f} x gso"
                )
    tg = single_node_targets(res)
    if tg:
        say("")
        say("== issue 19, one node: targets (ratios of this run)")
        for t in tg:
            met = "met" if t["met"] else "NOT met"
            say(f"  {t['name']:58s} {fmt(t['value'], 'n/a'):>8}  target {t['target']}  {met}")
    sc = res.get("scaling")
    if isinstance(sc, dict) and sc:
        say("")
        for line in scaling.report_lines(sc):
            say(line)
    m = res.get("model")
    if isinstance(m, dict) and "yima" in m:
        say("")
        for line in model_module().report(m):
            say(line)
    elif isinstance(m, dict):
        say("")
        say("== cost model (simulated): FAILED")


def plots(res: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    RESULTS.mkdir(parents=True, exist_ok=True)

    # 1. mail rates per server
    mail = res.get("mail", {})
    servers = [k for k in ("porcupine", "postfix+dovecot", "twisted.mail") if k in mail]
    if servers:
        tests = [("smtp", "msgs_per_s", "SMTP msg/s"), ("pop3", "sessions_per_s", "POP3 sess/s")]
        tests.append(("imap", "sessions_per_s", "IMAP sess/s"))
        fig, ax = plt.subplots(figsize=(8, 4.5))
        width = 0.8 / len(servers)
        for i, srv in enumerate(servers):
            ys = [val(mail[srv], p, k) or 0.0 for p, k, _ in tests]
            xs = [j + i * width for j in range(len(tests))]
            bars = ax.bar(xs, ys, width, label=srv + (" (FAILED)" if "error" in mail[srv] else ""))
            for b, y in zip(bars, ys, strict=False):
                if y:
                    ax.annotate(
                        f"{y:.0f}",
                        (b.get_x() + b.get_width() / 2, y),
                        ha="center",
                        va="bottom",
                        fontsize=8,
                    )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tests))], [t[2] for t in tests])
        ax.set_ylabel("per second")
        ax.set_title("Mail: same load, same machine (16 connections, 4-8 KB messages)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "mail_rates.png", dpi=110)
        plt.close(fig)
        made.append("mail_rates.png")

    # 2. Porcupine deliveries/s vs nodes (Porcupine paper, throughput vs cluster size)
    cl = res.get("porcupine_cluster", {})
    if cl:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ns = sorted(int(k) for k in cl)
        ys = [val(cl[str(n)], "msgs_per_s") for n in ns]
        pts = [(n, y) for n, y in zip(ns, ys, strict=False) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="Porcupine (yimaporc)")
        else:
            ax.text(
                0.5,
                0.5,
                "porcupine target FAILED\n(see results.json)",
                ha="center",
                transform=ax.transAxes,
            )
        pf = val(mail.get("postfix+dovecot"), "smtp", "msgs_per_s")
        if pf:
            ax.axhline(pf, color="gray", ls="--", label="Postfix, 1 host")
        tw = val(mail.get("twisted.mail"), "smtp", "msgs_per_s")
        if tw:
            ax.axhline(tw, color="gray", ls=":", label="twisted.mail, 1 process")
        rep = res.get("porcupine_replicas", {})
        rpts = [
            (int(k), val(d, "msgs_per_s"))
            for k, d in sorted(rep.items())
            if val(d, "msgs_per_s") is not None
        ]
        for r, y in rpts:
            ax.plot([3], [y], "^", label=f"3 nodes, replicas {r}")
        ax.set_xlabel("nodes (processes on one 2-core machine)")
        ax.set_ylabel("SMTP deliveries / s")
        ax.set_xticks([1, 2, 3])
        ax.set_ylim(bottom=0)
        ax.set_title("Porcupine deliveries vs cluster size")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "porcupine_nodes.png", dpi=110)
        plt.close(fig)
        made.append("porcupine_nodes.png")

    # 3. Yima streams vs nodes, bipartite vs master-slave (Yima paper's Fig. shape)
    yima = res.get("yima", {})
    gst = val(res.get("rtsp", {}).get("gstreamer"), "max_sessions")
    if yima or gst:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        anything = False
        for mode, style in (
            ("bipartite", "o-"),
            ("bipartite-fanout", "D-"),
            ("master-slave", "s--"),
        ):
            pts = []
            for y in yima.values():
                same = y.get("mode") == mode or (
                    y.get("mode") == "bipartite" and y.get("nodes") == 1
                )
                if same and val(y, "max_sessions") is not None:
                    pts.append((y["nodes"], val(y, "max_sessions")))
            pts.sort()
            if pts:
                anything = True
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"Yima {mode}")
        if not anything:
            ax.text(
                0.5,
                0.6,
                "yima target FAILED\n(see results.json)",
                ha="center",
                transform=ax.transAxes,
            )
        if gst:
            ax.axhline(gst, color="gray", ls="--", label="GStreamer RTSP, 1 process")
        u = res.get("udp", {})
        ax.set_xlabel("nodes (processes on one 2-core machine)")
        ax.set_ylabel("concurrent 4 Mbit/s streams, <= 0.1% late/lost")
        ax.set_xticks([1, 2, 3])
        ax.set_ylim(bottom=0)
        title = "Streams sustained vs nodes"
        if "sendto" in u:
            title += f"\n(loopback sendto ceiling = {u['sendto']['tx_mbps'] / 4:.0f} streams)"
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "yima_nodes.png", dpi=110)
        plt.close(fig)
        made.append("yima_nodes.png")

    # 3b. retransmission (Yima paper's missing-at-playout vs loss figure)
    rt = res.get("retransmit", {})
    if rt:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for src, style in (("simulator", "--"), ("player", "-")):
            pts = rt.get(src)
            if not isinstance(pts, list) or not pts:
                continue
            xs = [100 * p["drop"] for p in pts]
            ax.plot(
                xs,
                [100 * p["missing_without"] for p in pts],
                "s" + style,
                label=f"{src}: no retransmission",
            )
            ax.plot(
                xs,
                [100 * p["missing_with"] for p in pts],
                "o" + style,
                label=f"{src}: with retransmission",
            )
        if isinstance(rt.get("player"), dict):
            ax.text(
                0.02,
                0.95,
                "real player FAILED (see results.json)",
                transform=ax.transAxes,
                fontsize=8,
                va="top",
            )
        ax.set_xlabel("packets dropped at the client (%)")
        ax.set_ylabel("packets missing at playout (%)")
        ax.set_title("Selective retransmission, 3 nodes, bipartite")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / "retransmit.png", dpi=110)
        plt.close(fig)
        made.append("retransmit.png")

    # 4. all ratios
    rr = [r for r in rows if r["ratio"] is not None]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.35 * max(1, len(rr)) + 1.2)))
    if rr:
        labels = [f"{r['metric']} / {r['peer']}" for r in rr]
        vals = [r["ratio"] for r in rr]
        colors = [
            "tab:green" if (v >= 1) == r["higher_is_better"] else "tab:red"
            for v, r in zip(vals, rr, strict=False)
        ]
        # bars grow from 1 (parity): left for < 1, right for > 1
        ax.barh(range(len(rr)), [v - 1.0 for v in vals], left=1.0, color=colors)
        ax.set_yticks(range(len(rr)), labels, fontsize=8)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xscale("log")
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.2g}", (v, i), va="center", fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("yimaporc / peer, log scale (green = yimaporc better)")
    else:
        ax.text(
            0.5,
            0.5,
            "no ratio: every yimaporc target failed (see results.json)",
            ha="center",
            transform=ax.transAxes,
        )
        ax.set_axis_off()
    ax.set_title("yimaporc / peer")
    fig.tight_layout()
    fig.savefig(RESULTS / "ratios.png", dpi=110)
    plt.close(fig)
    made.append("ratios.png")

    # 4b. the cost model's scaling (simulated, not measured)
    m = res.get("model")
    if isinstance(m, dict) and "yima" in m:
        model_module().plot(m, RESULTS / "model_scaling.png")
        made.append("model_scaling.png")

    # 4c. scaling measured with scaled-down nodes, beside the model
    sc = res.get("scaling")
    if isinstance(sc, dict) and sc:
        scaling.plot(sc, scaling.PLOT)
        made.append(scaling.PLOT.name)

    # 5. UDP ceiling
    u = res.get("udp", {})
    if u:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ks = [k for k in ("sendto", "gso") if k in u]
        ax.bar(ks, [u[k]["tx_mbps"] for k in ks], color="tab:blue")
        ax.set_ylabel("Mbit/s sent (1316-byte datagrams)")
        ax.set_title("Loopback ceiling, one Python process")
        fig.tight_layout()
        fig.savefig(RESULTS / "udp_ceiling.png", dpi=110)
        plt.close(fig)
        made.append("udp_ceiling.png")
    return made
