"""Generate sample media for demos and tests (blocking: run in a thread or a script).

``make_sample_ts`` drives ffmpeg (test pattern video + sine tone, MPEG-2 video and
MP2 audio in MPEG-TS, bit-exact flags so the output is reproducible);
``make_sample_wav`` writes a 16-bit PCM sine sweep with the standard library.
"""

from __future__ import annotations

import math
import struct
import subprocess
import wave
from pathlib import Path


class SampleError(RuntimeError):
    """Sample media could not be made (message is user-facing)."""


def sample_ts_command(
    path: str | Path, seconds: float, ffmpeg: str = "ffmpeg", size: str = "320x240", rate: int = 25
) -> list[str]:
    """The ffmpeg command line :func:`make_sample_ts` runs."""
    s = f"{seconds:g}"
    return [
        ffmpeg,
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "error",
        "-y",
        "-f",
        "lavfi",
        "-i",
        f"testsrc=duration={s}:size={size}:rate={rate}",
        "-f",
        "lavfi",
        "-i",
        f"sine=frequency=440:beep_factor=4:duration={s}",
        "-c:v",
        "mpeg2video",
        "-b:v",
        "800k",
        "-g",
        str(rate),
        "-c:a",
        "mp2",
        "-b:a",
        "128k",
        "-threads",
        "1",
        "-fflags",
        "+bitexact",
        "-flags",
        "+bitexact",
        "-f",
        "mpegts",
        str(path),
    ]


def make_sample_ts(
    path: str | Path, seconds: float = 12.0, ffmpeg: str = "ffmpeg", size: str = "320x240"
) -> Path:
    """Write ``seconds`` of MPEG-TS video+audio to ``path`` with ffmpeg; return the path."""
    if seconds <= 0:
        raise SampleError("sample length must be positive")
    out = Path(path)
    try:
        proc = subprocess.run(
            sample_ts_command(out, seconds, ffmpeg, size),
            capture_output=True,
            text=True,
            check=False,
            timeout=max(60.0, 10 * seconds),
        )
    except FileNotFoundError as e:
        raise SampleError(f"{ffmpeg} not found: install ffmpeg to make the sample clip") from e
    except subprocess.TimeoutExpired as e:
        raise SampleError(f"{ffmpeg} took too long making the sample clip") from e
    if proc.returncode != 0 or not out.exists() or out.stat().st_size == 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise SampleError(f"{ffmpeg} failed ({proc.returncode}): {tail[0]}")
    return out


def make_sample_wav(
    path: str | Path, seconds: float = 10.0, sample_rate: int = 44_100, channels: int = 2
) -> Path:
    """Write ``seconds`` of 16-bit PCM (a 220-880 Hz sweep) to ``path``; return the path."""
    if seconds <= 0 or sample_rate <= 0 or channels <= 0:
        raise SampleError("sample length, rate and channels must be positive")
    n = round(seconds * sample_rate)
    frames = bytearray()
    pack = struct.Struct("<" + "h" * channels).pack
    phase = 0.0
    for i in range(n):
        freq = 220.0 + 660.0 * i / max(1, n - 1)
        phase += 2 * math.pi * freq / sample_rate
        v = int(12_000 * math.sin(phase))
        frames += pack(*([v] * channels))
    out = Path(path)
    with wave.open(str(out), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(bytes(frames))
    return out
