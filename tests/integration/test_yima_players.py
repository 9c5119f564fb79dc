"""Stock players against a 3-node yima cluster: ffmpeg (``-ss`` seeks), mpv, VLC as
Debian ships it, GStreamer ``playbin`` (with a seek) and ffprobe, over UDP and TCP
interleaved, on media made by ffmpeg at test time: H.264/AAC and MPEG-2/MP2 in
MPEG-TS (1 s GOPs, ``-g 25``), 16-bit and 24-bit WAV.

One module-scoped cluster on 127.0.125.1-3 serves every case.  The default run
takes one case of each player; the full matrix is marked ``slow``
(``make test-slow``).  Each case prints what it measured (``-s`` shows it).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from yimaporc.testing.procs import NodeProc, framemd5, yima_cluster

NET = "127.0.125"
RTSP = 18554
FPS = 25
GOP = 25
VIDEO_SECONDS = 6
WAV_SECONDS = 4
GST_CLIENT = Path(__file__).parent / "players" / "gst_client.py"

MEDIA = {
    "h264": "-f lavfi -i testsrc2=size=320x240:rate={fps}:duration={vs} -f lavfi -i "
    "sine=f=440:d={vs} -c:v libx264 -preset ultrafast -g {gop} -keyint_min {gop} "
    "-sc_threshold 0 -c:a aac -b:a 96k -f mpegts",
    "mpeg2": "-f lavfi -i testsrc2=size=320x240:rate={fps}:duration={vs} -f lavfi -i "
    "sine=f=440:d={vs} -c:v mpeg2video -b:v 2M -g {gop} -c:a mp2 -f mpegts",
    "wav16": "-f lavfi -i sine=f=440:d={ws} -ac 2 -ar 44100 -c:a pcm_s16le",
    "wav24": "-f lavfi -i sine=f=440:d={ws} -ac 2 -ar 48000 -c:a pcm_s24le",
}
EXT = {"h264": "ts", "mpeg2": "ts", "wav16": "wav", "wav24": "wav"}
VIDEO = ("h264", "mpeg2")


def _run(argv: list[str], timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload, no-any-return]


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The four test files, made by ffmpeg."""
    tmp = tmp_path_factory.mktemp("playermedia")
    out = {}
    for name, args in MEDIA.items():
        path = tmp / f"{name}.{EXT[name]}"
        argv = args.format(fps=FPS, vs=VIDEO_SECONDS, gop=GOP, ws=WAV_SECONDS).split()
        _run(["ffmpeg", "-hide_banner", "-loglevel", "error", *argv, "-y", str(path)],
             check=True)  # fmt: skip
        out[name] = path
    return out


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, media: dict[str, Path]
) -> Iterator[list[NodeProc]]:
    """3 bipartite yima nodes on 127.0.125.1-3 holding the four files (small blocks, so
    every file spans every node); stopped at the end."""
    tmp = tmp_path_factory.mktemp("playercluster")
    with yima_cluster(tmp, NET, rtsp=RTSP) as nodes:
        for name, path in media.items():
            _run([sys.executable, "-m", "yimaporc.cli", "media", "ingest", str(path), "--name",
                  name, "--block-size", "131600", "--admin", nodes[0].admin_url,
                  "--secret-file", str(tmp / "cluster.secret")], check=True)  # fmt: skip
        yield nodes


def _url(name: str, node: int = 1) -> str:
    return f"rtsp://{NET}.{node}:{RTSP}/{name}"


def _source_frames(path: Path) -> list[str]:
    return framemd5(path)


def _match(source: list[str], got: list[str]) -> list[int | None]:
    """Index in the source of each decoded frame (None: no source frame decodes so)."""
    index = {h: i for i, h in reversed(list(enumerate(source)))}
    return [index.get(h) for h in got]


