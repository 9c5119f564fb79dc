"""Part ``rtsp-peer``: GStreamer's RTSP server on the bench clip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from parts.common import (
    PEER_HOST,
    PEERS,
    PORTS,
    PROCS,
    SYSPY,
    WORK,
    PartFailed,
    Settings,
    need_free,
    scoped,
    tail,
    wait_port,
)
from parts.loads import ffmpeg_check, rtsp_ramp


def part_rtsp_peer(s: Settings, res: dict[str, Any], errors: list[str], clip: Path) -> None:
    out = res.setdefault("rtsp", {})
    work = WORK / "rtsp"
    work.mkdir(parents=True, exist_ok=True)
    try:
        with scoped():
            need_free(PEER_HOST, PORTS["rtsp"])
            p = PROCS.start(
                "gst-rtsp-server",
                [
                    SYSPY,
                    str(PEERS / "gst_rtsp_server.py"),
                    "--file",
                    str(clip),
                    "--address",
                    PEER_HOST,
                    "--port",
                    str(PORTS["rtsp"]),
                ],
                work / "gst.log",
            )
            if not wait_port(PEER_HOST, PORTS["rtsp"], 15, p):
                raise PartFailed(f"GStreamer RTSP server did not start: {tail(work / 'gst.log')}")
            url = f"rtsp://{PEER_HOST}:{PORTS['rtsp']}/test"
            r = ffmpeg_check(url, "gstreamer", work)
            r.update(
                rtsp_ramp(
                    s,
                    url,
                    "gstreamer",
                    [p.pid],
                    max(
                        s.rtsp_warmup + s.rtsp_window + 6.0,
                        min(s.rtsp_budget_peer, 0.4 * (s.left() - 15.0)),
                    ),
                    s.rtsp_start_peer,
                    work / "load.log",
                    extra=["--growth", str(s.rtsp_growth_peer)],
                )
            )
            out["gstreamer"] = r
    except PartFailed as e:
        errors.append(f"peer gstreamer: {e}")
        out["gstreamer"] = e.row()
