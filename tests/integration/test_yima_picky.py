"""A picky viewer against 3 real yima nodes (3 x 2 disks, 127.0.184.0/24): cases the
player tests miss. A node paused a few seconds and then resumed mid-stream must not
replay what it slept through to a player reading over TCP interleaved."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from yimaporc.testing.procs import (
    NodeProc,
    ffmpeg_record,
    framemd5,
    views_agree,
    wait_for,
    yima_cluster,
)
from yimaporc.yima.media.sample import make_sample_ts

NET = "127.0.184"
RTSP = 18554
CLIP_SECONDS = 12


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[NodeProc], Path]]:
    """Three yima nodes with two disks each and a 12 s parity clip named ``clip``."""
    tmp = tmp_path_factory.mktemp("picky")
    with yima_cluster(tmp, NET, disks=2, rtsp=RTSP) as nodes:
        clip = make_sample_ts(tmp / "clip.ts", CLIP_SECONDS)
        subprocess.run(
            [sys.executable, "-m", "yimaporc.cli", "media", "ingest", str(clip), "--name", "clip",
             "--block-size", "13160", "--admin", nodes[0].admin_url,
             "--secret-file", str(nodes[0].secret_file)],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        wait_for(
            lambda: all(
                any(m["name"] == "clip" for m in (n.status() or {}).get("media", [])) for n in nodes
            ),
            20,
            "every node to list the clip",
        )
        yield nodes, clip


def test_node_paused_then_resumed_mid_stream_replays_nothing_over_tcp(
    cluster: tuple[list[NodeProc], Path], tmp_path: Path
) -> None:
    """ffmpeg over TCP through node 1 while node 2 is SIGSTOPped for 4 s and then resumed
    (it answers the NACKs it slept through): every frame once, none damaged or extra."""
    nodes, clip = cluster
    victim = nodes[1]
    assert victim.process is not None
    out = tmp_path / "tcp.ts"
    player = ffmpeg_record(f"rtsp://{NET}.1:{RTSP}/clip", out, "tcp")
    stopped = False
    try:
        size = clip.stat().st_size
        wait_for(lambda: out.exists() and out.stat().st_size > size * 0.25, 40, "25% played")
        victim.process.send_signal(signal.SIGSTOP)
        stopped = True
        # Resume while the stream still plays: 4 s of media later (bounded by the clip).
        wait_for(lambda: out.stat().st_size > size * 0.55, 20, "55% played")
        victim.process.send_signal(signal.SIGCONT)
        stopped = False
        _, err = player.communicate(timeout=90)
    finally:
        if stopped:
            victim.process.send_signal(signal.SIGCONT)
        if player.poll() is None:
            player.kill()
            player.wait()
    assert player.returncode == 0, err
    every = framemd5(clip)
    got = Counter(framemd5(out))
    # The source's last frame is left out: ffmpeg never flushes the last PES of RTP MP2T.
    lost = sum((Counter(every[:-1]) - got).values())
    extra = sum((got - Counter(every)).values())
    print(f"\npaused 4 s: {lost} of {len(every) - 1} frames lost, {extra} damaged or replayed")
    assert (lost, extra) == (0, 0)
    wait_for(lambda: views_agree(nodes), 60, "the paused node back in every view")
