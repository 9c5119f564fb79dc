"""Seeking on real `twistd yima-node` processes: a 90 s MPEG-2 TS clip on 3 nodes.

Addresses 127.0.108.x only.  Seek latency by position is printed (``-s`` shows it).
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from yimaporc.testing.procs import NodeProc, framemd5, views_agree, wait_for

RTSP = 18554
HOST = "127.0.108.1"
DURATION = 90.0
URL = f"rtsp://{HOST}:{RTSP}/long"


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """90 s of testsrc MPEG-2 video (1 s GOPs) with a sine tone in MPEG-TS at 6 Mbit/s
    (``-muxrate``: the easy testsrc pads to a constant rate, ~68 MB)."""
    path = tmp_path_factory.mktemp("seekmedia") / "long.ts"
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi",
         "-i", f"testsrc=size=480x270:rate=25:duration={DURATION}",
         "-f", "lavfi", "-i", f"sine=frequency=440:duration={DURATION}",
         "-c:v", "mpeg2video", "-b:v", "3M", "-g", "25", "-c:a", "mp2", "-b:a", "128k",
         "-muxrate", "6000000", "-f", "mpegts", "-y", str(path)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def seek_cluster(
    tmp_path_factory: pytest.TempPathFactory, long_clip: Path
) -> Iterator[list[NodeProc]]:
    """3 bipartite nodes on 127.0.108.1-3 holding the clip as ``long``; stopped afterwards."""
    tmp = tmp_path_factory.mktemp("seekcluster")
    secret = tmp / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    nodes = [
        NodeProc(
            "yima", f"s{i}", f"127.0.108.{i}", tmp / f"s{i}" / "data", 17946, 18080,
            extra=["--rtsp", f"tcp:{RTSP}:interface=127.0.108.{i}"],
            join=[] if i == 1 else ["127.0.108.1:17946"], secret_file=secret,
        )
        for i in (1, 2, 3)
    ]  # fmt: skip
    try:
        for n in nodes:
            n.start()
        wait_for(lambda: views_agree(nodes), 30, "3 yima nodes to agree")
        wait_for(lambda: all(len((n.status() or {}).get("disks", [])) == 3 for n in nodes), 30,
                 "disks")  # fmt: skip
        subprocess.run(
            [sys.executable, "-m", "yimaporc.cli", "media", "ingest", str(long_clip), "--name",
             "long", "--block-size", "131600", "--admin", nodes[0].admin_url, "--secret-file",
             str(secret)],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        yield nodes
    finally:
        for n in nodes:
            n.kill(signal.SIGTERM)


class RawRtsp:
    """A minimal RTSP client over TCP interleaved: requests, replies, RTP frames in order."""

    def __init__(self, host: str = HOST, source: str = "127.0.108.9") -> None:
        self.sock = socket.create_connection((host, RTSP), timeout=120, source_address=(source, 0))
        self.buf = bytearray()
        self.cseq = 0
        self.session = ""
        #: RTP frames (channel 0) read while waiting for a reply, in arrival order.
        self.frames: list[bytes] = []

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        more = self.sock.recv(65536)
        if not more:
            raise ConnectionError("server closed")
        self.buf += more

    def _frame(self) -> bytes | None:
        """Take one interleaved frame off the buffer (None if incomplete)."""
        if len(self.buf) < 4 or len(self.buf) < 4 + int.from_bytes(self.buf[2:4], "big"):
            return None
        n = int.from_bytes(self.buf[2:4], "big")
        channel, data = self.buf[1], bytes(self.buf[4 : 4 + n])
        del self.buf[: 4 + n]
        if channel == 0:
            self.frames.append(data)
        return data

    def request(self, method: str, url: str, *headers: str) -> tuple[str, dict[str, str]]:
        """Send a request; return (status line, headers) of its reply."""
        self.cseq += 1
        lines = [f"{method} {url} RTSP/1.0", f"CSeq: {self.cseq}", *headers]
        if self.session:
            lines.append(f"Session: {self.session}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while True:
            while self.buf[:1] == b"$":
                if self._frame() is None:
                    self._fill()
            if self.buf[:4] == b"RTSP" and b"\r\n\r\n" in self.buf:
                break
            self._fill()
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        text = head.decode().split("\r\n")
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in text[1:])}
        body = int(hdrs.get("content-length", "0"))
        while len(rest) < body:
            self._fill()
            head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf[:] = rest[body:]
        if "session" in hdrs and not self.session:
            self.session = hdrs["session"].split(";")[0]
        return text[0], hdrs

    def setup(self) -> None:
        """DESCRIBE and SETUP over TCP interleaved (a standard client, no opt-in)."""
        self.request("DESCRIBE", URL, "Accept: application/sdp")
        status, _ = self.request(
            "SETUP", f"{URL}/track1", "Transport: RTP/AVP/TCP;unicast;interleaved=0-1"
        )
        assert " 200 " in status, status

    def next_rtp(self) -> bytes:
        """The next RTP frame after everything read so far."""
        start = len(self.frames)
        while len(self.frames) == start:
            if self._frame() is None:
                self._fill()
        return self.frames[start]


def _rtp_info_seq(hdrs: dict[str, str]) -> tuple[str, int, int]:
    info = dict(p.split("=", 1) for p in hdrs["rtp-info"].split(",")[0].split(";"))
    return info["url"], int(info["seq"]), int(info["rtptime"])


def _seq(frame: bytes) -> int:
    return int.from_bytes(frame[2:4], "big")


def test_seek_latency_by_position_and_rtp_info(seek_cluster: list[NodeProc]) -> None:
    """PLAY Range at 0, 25, 50, 90 % (fresh sessions, Ready) is answered in under 1 s;
    RTP-Info has an absolute URL and the seq and rtptime of the first packet received."""
    measured: dict[str, float] = {}
    to_first: dict[str, float] = {}
    seen = []
    for frac in (0.0, 0.25, 0.5, 0.9):
        c = RawRtsp()
        try:
            c.setup()
            t0 = time.monotonic()
            status, hdrs = c.request("PLAY", URL, f"Range: npt={DURATION * frac:.3f}-")
            t1 = time.monotonic()
            measured[f"{frac:.0%}"] = t1 - t0
            first = c.next_rtp()
            to_first[f"{frac:.0%}"] = time.monotonic() - t1
            seen.append((frac, status, hdrs, first))
            c.request("TEARDOWN", URL)
        finally:
            c.close()
    print("PLAY Range latency by position (s):",
          {k: round(v, 3) for k, v in measured.items()})  # fmt: skip
    print("PLAY reply to first RTP packet (s):", {k: round(v, 3) for k, v in to_first.items()})
    assert max(measured.values()) < 1.0, measured
    for frac, status, hdrs, first in seen:
        assert " 200 " in status, status
        url, seq, rtptime = _rtp_info_seq(hdrs)
        assert url == f"{URL}/track1"
        assert _seq(first) == seq
        assert int.from_bytes(first[4:8], "big") == rtptime
        start = float(hdrs["range"][4:].split("-")[0])
        # From the PAT before the keyframe at or before the position (1 s GOPs, and the
        # keyframe's bytes go out up to the mux delay before it is shown).
        assert DURATION * frac - 2.0 <= start <= DURATION * frac + 1e-3, hdrs["range"]


def test_seek_while_playing_keeps_seq_continuous_and_plain_rtp(
    seek_cluster: list[NodeProc],
) -> None:
    """PLAY Range while Playing seeks forwards and backwards, PAUSE answers a Range, PLAY
    resumes: sequence numbers continue by one across each; the relay sends plain 12-byte
    RTP (X bit 0) carrying whole TS packets to a client that did not opt in."""
    c = RawRtsp()
    try:
        c.setup()
        status, hdrs = c.request("PLAY", URL, "Range: npt=10-")
        assert " 200 " in status
        first = c.next_rtp()
        assert _seq(first) == _rtp_info_seq(hdrs)[1]
        latencies, to_first = [], []
        for target in (60.0, 20.0, 81.0, 5.0):  # forwards, backwards, forwards, backwards
            for _ in range(50):
                c.next_rtp()
            t0 = time.monotonic()
            status, hdrs = c.request("PLAY", URL, f"Range: npt={target}-")
            t1 = time.monotonic()
            latencies.append(t1 - t0)
            assert " 200 " in status, status
            before = c.frames[-1]
            _, seq, rtptime = _rtp_info_seq(hdrs)
            after = c.next_rtp()
            to_first.append(time.monotonic() - t1)
            assert seq == (_seq(before) + 1) & 0xFFFF, (target, _seq(before), seq)
            assert _seq(after) == seq and int.from_bytes(after[4:8], "big") == rtptime
            assert target - 2.0 <= float(hdrs["range"][4:].split("-")[0]) <= target + 1e-3
        print("PLAY Range while playing, latency (s):", [round(x, 3) for x in latencies])
        print("  reply to first RTP packet (s):", [round(x, 3) for x in to_first])
        assert max(latencies) < 1.0, latencies
        for _ in range(20):
            c.next_rtp()
        status, hdrs = c.request("PAUSE", URL)
        assert " 200 " in status and hdrs["range"].startswith("npt="), hdrs
        paused_at = float(hdrs["range"][4:].split("-")[0])
        assert 3.0 <= paused_at < 8.0, paused_at  # from the keyframe at or before 5 s
        # What was sent before the pause instant may still arrive after PAUSE's answer;
        # PLAY resumes with the packet RTP-Info names, the next in line.
        mark = len(c.frames)
        status, hdrs = c.request("PLAY", URL)
        assert " 200 " in status
        _, seq, rtptime = _rtp_info_seq(hdrs)
        while seq not in [_seq(f) for f in c.frames[mark:]]:
            c.next_rtp()
        resumed = next(f for f in c.frames[mark:] if _seq(f) == seq)
        assert int.from_bytes(resumed[4:8], "big") == rtptime
        for _ in range(20):
            c.next_rtp()
        seqs = [_seq(f) for f in c.frames]
        steps = [(b - a) & 0xFFFF for a, b in itertools.pairwise(seqs)]
        assert set(steps) == {1}, [(i, x) for i, x in enumerate(steps) if x != 1]
        for frame in c.frames:
            assert frame[0] == 0x80, f"V=2, no padding, X=0, CC=0: {frame[0]:#x}"
            assert (len(frame) - 12) % 188 == 0 and frame[12] == 0x47
        c.request("TEARDOWN", URL)
    finally:
        c.close()


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_ffmpeg_seeks_with_ss(
    seek_cluster: list[NodeProc], long_clip: Path, tmp_path: Path, transport: str
) -> None:
    """``ffmpeg -ss 30 -t 5`` records frames starting near 30 s of the source, decoded
    identical to the source's, with no ``bad cseq`` in its log."""
    out = tmp_path / "ss.ts"
    r = subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "warning", "-rtsp_transport", transport,
         "-ss", "30", "-i", f"rtsp://127.0.108.2:{RTSP}/long", "-t", "5", "-map", "0:v",
         "-c", "copy", "-f", "mpegts", "-y", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "bad cseq" not in r.stderr, r.stderr
    want, got = framemd5(long_clip), framemd5(out)
    assert len(got) >= 25, (len(got), r.stderr)
    index = {h: i for i, h in reversed(list(enumerate(want)))}
    matched = [index.get(h) for h in got]
    first = next(i for i in matched if i is not None)
    print(f"ffmpeg -ss 30 over {transport}: {len(got)} frames, first source frame {first} ({first / 25:.2f} s), "
          f"{sum(i is not None for i in matched)} identical to the source")  # fmt: skip
    assert 29.0 <= first / 25 <= 33.0, first / 25  # within the GOPs after 30 s
    run = matched[matched.index(first) :][:25]
    assert run == list(range(first, first + 25)), run