def _nobody() -> dict[str, object]:
    """Run as ``nobody`` when root (Debian's VLC refuses root)."""
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam("nobody")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _cases(
    player: str, default: set[tuple[str, str]], medias: tuple[str, ...] = tuple(MEDIA)
) -> list[object]:
    """(media, transport) params; those not in ``default`` are marked slow."""
    out: list[object] = []
    for m in medias:
        for t in ("udp", "tcp"):
            marks = () if (m, t) in default else (pytest.mark.slow,)
            out.append(pytest.param(m, t, marks=marks, id=f"{player}-{m}-{t}"))
    return out


# --- ffmpeg -ss -------------------------------------------------------------------


@pytest.mark.parametrize(("name", "transport"), _cases("ffmpeg", {("h264", "tcp")}, VIDEO))
def test_ffmpeg_ss_starts_at_the_keyframe_before_the_position(
    cluster: list[NodeProc], media: dict[str, Path], tmp_path: Path, name: str, transport: str
) -> None:
    """``ffmpeg -ss 2.5`` records from the keyframe at or before 2.5 s of the video (frame
    50 with 1 s GOPs), every frame after it identical to the source up to the end."""
    out = tmp_path / "ss.ts"
    r = _run(["ffmpeg", "-hide_banner", "-loglevel", "warning", "-rtsp_transport", transport,
              "-ss", "2.5", "-i", _url(name, 2), "-map", "0:v", "-c", "copy", "-f", "mpegts",
              "-y", str(out)])  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "bad cseq" not in r.stderr, r.stderr
    want = _source_frames(media[name])
    matched = _match(want, framemd5(out))
    print(f"ffmpeg -ss 2.5 {name}/{transport}: first frame {matched[:1]}, "
          f"{len(matched)} frames, expected {len(want) - 2 * GOP}")  # fmt: skip
    assert matched[:1] == [2 * GOP], matched[:5]
    # libavformat's RTP MP2T depacketizer never flushes the last PES: the last frame
    # is missing for any server (a client limitation, not a lost packet).
    assert matched in (list(range(2 * GOP, n)) for n in (len(want) - 1, len(want))), matched


# --- mpv ----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "transport"), _cases("mpv", {("mpeg2", "udp")}))
def test_mpv_plays_to_the_end(
    cluster: list[NodeProc], media: dict[str, Path], tmp_path: Path, name: str, transport: str
) -> None:
    """mpv plays the stream to its end (exit reason End of file) and shows every video
    frame (``--vo=image`` writes one file per frame) or plays every audio sample
    (``--ao=pcm`` writes what it plays)."""
    shots = tmp_path / "frames"
    shots.mkdir()
    pcm = tmp_path / "out.pcm"
    r = _run(["mpv", "--no-config", "--msg-level=all=info", "--vo=image",
              "--vo-image-format=jpg", f"--vo-image-outdir={shots}", "--ao=pcm",
              f"--ao-pcm-file={pcm}", "--ao-pcm-waveheader=no", "--audio-format=s16",
              "--framedrop=no", f"--rtsp-transport={transport}", _url(name, 3)],
             timeout=90)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(End of file)" in r.stdout, r.stdout[-2000:]
    if name in VIDEO:
        got, want = len(list(shots.iterdir())), VIDEO_SECONDS * FPS
        print(f"mpv {name}/{transport}: {got} of {want} frames")
        # mpv plays through libavformat, which never flushes the last PES of RTP MP2T.
        assert want - 1 <= got <= want, (got, r.stdout[-2000:])
    else:
        rate = 44100 if name == "wav16" else 48000
        got, want = pcm.stat().st_size // 4, WAV_SECONDS * rate  # s16 stereo
        print(f"mpv {name}/{transport}: {got} of {want} sample frames")
        assert abs(got - want) <= rate // 100, (got, want)


