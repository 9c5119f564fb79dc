"""Two real ``twistd yima-node`` processes with 4 disks: ingest, scale, parity, via the CLI."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from yimaporc.cluster.catalog import read_document
from yimaporc.testing.procs import NodeProc, ffmpeg_record, framemd5, views_agree, wait_for
from yimaporc.yima.media import MediaInfo
from yimaporc.yima.media.sample import make_sample_ts, make_sample_wav
from yimaporc.yima.placement import ScalingHistory
from yimaporc.yima.reorg import plan_for
from yimaporc.yima.service import join_catalog

PORT = 27946
ADMIN = 28080
RTSP = 28554
HOST = "127.0.21.{}"


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[list[NodeProc]]:
    """Two yima nodes with two --disk each; the second joins the first."""
    secret = tmp_path / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    nodes = []
    for i in (1, 2):
        data = tmp_path / f"y{i}" / "data"
        disks = ["--disk", str(tmp_path / f"y{i}" / "a"), "--disk", str(tmp_path / f"y{i}" / "b")]
        disks += ["--rtsp", f"tcp:{RTSP}:interface={HOST.format(i)}"]
        nodes.append(
            NodeProc(
                "yima",
                f"y{i}",
                HOST.format(i),
                data,
                PORT,
                ADMIN,
                extra=disks,
                join=[] if i == 1 else [f"{HOST.format(1)}:{PORT}"],
                secret_file=secret,
            )
        )
    try:
        for n in nodes:
            n.start()
        yield nodes
    finally:
        for n in nodes:
            n.kill(signal.SIGTERM)


def _cli(node: NodeProc, *args: str) -> str:
    """Run ``yimaporc ARGS --admin node`` and return stdout (fail on non-zero exit)."""
    argv = [sys.executable, "-m", "yimaporc.cli", *args, "--admin", node.admin_url]
    argv += ["--secret-file", str(node.secret_file)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _cli_fails(node: NodeProc, *args: str) -> str:
    """Run the CLI expecting failure; return stderr."""
    argv = [sys.executable, "-m", "yimaporc.cli", *args, "--admin", node.admin_url]
    argv += ["--secret-file", str(node.secret_file)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    return proc.stderr


def _catalog(node: NodeProc) -> dict[str, Any]:
    return read_document(node.data_dir, "yima-storage", join_catalog)


def _round_trip(node: NodeProc, name: str, source: Path, out: Path) -> None:
    _cli(node, "media", "get", name, "--out", str(out))
    assert out.read_bytes() == source.read_bytes()


def test_two_nodes_ingest_scale_and_parity(pair: list[NodeProc], tmp_path: Path) -> None:
    """Ingest TS+WAV on 2 nodes/4 disks; add a disk while a stream plays, remove one, with
    plan_for counts; parity rebuild."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed")
    y1, y2 = pair
    wait_for(lambda: views_agree(pair), 30, "2 nodes to agree")

    def four_disks() -> bool:
        docs = [n.status() for n in pair]
        return all(d is not None and len(d["disks"]) == 4 for d in docs)

    wait_for(four_disks, 30, "4 disks registered on both nodes")
    ts = make_sample_ts(tmp_path / "clip.ts", seconds=6)
    wav = make_sample_wav(tmp_path / "tone.wav", seconds=2)
    out = _cli(y1, "media", "ingest", str(ts), "--name", "clip", "--block-size", "40000")
    assert "ingested clip: mpeg-ts" in out
    out = _cli(y2, "media", "ingest", str(wav), "--block-size", "30000")
    assert "ingested tone: wav" in out
    # Without parity, placement is plain SCADDAR: scaling moves the optimum.
    noise = tmp_path / "noise.bin"
    noise.write_bytes(random.Random(7).randbytes(2048 * 1024))
    err = _cli_fails(y1, "media", "ingest", str(noise), "--block-size", "1024")
    assert "cannot be streamed: not MPEG-TS or WAV; not stored" in err and "HTTP 415" in err
    out = _cli(y1, "media", "ingest", str(noise), "--block-size", "1024", "--parity-group", "0",
               "--opaque")  # fmt: skip
    assert "ingested noise: opaque" in out and "parity" not in out.splitlines()[0]
    listing = _cli(y2, "media", "list")
    assert "clip mpeg-ts" in listing and "tone wav" in listing
    status = y2.status()
    assert status is not None
    assert {m["name"] for m in status["media"]} == {"clip", "tone", "noise"}
    assert {d["node_id"] for d in status["disks"]} == {"y1", "y2"}
    _round_trip(y2, "clip", ts, tmp_path / "clip.out")
    _round_trip(y1, "tone", wav, tmp_path / "tone.out")
    # The catalog names each time index by digest; each node has both files, the one
    # ingested elsewhere fetched from the peer and checked.
    for n in pair:
        media = _catalog(n)["media"]
        assert all("block_times" not in m for m in media.values())
        assert media["clip"]["index_digest"] and media["tone"]["index_digest"]
        assert media["noise"]["index_digest"] == ""
        folder = n.data_dir / "time-index"
        wait_for(lambda f=folder: len(list(f.glob("*.idx"))) == 2, 30, "both time indexes")
        assert {p.name for p in folder.glob("*.idx")} == {
            f"{k}.{media[k]['index_digest']}.idx" for k in ("clip", "tone")
        }

    # A stream plays through the reorganisation (ffmpeg over TCP interleaved).
    played = tmp_path / "played.ts"
    player = ffmpeg_record(f"rtsp://{HOST.format(1)}:{RTSP}/clip", played)
    try:
        size = ts.stat().st_size
        wait_for(lambda: played.exists() and played.stat().st_size > size * 0.1, 30, "playing")
        before = _catalog(y1)
        assert player.poll() is None and played.stat().st_size < size * 0.8, "still playing"
        out = _cli(y1, "disks", "add", str(tmp_path / "y2" / "c"), "--node", "y2")
        _, err = player.communicate(timeout=60)
    finally:
        if player.poll() is None:
            player.kill()
            player.wait()
    assert player.returncode == 0, err
    want, got = framemd5(ts), framemd5(played)
    assert len(got) >= len(want) - 1 and got == want[: len(got)], "stream damaged by the move"
    after = _catalog(y1)
    infos = [MediaInfo.from_json(m) for m in before["media"].values()]
    old = ScalingHistory.from_json(before["history"])
    new = ScalingHistory.from_json(after["history"])
    plans = [plan_for(i, old, new) for i in infos]
    moved, total = sum(p.moved for p in plans), sum(p.total for p in plans)
    assert out.strip().splitlines()[-1] == f"moved {moved} of {total} blocks"
    assert 0 < moved < total
    added = set(new.disk_ids) - set(old.disk_ids)
    assert all(m.dst_disk.disk_id in added for p in plans for m in p.moves), (
        "onto the new disk only"
    )
    by_name = {i.name: p for i, p in zip(infos, plans, strict=True)}
    plain = by_name["noise"]
    assert plain.total == 2048 and abs(plain.moved / plain.total - 1 / 5) < 0.05, plain.moved
    _round_trip(y1, "clip", ts, tmp_path / "clip.out")

    on_disk = {d["disk_id"]: d["blocks"] for d in y1.status()["disks"]}  # type: ignore[index]
    out = _cli(y2, "disks", "remove", "y1-0")
    final = ScalingHistory.from_json(_catalog(y2)["history"])
    plans = [plan_for(i, new, final) for i in infos]
    assert out.strip().splitlines()[-1] == (
        f"moved {sum(p.moved for p in plans)} of {sum(p.total for p in plans)} blocks"
    )
    from_removed = sum(1 for p in plans for m in p.moves if m.src_disk.physical == "y1-0")
    assert from_removed == on_disk["y1-0"]
    # Sticky placement: with parity too, only the removed disk's blocks move.
    assert all(m.src_disk.physical == "y1-0" for p in plans for m in p.moves), "only y1-0's"
    assert not list((tmp_path / "y1" / "a" / "media").glob("*/*.blk"))
    _round_trip(y2, "clip", ts, tmp_path / "clip.out")
    _round_trip(y2, "tone", wav, tmp_path / "tone.out")
    assert "no such disk: y1-0" in _cli_fails(y1, "disks", "remove", "y1-0")

    victim = tmp_path / "y2" / "b" / "media"
    wiped = sorted(p.relative_to(victim) for p in victim.glob("*/*.*") if p.parent.name != "noise")
    gone = len(list(victim.glob("noise/*.*")))
    assert wiped and gone
    for p in victim.glob("*/*.*"):
        p.unlink()
    _round_trip(y1, "clip", ts, tmp_path / "clip.out")
    _round_trip(y1, "tone", wav, tmp_path / "tone.out")
    out = _cli(y1, "disks", "rebuild", "y2-1")
    assert f"restored {len(wiped)} blocks" in out
    assert f"lost {gone} blocks of files ingested without parity: noise" in out
    assert sorted(p.relative_to(victim) for p in victim.glob("*/*.*")) == wiped  # noise: lost

    doc = json.loads(_cli(y2, "status", "--json"))
    assert {d["disk_id"] for d in doc["disks"]} == {"y1-1", "y2-0", "y2-1", "y2-2"}
    assert sum(d["blocks"] for d in doc["disks"]) == sum(i.blocks for i in infos) + sum(
        -(-i.blocks // i.parity_group) for i in infos if i.parity_group
    )
    y2.kill(signal.SIGKILL)
    wait_for(lambda: views_agree([y1]), 30, "y1 to drop y2")
    err = _cli_fails(y1, "media", "ingest", str(wav), "--name", "late")
    assert "node y2" in err and "is down" in err
