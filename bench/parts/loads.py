"""The load generators (bench/peers/) as functions: mail_load.py, rtsp_load.py
(ramp and single trial with internode bytes), and the ffmpeg check."""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import Any

from parts.common import (
    DOMAIN,
    PASSWORD,
    PEERS,
    PY,
    YIMA_NET,
    PartFailed,
    Settings,
    fnum,
    parse_result,
    run,
    say,
)
from parts.internode import Internode


def mail_load(
    s: Settings,
    proto: str,
    host: str,
    port: int,
    label: str,
    server_pids: list[int],
    extra: list[str] | None = None,
    conns: int | None = None,
    procs: int = 2,
    log: Path | None = None,
) -> dict[str, Any]:
    """One mail_load.py run; its RESULT line as numbers (PartFailed if it did not serve)."""
    argv = [
        PY,
        str(PEERS / "mail_load.py"),
        proto,
        "--host",
        host,
        "--port",
        str(port),
        "--conns",
        str(conns or s.mail_conns),
        "--procs",
        str(procs),
        "--duration",
        str(s.mail_duration),
        "--warmup",
        str(s.mail_warmup),
        "--users",
        str(s.mail_users),
        "--fetch",
        str(s.mail_fetch),
        "--domain",
        DOMAIN,
        "--password",
        PASSWORD,
        "--label",
        label,
        "--timeout",
        "10",
        *[a for pid in server_pids for a in ("--server-pid", str(pid))],
        *(extra or []),
    ]
    limit = s.mail_warmup + s.mail_duration + 120
    r = run(argv, limit)
    if log:
        with open(log, "a") as f:
            f.write(" ".join(argv) + "\n" + r.stdout + r.stderr + "\n")
    kv = parse_result(r.stdout, "mail")
    if kv is None:
        raise PartFailed(
            f"{label} {proto}: load generator gave no result: {r.stderr.strip()[-300:]}"
        )
    last_err = ""
    m = re.search(r"last error: (.*)", r.stdout)
    if m:
        last_err = m.group(1)
    out: dict[str, Any] = {k: (fnum(v) if fnum(v) is not None else v) for k, v in kv.items()}
    rate_key = "msgs_per_s" if proto == "smtp" else "sessions_per_s"
    rate = out.get(rate_key) or 0.0
    errors = out.get("errors") or 0.0
    if rate <= 0:
        raise PartFailed(
            f"{label} {proto} on {host}:{port} served nothing ({last_err or 'no error'})"
        )
    done = rate * s.mail_duration
    if errors > max(3.0, 0.01 * done):
        raise PartFailed(
            f"{label} {proto} on {host}:{port}: {int(errors)} failed sessions against "
            f"{int(done)} good ones ({last_err})"
        )
    if proto == "smtp" and "delivered" in kv:
        dv = kv["delivered"].split("/")
        if len(dv) == 2 and int(dv[0]) < int(dv[1]):
            raise PartFailed(
                f"{label} accepted {dv[1]} messages but only {dv[0]} reached the Maildirs"
            )
    cpu = out.get("server_cpu_pct")
    if isinstance(cpu, float):
        per = out.get("msgs_per_s") or rate
        out["server_cpu_s_per_msg"] = cpu / 100.0 / per if per else None
        out["server_cpu_s_per_session"] = cpu / 100.0 / rate
    out["last_error"] = last_err
    say(
        f"  {label:16s} {proto:5s} {rate_key}={rate:.1f} p50_ms={out.get('p50_ms')} "
        f"p99_ms={out.get('p99_ms')} server_cpu_pct={cpu} errors={int(errors)}"
    )
    return out


# figures of a ramp's last passing trial that hold whether or not the ramp found its limit
PER_STREAM_KEYS = (
    "server_cpu_pct",
    "server_cpu_pct_per_stream",
    "datagrams_per_core_s",
    "agg_mbps",
    "gen_cpu_pct",
    "sys_cpu_tick_pct",
)