# --- VLC ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "transport"), _cases("vlc", {("h264", "udp")}, VIDEO)[::2])
def test_vlc_as_debian_ships_it_gets_every_frame(
    cluster: list[NodeProc], media: dict[str, Path], tmp_path: Path, name: str, transport: str
) -> None:
    """Debian's cvlc (no live555: its SAT>IP client, plain RTP over UDP, MPEG-TS only)
    receives the stream byte-identical to the file (``--demux=dump`` writes what its
    access delivers), so every frame decodes as the source's.

    (Its ``--sout`` remuxer is no measure: it drops the last 5 frames of the local file
    too, and an isolated frame of a live input.)"""
    # pytest's tmp_path is private to root; VLC runs as nobody.
    work = Path(tempfile.mkdtemp(prefix="yima-vlc-"))
    try:
        work.chmod(0o777)
        out = work / "vlc.ts"
        r = _run(["cvlc", "-I", "dummy", "--play-and-exit", "--run-time",
                  str(VIDEO_SECONDS + 20), "--demux=dump", f"--demuxdump-file={out}",
                  _url(name, 1)], timeout=60, cwd=work, **_nobody())  # fmt: skip
        assert r.returncode == 0 and out.exists(), r.stderr[-2000:]
        got_bytes = out.read_bytes()
        got = framemd5(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    want = _source_frames(media[name])
    matched = _match(want, got)
    print(f"vlc {name}/{transport}: {len(got_bytes)} of {media[name].stat().st_size} bytes, "
          f"{len(matched)} of {len(want)} frames")  # fmt: skip
    assert got_bytes == media[name].read_bytes()
    assert matched == list(range(len(want))), matched


# --- GStreamer ------------------------------------------------------------------------


def _gst(url: str, tmp_path: Path, transport: str, *args: str) -> dict[str, object]:
    out = tmp_path / "gst.json"
    argv = ["/usr/bin/python3", str(GST_CLIENT), url, str(out), "--timeout", "40", *args]
    if transport == "tcp":
        argv.append("--tcp")
    r = _run(argv, timeout=70)
    assert out.exists(), r.stdout + r.stderr
    doc: dict[str, object] = json.loads(out.read_text())
    return doc


@pytest.mark.parametrize(("name", "transport"), _cases("gst", {("wav24", "udp")}))
def test_gstreamer_playbin_plays_every_frame(
    cluster: list[NodeProc], media: dict[str, Path], tmp_path: Path, name: str, transport: str
) -> None:
    """GStreamer playbin plays the stream to EOS: every video frame, in order and decoded
    identical to the source's, or every audio sample of a WAV."""
    doc = _gst(_url(name, 2), tmp_path, transport)
    assert doc["error"] is None and doc["eos"], doc
    if name in VIDEO:
        want = _source_frames(media[name])
        matched = _match(want, doc["video_md5"])  # type: ignore[arg-type]
        print(f"gst {name}/{transport}: {len(matched)} of {len(want)} frames")
        assert matched == list(range(len(want))), matched
    else:
        rate = 44100 if name == "wav16" else 48000
        print(f"gst {name}/{transport}: {doc['audio_frames']} of {WAV_SECONDS * rate} samples")
        assert doc["audio_frames"] == WAV_SECONDS * rate


@pytest.mark.parametrize(("name", "transport"), _cases("gst", {("h264", "tcp")}))
def test_gstreamer_playbin_seeks_to_the_keyframe(
    cluster: list[NodeProc], media: dict[str, Path], tmp_path: Path, name: str, transport: str
) -> None:
    """GStreamer playbin seeks (flushing, key unit) to 2.5 s: the first video frame after
    the seek is the keyframe at or before npt 2.5 (GStreamer's npt 0 is the first PCR),
    then every following frame to EOS, decoded identical to the source's; a WAV plays
    every sample from 2.5 s."""
    doc = _gst(_url(name, 2), tmp_path, transport, "--seek", "2.5")
    assert doc["error"] is None and doc["eos"] and doc["seek_ok"], doc
    if name in VIDEO:
        want = _source_frames(media[name])
        times = _frame_npt(media[name])
        keyframe = max(i for i in range(0, len(times), GOP) if times[i] <= 2.5 + 1e-3)
        matched = _match(want, doc["video_md5"])  # type: ignore[arg-type]
        # A frame decoded just before the flush may still be counted ahead of them.
        if matched and matched[0] != keyframe and keyframe in matched:
            matched = matched[matched.index(keyframe) :]
        print(f"gst seek {name}/{transport}: first frame {matched[:1]} (keyframe {keyframe} "
              f"at npt {times[keyframe]:.3f}), {len(matched)} frames, expected "
              f"{len(want) - keyframe}")  # fmt: skip
        assert matched == list(range(keyframe, len(want))), matched
    else:
        rate = 44100 if name == "wav16" else 48000
        frames = doc["audio_frames"]
        assert isinstance(frames, int)
        print(f"gst seek {name}/{transport}: {frames} audio frames from "
              f"{doc.get('audio_first')}, expected {(WAV_SECONDS - 2.5) * rate:.0f}")  # fmt: skip
        assert abs(frames - (WAV_SECONDS - 2.5) * rate) < 0.01 * rate


def _frame_npt(path: Path) -> list[float]:
    """Each video frame's presentation time on the server's timeline: PTS less the first
    PCR (ffprobe's packet pts_time, less the first PCR's time)."""
    r = _run(["ffprobe", "-v", "error", "-select_streams", "v", "-show_entries",
              "packet=pts_time", "-of", "csv=p=0", str(path)], check=True)  # fmt: skip
    pts = sorted(float(x.strip(",")) for x in r.stdout.split())
    return [t - _first_pcr(path) for t in pts]


def _first_pcr(path: Path) -> float:
    data = path.read_bytes()
    for at in range(0, len(data), 188):
        p = data[at : at + 12]
        if p[3] & 0x20 and p[4] >= 7 and p[5] & 0x10:
            base = (p[6] << 25) | (p[7] << 17) | (p[8] << 9) | (p[9] << 1) | (p[10] >> 7)
            return base / 90000
    raise AssertionError("no PCR")


# --- ffprobe --------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "transport"), _cases("ffprobe", {("wav24", "udp")}))
def test_ffprobe_sees_the_streams(
    cluster: list[NodeProc], media: dict[str, Path], name: str, transport: str
) -> None:
    """ffprobe of the RTSP URL finds the source's codecs (PCM as 16-bit big-endian L16),
    rate and channels, and a duration within a frame of the source's."""
    r = _run(["ffprobe", "-v", "error", "-rtsp_transport", transport, "-show_entries",
              "stream=codec_type,codec_name,sample_rate,channels,width,height:format=duration",
              "-of", "json", _url(name, 3)])  # fmt: skip
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    src = json.loads(_run(["ffprobe", "-v", "error", "-show_entries",
                           "stream=codec_type,codec_name,sample_rate,channels,width,height:"
                           "format=duration", "-of", "json", str(media[name])]).stdout)  # fmt: skip
    want = [{**s, "codec_name": "pcm_s16be"} if s["codec_type"] == "audio" and name.startswith("wav")
            else s for s in src["streams"]]  # fmt: skip
    strip = [{k: v for k, v in s.items() if k != "index"} for s in got["streams"]]
    want = [{k: v for k, v in s.items() if k != "index"} for s in want]
    print(f"ffprobe {name}/{transport}: {strip}, duration {got['format'].get('duration')}")
    assert sorted(map(str, strip)) == sorted(map(str, want)), (strip, want)
    duration = float(got["format"]["duration"])
    want_duration = float(src["format"]["duration"])
    if not name.startswith("wav"):
        # npt 0 is the first PCR, which goes out the mux delay before the first frame is
        # shown: the presentation is longer than ffprobe's PTS span of the file by that.
        start = _run(["ffprobe", "-v", "error", "-show_entries", "format=start_time", "-of",
                      "csv=p=0", str(media[name])], check=True).stdout  # fmt: skip
        want_duration += float(start) - _first_pcr(media[name])
    assert abs(duration - want_duration) < 0.1, (duration, want_duration)


def test_players_are_installed() -> None:
    """Every player this module drives is on the machine (make install puts them there)."""
    missing = [c for c in ("ffmpeg", "ffprobe", "mpv", "cvlc") if shutil.which(c) is None]
    r = _run(["/usr/bin/python3", "-c", "import gi; gi.require_version('Gst', '1.0')"])
    assert not missing and r.returncode == 0, (missing, r.stderr)
