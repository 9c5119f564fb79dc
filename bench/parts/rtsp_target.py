"""Part ``rtsp-target``: yima-node layouts (bipartite, fan-out, master-slave)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from parts.cluster import Cluster, cli_missing, require_service
from parts.common import PORTS, WORK, PartFailed, Profiler, Settings, say, scoped
from parts.loads import ffmpeg_check, internode_trial, rtsp_ramp


def part_rtsp_target(s: Settings, res: dict[str, Any], errors: list[str], clip: Path) -> None:
    out = res.setdefault("yima", {})
    work = WORK / "rtsp"
    work.mkdir(parents=True, exist_ok=True)
    first_error = None
    runs = [
        (mode, n, w, sa)
        for mode, n in s.yima_configs
        for w in (s.yima_workers or [None])
        for sa in (s.yima_send_ahead or [None])
    ]
    for mode, n, workers, ahead in runs:
        key = (
            mode
            + ("" if workers is None else f"-w{workers}")
            + ("" if ahead is None else f"-sa{ahead}")
            + f"-{n}"
        )
        if first_error is not None:
            # the same reason holds for every layout: say it once, do not wait for it again
            out[key] = {"mode": mode, "nodes": n, "error": first_error}
            continue
        try:
            with scoped():
                fanout = mode == "bipartite-fanout"
                node_mode = "bipartite" if fanout else mode
                flags = ["--mode", node_mode]
                if workers is not None:
                    flags += ["--workers", workers]
                if ahead is not None:
                    flags += ["--send-ahead-ms", ahead]
                c = Cluster("yima", n, WORK / f"yima-{key}", flags)
                c.start()
                t_ingest = time.monotonic()
                r = c.cli(
                    "media",
                    "ingest",
                    str(clip),
                    "--name",
                    "test",
                    "--admin",
                    c.admin(0),
                    timeout=600,
                )
                if r.returncode != 0:
                    if cli_missing(r):
                        raise PartFailed("yimaporc has no 'media ingest' command yet")
                    raise PartFailed(f"yimaporc media ingest: {r.stderr.strip()[-300:]}")
                say(f"  yima {key}: ingested {clip.name} in {time.monotonic() - t_ingest:.1f} s")
                require_service(c, "rtsp", PORTS["rtsp"])
                url = f"rtsp://{c.hosts[0]}:{PORTS['rtsp']}/test"
                row: dict[str, Any] = {"mode": mode, "nodes": n, "workers": workers or "auto"}
                row["send_ahead_ms"] = ahead or "default"
                if n > 1:
                    # first, on cold caches: one stream, bytes crossing between nodes
                    row.update(internode_trial(s, url, f"yima-{key}", c.pids, work, fanout))
                if n == 1 or (mode, n) == s.yima_configs[0]:
                    row.update(ffmpeg_check(url, f"yima-{key}", work))
                todo = len(runs) - runs.index((mode, n, workers, ahead))
                budget = s.rtsp_budget_target * (1.5 if n == 1 and mode == "bipartite" else 1.0)
                # at least one trial (warm-up + window + ~6 s of set-up, pause and baseline)
                budget = min(budget, (s.left() - 45.0) / todo - 15.0)
                budget = max(budget, s.rtsp_warmup + s.rtsp_window + 6.0)
                # start near what this mode sustained with fewer nodes (fewer trials)
                prev = [
                    v.get("max_sessions") or 0
                    for k, v in out.items()
                    if isinstance(v, dict) and (v.get("mode") == mode or k == "bipartite-1")
                ]
                start = max([s.rtsp_start_target] + [int(0.75 * x) for x in prev])
                with Profiler(f"yima-{key}", c.pids, res):
                    ramp = rtsp_ramp(
                        s,
                        url,
                        f"yima-{key}",
                        c.pids,
                        budget,
                        start,
                        work / "load.log",
                        fanout,
                    )
                row.update(ramp)
                out[key] = row
        except PartFailed as e:
            msg = str(e)
            errors.append(f"target yima {mode} {n} node(s): {msg}")
            out[key] = {"mode": mode, "nodes": n, **e.row()}
            if "yet" in msg:
                first_error = msg