def per_stream_figures(out: dict[str, Any]) -> dict[str, float]:
    """CPU % per stream and datagrams per core-second of the last passing trial (from
    rtsp_load's RESULT: ``max_sessions``, ``server_cpu_pct`` over its window, ``agg_mbps``).

    Datagrams per core-second (issue 19): the datagrams the clients received in the window
    (payload bytes / 1316, one MPEG-TS RTP payload) over the server's CPU seconds in it
    (/proc, every process of the server)."""
    got: dict[str, float] = {}
    n, cpu, mbps = out.get("max_sessions"), out.get("server_cpu_pct"), out.get("agg_mbps")
    if isinstance(cpu, float) and isinstance(n, float) and n:
        got["server_cpu_pct_per_stream"] = cpu / n
    if isinstance(cpu, float) and cpu > 0 and isinstance(mbps, float):
        got["datagrams_per_core_s"] = mbps * 1e6 / 8 / 1316 / (cpu / 100.0)
    return got


def rtsp_ramp(
    s: Settings,
    url: str,
    label: str,
    server_pids: list[int],
    budget: float,
    start: int,
    log: Path,
    fanout: bool = False,
    resolution: float | None = None,
    max_sessions: int | None = None,
    extra: list[str] | None = None,
) -> dict[str, Any]:
    """``rtsp_load.py --ramp``: the largest N at which at most 0.1 % of the window's packets
    are lost or late at the clients, found by doubling then bisection to the first failing
    N (within ``resolution``). A ramp its time budget cut before that, or that passed at
    the maximum, did not find the limit: PartFailed, never a lower bound."""
    argv = [
        PY,
        str(PEERS / "rtsp_load.py"),
        *(["--fanout"] if fanout else []),
        "--max",
        str(max_sessions or s.rtsp_max),
        "--resolution",
        str(s.rtsp_resolution if resolution is None else resolution),
        "--late-ms",
        str(s.rtsp_late_ms),
        "--max-bad",
        str(s.rtsp_max_bad),
        *(extra or []),
        "--url",
        url,
        "--ramp",
        "--start",
        str(start),
        "--budget",
        str(budget),
        "--warmup",
        str(s.rtsp_warmup),
        "--window",
        str(s.rtsp_window),
        "--label",
        label,
        *[a for pid in server_pids for a in ("--server-pid", str(pid))],
    ]
    r = run(argv, budget + 180)
    with open(log, "a") as f:
        f.write(" ".join(argv) + "\n" + r.stdout + r.stderr + "\n")
    for line in r.stdout.splitlines():
        if line.strip().startswith("trial"):
            say("    " + line.strip())
    kv = parse_result(r.stdout, "rtsp")
    if kv is None:
        raise PartFailed(f"{label}: rtsp_load gave no result: {r.stderr.strip()[-300:]}")
    if fanout:
        for g, n_ok in re.findall(r"fanout=(\d+)/(\d+)", r.stdout):
            if int(g) < int(n_ok):
                raise PartFailed(
                    f"{label}: asked for x-yima-fanout, granted to {g} of {n_ok} sessions"
                )
    out: dict[str, Any] = {k: (fnum(v) if fnum(v) is not None else v) for k, v in kv.items()}
    if not out.get("trials"):
        raise PartFailed(f"{label}: the ramp had no time for a trial (budget {budget:.0f} s)")
    if not out.get("max_sessions"):
        m = re.findall(r"setup errors: \d+, first: (.*)", r.stdout)
        why = m[0][:300] if m else f"no trial passed, the first at N={start}"
        raise PartFailed(f"{label} at {url}: not one session kept real time ({why})")
    n = out["max_sessions"]
    out["first_fail"] = kv.get("first_fail")
    out.update(per_stream_figures(out))
    if kv.get("budget_cut") == "1" or kv.get("capped") == "1":
        # what the last passing trial measured holds (CPU per stream, datagrams per
        # core-second at N streams); its N is not the capacity, so it is not kept as one
        held = {k: out[k] for k in PER_STREAM_KEYS if k in out}
        held["passing_sessions"] = n
        held["first_fail"] = out["first_fail"]
        say(
            f"  {label}: limit not found; at its last passing N={n:.0f}: "
            f"server_cpu_pct={out.get('server_cpu_pct')} "
            f"CPU %/stream={out.get('server_cpu_pct_per_stream') or 0:.3f}"
        )
        if kv.get("budget_cut") == "1":
            raise PartFailed(
                f"{label}: the ramp ran out of its time budget ({budget:.0f} s) with {n:.0f} "
                f"passing and the first failure at {kv.get('first_fail')}: the limit was not "
                "found (a failure of the bench, not a lower bound)",
                held,
            )
        raise PartFailed(
            f"{label}: passed at the ramp's maximum ({n:.0f} sessions): the limit was not found",
            held,
        )
    cpu = out.get("server_cpu_pct")
    say(
        f"  {label}: max_sessions={n:.0f} (first failing {out['first_fail']}) "
        f"agg_mbps={out.get('agg_mbps')} server_cpu_pct={cpu} gen_cpu_pct={out.get('gen_cpu_pct')}"
        f" datagrams/core-s={out.get('datagrams_per_core_s') or 0:.0f}"
    )
    return out


