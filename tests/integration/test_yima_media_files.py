"""Media files people have, as ffmpeg and sox write them, ingest and play from real yima nodes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from yimaporc.testing.procs import (
    NodeProc,
    ffmpeg_record,
    framemd5,
    yima_cluster,
)
from yimaporc.yima.media.sample import make_sample_ts

NET = "127.0.109"
RTSP = 18554

# name -> the command that writes it to {out} (2 s of tone each).
WAVS = {
    "ffmpeg-s16-list": "ffmpeg -f lavfi -i sine=f=440:d=2 -ac 2 -ar 44100 {out}",
    "ffmpeg-s24-5.1": "ffmpeg -f lavfi -i sine=f=440:d=2 -af aformat=channel_layouts=5.1 "
    "-ar 48000 -c:a pcm_s24le {out}",
    "ffmpeg-u8-mono": "ffmpeg -f lavfi -i sine=f=440:d=2 -ac 1 -ar 22050 -c:a pcm_u8 {out}",
    "ffmpeg-s32-3ch": "ffmpeg -f lavfi -i sine=f=440:d=2 -ac 3 -ar 16000 -c:a pcm_s32le {out}",
    "sox-s16": "sox -n -r 48000 -c 2 -b 16 {out} synth 2 sine 300",
    "sox-s24-mono": "sox -n -r 44100 -c 1 -b 24 {out} synth 2 sine 300",
    "sox-u8-8ch": "sox -n -r 22050 -c 8 -b 8 {out} synth 2 sine 300",
    "sox-s24-4ch": "sox -n -r 48000 -c 4 -b 24 {out} synth 2 sine 300",
    "sox-s32-6ch": "sox -n -r 48000 -c 6 -b 32 {out} synth 2 sine 300",
    "sox-f32-stereo": "sox -n -r 44100 -c 2 -b 32 -e floating-point {out} synth 2 sine 300",
    "sox-f64-mono": "sox -n -r 16000 -c 1 -b 64 -e floating-point {out} synth 2 sine 300",
    "ffmpeg-f32-stereo": "ffmpeg -f lavfi -i sine=f=440:d=2 -ac 2 -ar 44100 -c:a pcm_f32le {out}",
}


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProc]]:
    """Two bipartite yima nodes with one disk each."""
    with yima_cluster(tmp_path_factory.mktemp("yima-media"), NET, count=2, rtsp=RTSP) as procs:
        yield procs


def ingest(node: NodeProc, path: Path, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run ``yimaporc media ingest``; the completed process (not checked)."""
    argv = [sys.executable, "-m", "yimaporc.cli", "media", "ingest", str(path), "--name", name,
            "--block-size", "30000", *extra, "--admin", node.admin_url,
            "--secret-file", str(node.secret_file)]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def run(command: str) -> None:
    """Run a shell-free command line quietly; fail the test on a non-zero exit."""
    subprocess.run(command.split(), check=True, capture_output=True, timeout=60)


@pytest.mark.parametrize("kind", sorted(WAVS))
def test_wav_as_written_by_ffmpeg_and_sox_plays_sample_exact(
    nodes: list[NodeProc], tmp_path: Path, kind: str
) -> None:
    """Every PCM layout ffmpeg and sox write (8/16/24/32-bit integer, 32/64-bit float, 1-8
    channels) streams as L16; ffmpeg gets the file's samples as it converts them to 16-bit."""
    wav = tmp_path / "in.wav"
    run(WAVS[kind].format(out=wav).replace("ffmpeg ", "ffmpeg -hide_banner -loglevel error -y ", 1))
    name = kind.replace(".", "")
    done = ingest(nodes[0], wav, name)
    assert done.returncode == 0, done.stderr
    assert f"ingested {name}: wav" in done.stdout
    want_path = tmp_path / "want.raw"
    run(f"ffmpeg -hide_banner -loglevel error -y -i {wav} -f s16le -c:a pcm_s16le {want_path}")
    got_path = tmp_path / "got.raw"
    run(f"ffmpeg -hide_banner -loglevel error -y -rtsp_transport tcp -i "
        f"rtsp://{NET}.2:{RTSP}/{name} -f s16le -c:a pcm_s16le {got_path}")  # fmt: skip
    want, got = want_path.read_bytes(), got_path.read_bytes()
    assert len(got) >= 0.99 * len(want), (len(got), len(want))
    assert got == want[: len(got)]


def test_cut_ts_with_leading_garbage_is_trimmed_and_plays(
    nodes: list[NodeProc], tmp_path: Path
) -> None:
    """An interrupted recording (a cut packet, junk in front) is trimmed, says so, and plays."""
    clean = make_sample_ts(tmp_path / "clean.ts", 4)
    data = clean.read_bytes()
    cut = tmp_path / "cut.ts"
    cut.write_bytes(b"\x00junk before the stream" + data + data[:100])
    done = ingest(nodes[1], cut, "cut")
    assert done.returncode == 0, done.stderr
    assert "ingested cut: mpeg-ts" in done.stdout
    assert "dropped 23 bytes before the first packet" in done.stderr
    assert "dropped 100 bytes after the last whole packet" in done.stderr
    out = tmp_path / "out.ts"
    rec = ffmpeg_record(f"rtsp://{NET}.1:{RTSP}/cut", out)
    assert rec.wait(timeout=60) == 0
    want, got = framemd5(clean), framemd5(out)
    assert len(got) >= len(want) - 1  # ffmpeg's stream copy may end before the last frame
    assert got == want[: len(got)]


def test_unstreamable_upload_is_refused_unless_opaque(
    nodes: list[NodeProc], tmp_path: Path
) -> None:
    """Bytes that are no media: ingest exits non-zero with the reason; --opaque stores them."""
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(100_000))
    refused = ingest(nodes[0], blob, "blob")
    assert refused.returncode != 0
    assert "error: blob cannot be streamed: not MPEG-TS or WAV; not stored" in refused.stderr
    assert "blob" not in {m["name"] for m in (nodes[0].status() or {}).get("media", [])}
    stored = ingest(nodes[0], blob, "blob", "--opaque")
    assert stored.returncode == 0, stored.stderr
    assert "ingested blob: opaque" in stored.stdout
