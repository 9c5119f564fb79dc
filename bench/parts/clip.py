"""The bench clip: 4 Mbit/s VBR MPEG-TS whose bitrate swings scene by scene."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from parts.common import WORK, Settings, fnum, run, say

# --------------------------------------------------------------------------- streaming
CLIP_SCENES = [  # lavfi sources from cheap to costly to code: the bitrate follows them
    "testsrc2=s=1280x720:r=25:d={d}",
    "mandelbrot=s=1280x720:r=25,trim=duration={d},setpts=PTS-STARTPTS",
    "smptehdbars=s=1280x720:r=25:d={d}",
    "life=s=1280x720:r=25:mold=10:ratio=0.1:death_color=#C83232:life_color=#00ff00,"
    "trim=duration={d},setpts=PTS-STARTPTS",
    "testsrc=s=1280x720:r=25:d={d}",
    "cellauto=s=1280x720:r=25:rule=110,trim=duration={d},setpts=PTS-STARTPTS",
]


def make_clip(s: Settings, video_mbps: int = 4, seconds: int | None = None) -> Path:
    """A 4 Mbit/s VBR MPEG-TS clip (MPEG-2 720p video + MP2 audio), cached by its length
    (``video_mbps`` makes a lighter one of the same scenes, for the scaled-down nodes).

    Scenes of 2.5 s cycle through sources of very different complexity, so the video
    bitrate swings between ~0.4 and ~11 Mbit/s within every few seconds (average 4,
    maxrate 8, 4 Mbit VBV): a server that paces by bytes instead of media time shows
    it inside a ramp's 8 s window."""
    secs = seconds or s.clip_seconds
    clip = WORK / f"clip-vbr{video_mbps}m-scenes-{secs}s.ts"
    if clip.exists() and clip.stat().st_size > 1_000_000:
        return clip
    WORK.mkdir(parents=True, exist_ok=True)
    say(f"# generating {clip} ({secs} s, {video_mbps} Mbit/s VBR)")
    tmp = clip.with_suffix(".tmp.ts")
    seg = 2.5
    n = int(secs / seg)
    parts = [
        CLIP_SCENES[i % len(CLIP_SCENES)].format(d=seg) + f",format=yuv420p[s{i}]" for i in range(n)
    ]
    graph = ";".join(parts) + ";" + "".join(f"[s{i}]" for i in range(n))
    graph += f"concat=n={n}:v=1:a=0[v]"
    r = run(
        [
            "ffmpeg",
            "-hide_banner",
            "-loglevel",
            "fatal",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=1000:sample_rate=48000",
            "-filter_complex",
            graph,
            "-map",
            "[v]",
            "-map",
            "0:a",
            "-t",
            str(secs),
            "-c:v",
            "mpeg2video",
            "-b:v",
            f"{video_mbps}M",
            "-maxrate",
            f"{2 * video_mbps}M",
            "-bufsize",
            f"{video_mbps}M",
            "-g",
            "25",
            "-c:a",
            "mp2",
            "-b:a",
            "128k",
            "-f",
            "mpegts",
            str(tmp),
        ],
        600,
    )
    if r.returncode != 0:
        raise SystemExit(f"error: ffmpeg could not make the clip: {r.stderr.strip()[-300:]}")
    tmp.rename(clip)
    clip.chmod(0o644)
    return clip


def clip_info(clip: Path) -> dict[str, Any]:
    r = run(
        [
            "ffprobe",
            "-v",
            "error",
            "-show_entries",
            "format=duration,bit_rate",
            "-of",
            "json",
            str(clip),
        ],
        60,
    )
    fmt = json.loads(r.stdout or "{}").get("format", {})
    return {
        "path": str(clip),
        "bytes": clip.stat().st_size,
        "duration_s": fnum(fmt.get("duration")),
        "mbps": (fnum(fmt.get("bit_rate")) or 0) / 1e6,
    }