def test_relay_sends_plain_rtp_over_udp_to_a_standard_client(
    seek_cluster: list[NodeProc],
) -> None:
    """Over UDP, a client without ``x-yima-fanout`` gets RFC 3550 RTP: X bit 0, a 12-byte
    header, the SSRC from SETUP, whole TS packets, numbers going on by one from RTP-Info."""
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtp.bind(("127.0.108.9", 0))
    rtp.settimeout(10)
    port = rtp.getsockname()[1]
    c = RawRtsp()
    try:
        c.request("DESCRIBE", URL, "Accept: application/sdp")
        status, hdrs = c.request(
            "SETUP", f"{URL}/track1", f"Transport: RTP/AVP;unicast;client_port={port}-{port + 1}"
        )
        assert " 200 " in status, status
        ssrc = int(hdrs["transport"].split("ssrc=")[1].split(";")[0], 16)
        status, hdrs = c.request("PLAY", URL, "Range: npt=40-")
        _, seq, _ = _rtp_info_seq(hdrs)
        got = [rtp.recvfrom(65536)[0] for _ in range(200)]
        c.request("TEARDOWN", URL)
    finally:
        c.close()
        rtp.close()
    assert _seq(got[0]) == seq
    for data in got:
        assert data[0] == 0x80 and int.from_bytes(data[8:12], "big") == ssrc
        assert (len(data) - 12) % 188 == 0 and data[12] == 0x47
    assert [(_seq(d) - seq) & 0xFFFF for d in got] == list(range(200))
