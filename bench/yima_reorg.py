#!/usr/bin/env python3
"""Reorganisation MB/s of ``yimaporc disks add`` with and without a concurrent stream.

    .venv/bin/python bench/yima_reorg.py [--mb 200] [--rate BYTES_PER_S]

Two real ``twistd yima-node`` processes on 127.0.22.1-2 with 2 disks each; a clip
and an opaque file of ``--mb`` MB are ingested; then ``disks add`` runs twice
(a third disk on each node): once alone, once while ffmpeg plays the clip over
RTSP/TCP. Prints the CLI's ``copied ... MB/s`` line for both runs and whether
the stream stayed complete (video framemd5 equal to the source, all frames but
possibly the last). Everything started is stopped by PID.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from yimaporc.testing.procs import NodeProc, framemd5, views_agree, wait_for  # noqa: E402
from yimaporc.yima.media.sample import make_sample_ts  # noqa: E402

HOST = "127.0.22.{}"
PORT, ADMIN, RTSP = 37946, 38080, 38554


def cli(node: NodeProc, *args: str) -> str:
    argv = [sys.executable, "-m", "yimaporc.cli", *args, "--admin", node.admin_url,
            "--secret-file", str(node.secret_file)]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if r.returncode:
        raise SystemExit(f"error: {' '.join(args[:2])}: {r.stderr.strip()}")
    return r.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200, help="size of the opaque file moved")
    ap.add_argument("--rate", type=float, default=None, help="--rate of disks add")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="yima-reorg-"))
    secret = work / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    nodes = []
    for i in (1, 2):
        disks = ["--disk", str(work / f"y{i}" / "a"), "--disk", str(work / f"y{i}" / "b")]
        nodes.append(NodeProc(
            "yima", f"y{i}", HOST.format(i), work / f"y{i}" / "data", PORT, ADMIN,
            extra=[*disks, "--rtsp", f"tcp:{RTSP}:interface={HOST.format(i)}"],
            join=[] if i == 1 else [f"{HOST.format(1)}:{PORT}"], secret_file=secret,
        ))  # fmt: skip
    try:
        for n in nodes:
            n.start()
        wait_for(lambda: views_agree(nodes), 30, "2 nodes")
        wait_for(
            lambda: all(len((n.status() or {}).get("disks", [])) == 4 for n in nodes), 30, "disks"
        )
        clip = make_sample_ts(work / "clip.ts", seconds=20)
        blob = work / "blob.bin"
        blob.write_bytes(random.Random(1).randbytes(args.mb << 20))
        cli(nodes[0], "media", "ingest", str(clip), "--name", "clip", "--block-size", "131600")
        cli(nodes[0], "media", "ingest", str(blob), "--name", "blob", "--opaque")
        blob.unlink()
        extra = [] if args.rate is None else ["--rate", str(args.rate)]
        for i, with_stream in ((1, False), (2, True)):
            player = None
            out = work / f"play{i}.ts"
            if with_stream:
                player = subprocess.Popen(
                    ["ffmpeg", "-hide_banner", "-loglevel", "error", "-rtsp_transport", "tcp",
                     "-i", f"rtsp://{HOST.format(1)}:{RTSP}/clip", "-c", "copy", "-f", "mpegts",
                     "-y", str(out)], stdin=subprocess.DEVNULL,
                )  # fmt: skip
                time.sleep(2.0)  # a measurement script, not a test: let playback start
            t0 = time.monotonic()
            text = cli(nodes[0], "disks", "add", str(work / f"y{i}" / "c"), "--node", f"y{i}",
                       *extra)  # fmt: skip
            wall = time.monotonic() - t0
            lines = [ln for ln in text.splitlines() if ln.startswith(("copied", "moved"))]
            label = "with a stream" if with_stream else "alone        "
            print(f"disks add {label}: {'; '.join(lines)}; {wall:.2f} s wall")
            if player is not None:
                player.wait(timeout=120)
                want, got = framemd5(clip), framemd5(out)
                ok = len(got) >= len(want) - 1 and got == want[: len(got)]
                print(f"  stream during the move: {len(got)}/{len(want)} frames, intact={ok}")
    finally:
        for n in nodes:
            n.kill(signal.SIGTERM)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
