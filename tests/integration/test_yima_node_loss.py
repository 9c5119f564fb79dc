"""A node lost mid-stream (SIGKILL or SIGSTOP) on 3 nodes x 2 disks costs the player no frame.

One cluster for the module (127.0.126.0/24); each test loses one node and brings it
back. The relay path (ffmpeg over RTSP) and the yimaporc player (fan-out) are both
measured: every video frame of the source must be in the recording, and another
session playing meanwhile through another node must not notice.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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

NET = "127.0.126"
RTSP = 18554
CLIP_SECONDS = 10


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[NodeProc], Path]]:
    """Three yima nodes with two disks each and a 10 s parity clip named ``clip``."""
    tmp = tmp_path_factory.mktemp("node_loss")
    with yima_cluster(tmp, NET, disks=2, rtsp=RTSP) as nodes:
        clip = make_sample_ts(tmp / "clip.ts", CLIP_SECONDS)
        out = cli(nodes[0], "media", "ingest", str(clip), "--name", "clip",
                  "--block-size", "13160")  # fmt: skip
        assert "parity groups of 2" in out
        wait_for(lambda: all(_has_clip(n) for n in nodes), 20, "every node to list the clip")
        yield nodes, clip


def _has_clip(node: NodeProc) -> bool:
    return _has(node, "clip")


def cli(node: NodeProc, *args: str) -> str:
    """Run the yimaporc CLI against ``node``; stdout (fails the test on a non-zero exit)."""
    argv = [sys.executable, "-m", "yimaporc.cli", *args, "--admin", node.admin_url,
            "--secret-file", str(node.secret_file)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def frames_lost(source: Path, recording: Path) -> tuple[int, int, int]:
    """(source frames missing from the recording, recording frames not in the source,
    source frames): damaged frames count in both. The source's very last frame is left
    out: ffmpeg's RTP demuxer never flushes the last PES of a stream, lost or not."""
    every = framemd5(source)
    want, got = Counter(every[:-1]), Counter(framemd5(recording))
    return sum((want - got).values()), sum((got - Counter(every)).values()), sum(want.values())


def revive(nodes: list[NodeProc], victim: NodeProc) -> None:
    """Bring the lost node back (same data dir) and wait until everyone agrees again."""
    if victim.process is not None and victim.process.poll() is None:
        victim.process.send_signal(signal.SIGCONT)
        victim.kill(signal.SIGKILL)
    victim.start()
    wait_for(lambda: views_agree(nodes), 60, "the node to rejoin")
    wait_for(lambda: all(_has_clip(n) for n in nodes), 30, "the rejoined node to know the clip")


def lose(victim: NodeProc, how: str) -> None:
    """SIGKILL (reaped) or SIGSTOP (left stopped until :func:`revive`) the victim."""
    assert victim.process is not None
    if how == "kill":
        victim.kill(signal.SIGKILL)
    else:
        victim.process.send_signal(signal.SIGSTOP)


def relay_counters(node: NodeProc) -> dict[str, Any]:
    """The node's relay counters (``streaming.relay`` of /api/status)."""
    doc = wait_for(node.status, 10, f"{node.node_id} status")
    relay: dict[str, Any] = doc["streaming"].get("relay", {})
    return relay


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_ffmpeg_through_the_relay_loses_no_frame_when_a_node_is_lost(
    cluster: tuple[list[NodeProc], Path], tmp_path: Path, how: str
) -> None:
    """ffmpeg through node 1's relay records every frame although node 2 is SIGKILLed (or
    SIGSTOPped) mid-stream; a second ffmpeg through node 3 meanwhile also gets every frame."""
    nodes, clip = cluster
    victim = nodes[1]
    before = relay_counters(nodes[0]).get("early_takeovers", 0)
    main, other = tmp_path / "main.ts", tmp_path / "other.ts"
    players = [ffmpeg_record(f"rtsp://{NET}.1:{RTSP}/clip", main),
               ffmpeg_record(f"rtsp://{NET}.3:{RTSP}/clip", other)]  # fmt: skip
    try:
        size = clip.stat().st_size
        wait_for(lambda: main.exists() and main.stat().st_size > size * 0.3, 40, "30% played")
        lose(victim, how)
        results = [p.communicate(timeout=90) for p in players]
    finally:
        for p in players:
            if p.poll() is None:
                p.kill()
                p.wait()
    try:
        for p, (_, err) in zip(players, results, strict=True):
            assert p.returncode == 0, err
        lost, bad, total = frames_lost(clip, main)
        lost2, bad2, _ = frames_lost(clip, other)
        counters = relay_counters(nodes[0])
        print(f"\n{how}: relayed via node 1: {lost} of {total} frames lost, {bad} damaged; "
              f"via node 3: {lost2} lost, {bad2} damaged; relay {counters}")  # fmt: skip
        assert (lost, bad) == (0, 0), f"{lost} frames lost, {bad} damaged at node loss"
        assert (lost2, bad2) == (0, 0), f"the other session lost {lost2} frames, {bad2} damaged"
        assert counters["early_takeovers"] > before, "taken over before the membership noticed"
        assert counters["skipped"] == 0
    finally:
        revive(nodes, victim)


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_yimaporc_player_loses_nothing_when_a_node_is_lost(
    cluster: tuple[list[NodeProc], Path], tmp_path: Path, how: str
) -> None:
    """The yimaporc player (fan-out) gets the clip byte for byte although node 3 is SIGKILLed
    (or SIGSTOPped) mid-stream: it asks for a hand-over and the taken share arrives under a
    new node index."""
    nodes, clip = cluster
    victim = nodes[2]
    before = wait_for(nodes[0].status, 10, "node 1 status")["streaming"]["early_handovers"]
    out, stats = tmp_path / "played.ts", tmp_path / "stats.json"
    argv = [sys.executable, "-m", "yimaporc.cli", "play", f"rtsp://{NET}.1:{RTSP}/clip",
            "--out", str(out), "--stats", str(stats), "--bind", f"{NET}.1"]  # fmt: skip
    player = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        size = clip.stat().st_size
        wait_for(lambda: out.exists() and out.stat().st_size > size * 0.3, 40, "30% played")
        lose(victim, how)
        _, err = player.communicate(timeout=90)
    finally:
        if player.poll() is None:
            player.kill()
            player.wait()
    try:
        assert player.returncode == 0, err
        got = json.loads(stats.read_text())
        lost, bad, total = frames_lost(clip, out)
        print(f"\nyimaporc play, node 3 {how}: {lost} of {total} frames lost, {bad} damaged; "
              f"missing packets {got['packets_missing_at_playout']}, nodes "
              f"{got.get('node_indices')}")  # fmt: skip
        assert got["packets_missing_at_playout"] == 0
        assert out.read_bytes() == clip.read_bytes()
        assert max(got["node_indices"]) >= 3, "the taken share came under a new node index"
        doc = wait_for(nodes[0].status, 10, "node 1 status")
        assert doc["streaming"]["early_handovers"] > before, "taken over before the membership"
    finally:
        revive(nodes, victim)