def internode_trial(
    s: Settings,
    url: str,
    label: str,
    pids: list[int],
    work: Path,
    fanout: bool = False,
) -> dict[str, Any]:
    """One stream on a fresh cluster (cold block caches), counting the bytes that cross
    between the nodes: internode bytes per delivered byte (Yima-1's master fetches every
    block it does not hold; Yima-2 sends from where the block is, relaying through the
    RTSP node only for standard clients). Many sessions of one clip would share the
    master's block cache and hide the transfer, hence one."""
    n = 1
    argv = [PY, str(PEERS / "rtsp_load.py"), "--url", url, "--sessions", str(n)]
    argv += ["--fanout"] if fanout else []
    argv += ["--warmup", str(s.rtsp_warmup), "--window", str(s.rtsp_window), "--label", label]
    argv += [a for pid in pids for a in ("--server-pid", str(pid))]
    with Internode(YIMA_NET) as net:
        t_launch = time.monotonic()
        r = run(argv, s.rtsp_warmup + s.rtsp_window + 120)
        time.sleep(0.3)
    with open(work / "load.log", "a") as f:
        f.write(" ".join(argv) + "\n" + r.stdout + r.stderr + "\n")
    kv = parse_result(r.stdout, "rtsp") or {}
    m = re.search(r"setup_s=([\d.]+)", r.stdout)
    agg = fnum(kv.get("agg_mbps"))
    out: dict[str, Any] = {"internode_trial_sessions": n, "internode_trial_pass": kv.get("pass")}
    if m is None or not agg:
        out["internode"] = "trial gave no result"
        return out
    w0 = t_launch + 0.3 + float(m.group(1)) + s.rtsp_warmup
    got = net.between(w0, w0 + s.rtsp_window)
    if got is None:
        out["internode"] = net.error
        return out
    delivered = agg * 1e6 / 8 * s.rtsp_window
    out["internode_bytes_per_delivered_byte"] = got[0] / delivered
    # a node's own packets through its own sockets (the relay's loopback hop)
    out["self_loop_bytes_per_delivered_byte"] = got[2] / delivered
    say(
        f"  {label}: {n} sessions, internode bytes per delivered byte "
        f"{got[0] / delivered:.3f} ({got[0] * 8 / s.rtsp_window / 1e6:.0f} Mbit/s between nodes; "
        f"{got[2] / delivered:.3f} from a node to itself)"
    )
    return out


def ffmpeg_check(url: str, label: str, work: Path) -> dict[str, Any]:
    """A real client: ffmpeg copies 5 s over RTP/UDP; a peer that fails this does not serve."""
    out = work / f"ffcheck-{label}.ts"
    with contextlib.suppress(OSError):
        out.unlink()
    r = run(
        [
            "ffmpeg",
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-rtsp_transport",
            "udp",
            "-i",
            url,
            "-c",
            "copy",
            "-t",
            "5",
            str(out),
        ],
        40,
    )
    size = out.stat().st_size if out.exists() else 0
    if r.returncode != 0 or size < 1_000_000:
        raise PartFailed(
            f"{label}: ffmpeg could not record 5 s from {url} "
            f"(rc={r.returncode}, {size} bytes): {r.stderr.strip()[-200:]}"
        )
    say(f"  {label}: ffmpeg recorded 5 s from {url} ({size} bytes)")
    return {"ffmpeg_bytes": size}
