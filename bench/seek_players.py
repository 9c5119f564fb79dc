"""Seek answer latency by position on a 3-node cluster, with the keyframe start, and
where ffmpeg ``-ss`` lands: a 5-minute 8 Mbit/s MPEG-TS (MPEG-2 video, 1 s GOPs).

    PYTHONPATH=src .venv/bin/python bench/seek_players.py [--seconds 300] [--keep]

Makes the file with ffmpeg, starts 3 ``twistd yima-node`` on 127.0.125.1-3 (not while the player tests run), ingests
it, then for each position: a fresh RTSP session over TCP interleaved (DESCRIBE,
SETUP, timed PLAY with ``Range: npt=T-``), the Range answered, the first packet's
sequence number against RTP-Info; then one session seeking while playing; then
``ffmpeg -ss T`` for a few positions, comparing the first recorded frame with the
source's frames.  Prints one table; everything started is stopped by PID.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from yimaporc.testing.procs import framemd5, reactor_lag, yima_cluster

NET = "127.0.125"
RTSP = 18654
HOST = f"{NET}.1"


class Rtsp:
    """A minimal RTSP client over TCP interleaved."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sock = socket.create_connection((HOST, RTSP), timeout=60)
        self.buf = bytearray()
        self.cseq = 0
        self.session = ""
        self.frames: list[bytes] = []

    def _fill(self) -> None:
        more = self.sock.recv(1 << 16)
        if not more:
            raise ConnectionError("closed")
        self.buf += more

    def _frame(self) -> bool:
        if len(self.buf) < 4:
            return False
        n = int.from_bytes(self.buf[2:4], "big")
        if len(self.buf) < 4 + n:
            return False
        if self.buf[1] == 0:
            self.frames.append(bytes(self.buf[4 : 4 + n]))
        del self.buf[: 4 + n]
        return True

    def request(self, method: str, url: str, *headers: str) -> dict[str, str]:
        self.cseq += 1
        lines = [f"{method} {url} RTSP/1.0", f"CSeq: {self.cseq}", *headers]
        if self.session:
            lines.append(f"Session: {self.session}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while True:
            while self.buf[:1] == b"$":
                if not self._frame():
                    self._fill()
            if self.buf[:4] == b"RTSP" and b"\r\n\r\n" in self.buf:
                break
            self._fill()
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        text = head.decode().split("\r\n")
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in text[1:])}
        hdrs["status"] = text[0]
        body = int(hdrs.get("content-length", "0"))
        while len(rest) < body:
            self._fill()
            head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf[:] = rest[body:]
        if "session" in hdrs and not self.session:
            self.session = hdrs["session"].split(";")[0]
        return hdrs

    def next_rtp(self) -> bytes:
        start = len(self.frames)
        while len(self.frames) == start:
            if not self._frame():
                self._fill()
        return self.frames[start]


def _seq_of(hdrs: dict[str, str]) -> int:
    info = dict(p.split("=", 1) for p in hdrs["rtp-info"].split(",")[0].split(";"))
    return int(info["seq"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=300)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="yima-seekbench-"))
    dur = args.seconds
    clip = work / "long.ts"
    t0 = time.monotonic()
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi",
         "-i", f"testsrc2=size=640x360:rate=25:duration={dur}", "-f", "lavfi",
         "-i", f"sine=f=440:d={dur}", "-c:v", "mpeg2video", "-b:v", "7M", "-g", "25",
         "-c:a", "mp2", "-b:a", "128k", "-muxrate", "8000000", "-f", "mpegts", "-y", str(clip)],
        check=True,
    )  # fmt: skip
    print(f"made {clip.stat().st_size / 1e6:.0f} MB in {time.monotonic() - t0:.0f} s")
    source = framemd5(clip)
    try:
        with yima_cluster(work, NET, rtsp=RTSP) as nodes:
            subprocess.run(
                [sys.executable, "-m", "yimaporc.cli", "media", "ingest", str(clip), "--name",
                 "long", "--admin", nodes[0].admin_url, "--secret-file",
                 str(work / "cluster.secret")],
                check=True,
            )  # fmt: skip
            url = f"rtsp://{HOST}:{RTSP}/long"
            print(f"{'npt':>6} {'answer ms':>9} {'Range start':>11} {'first seq ok':>12}")
            for t in (0, 20, 60, 120, 180, 240, dur - 10):
                c = Rtsp(url)
                c.request("DESCRIBE", url)
                c.request(
                    "SETUP", url + "/track1", "Transport: RTP/AVP/TCP;unicast;interleaved=0-1"
                )
                s = time.monotonic()
                h = c.request("PLAY", url, f"Range: npt={t}-")
                ms = (time.monotonic() - s) * 1000
                first = c.next_rtp()
                ok = int.from_bytes(first[2:4], "big") == _seq_of(h)
                print(f"{t:>6} {ms:>9.1f} {h['range']:>11} {ok!s:>12}")
                c.request("TEARDOWN", url)
                c.sock.close()
            c = Rtsp(url)
            c.request("DESCRIBE", url)
            c.request("SETUP", url + "/track1", "Transport: RTP/AVP/TCP;unicast;interleaved=0-1")
            c.request("PLAY", url, "Range: npt=10-")
            lat = []
            for t in (200, 30, 270, 5, 150):
                for _ in range(100):
                    c.next_rtp()
                s = time.monotonic()
                c.request("PLAY", url, f"Range: npt={t}-")
                lat.append((t, round((time.monotonic() - s) * 1000, 1)))
            print("seek while playing (npt, ms):", lat)
            c.request("TEARDOWN", url)
            c.sock.close()
            index = {h: i for i, h in reversed(list(enumerate(source)))}
            for t in (30.5, 150.5, dur - 20.5):
                out = work / f"ss{t}.ts"
                s = time.monotonic()
                subprocess.run(
                    ["ffmpeg", "-hide_banner", "-loglevel", "error", "-rtsp_transport", "tcp",
                     "-ss", str(t), "-i", url, "-t", "3", "-map", "0:v", "-c", "copy", "-f",
                     "mpegts", "-y", str(out)],
                    check=True, timeout=120,
                )  # fmt: skip
                got = framemd5(out)
                first = index.get(got[0]) if got else None
                print(f"ffmpeg -ss {t}: first frame {first} ({(first or 0) / 25:.2f} s; "
                      f"keyframe at or before: {int(t) * 25}), {len(got)} frames, "
                      f"{time.monotonic() - s:.1f} s")  # fmt: skip
            print("reactor lag max ms:", {n.node_id: reactor_lag(n)["max_ms"] for n in nodes})
    finally:
        if args.keep:
            print("work directory:", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    os.sync()


if __name__ == "__main__":
    main()