def test_shares_stop_everywhere_when_the_rtsp_node_vanishes(
    cluster: tuple[list[NodeProc], Path], tmp_path: Path
) -> None:
    """ffmpeg plays through node 3, which is SIGKILLed: nodes 1 and 2 stop sending their
    shares of that session once the membership drops node 3 (not at the title's end)."""
    nodes, clip = cluster
    victim = nodes[2]
    record = tmp_path / "orphan.ts"
    player = ffmpeg_record(f"rtsp://{NET}.3:{RTSP}/clip", record)
    try:
        size = clip.stat().st_size
        wait_for(lambda: record.exists() and record.stat().st_size > size * 0.2, 40, "20% played")
        assert all(n.status()["streaming"]["shares_served"] >= 1 for n in nodes[:2])  # type: ignore[index]
        lose(victim, "kill")

        def stopped() -> bool:
            docs = [n.status() for n in nodes[:2]]
            return all(d is not None and d["streaming"]["shares_served"] == 0 for d in docs)

        wait_for(stopped, 15, "nodes 1 and 2 to stop the orphaned shares")
        docs = [wait_for(n.status, 10, "status") for n in nodes[:2]]
        assert all(d["streaming"]["orphans_stopped"] >= 1 for d in docs)
    finally:
        player.kill()
        player.wait()
        revive(nodes, victim)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "stop"])
def test_many_sessions_udp_and_tcp_lose_no_frame_on_a_longer_clip(
    cluster: tuple[list[NodeProc], Path], tmp_path: Path, how: str
) -> None:
    """Slow: a 40 s clip, six ffmpeg clients (UDP and TCP, through nodes 1 and 3), node 2
    lost at a quarter: every recording has every frame."""
    nodes, _ = cluster
    clip = make_sample_ts(tmp_path / "long.ts", 40)
    name = f"long{how}"
    cli(nodes[0], "media", "ingest", str(clip), "--name", name, "--block-size", "13160")
    wait_for(lambda: all(_has(n, name) for n in nodes), 20, "every node to list the clip")
    victim = nodes[1]
    outs = [tmp_path / f"r{i}.ts" for i in range(6)]
    players = [ffmpeg_record(f"rtsp://{NET}.{1 if i % 2 else 3}:{RTSP}/{name}", out,
                             transport="udp" if i < 3 else "tcp")
               for i, out in enumerate(outs)]  # fmt: skip
    try:
        size = clip.stat().st_size
        wait_for(lambda: all(o.exists() and o.stat().st_size > size / 4 for o in outs), 60,
                 "a quarter played")  # fmt: skip
        lose(victim, how)
        results = [p.communicate(timeout=120) for p in players]
    finally:
        for p in players:
            if p.poll() is None:
                p.kill()
                p.wait()
    try:
        for p, (_, err) in zip(players, results, strict=True):
            assert p.returncode == 0, err
        lost = [frames_lost(clip, o)[:2] for o in outs]
        print(f"\n{how}, 6 sessions of 40 s: (lost, damaged) per recording {lost}")
        assert all(x == (0, 0) for x in lost), lost
    finally:
        revive(nodes, victim)


def _has(node: NodeProc, name: str) -> bool:
    doc = node.status() or {}
    return any(m["name"] == name for m in doc.get("media", []))
