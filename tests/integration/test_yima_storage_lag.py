"""Reactor lag of a real yima node holding a 2-hour file after 10 scaling steps.

A thread in the test asks the node's admin API for a path that is no route
every 10 ms; the answer needs the node's reactor, so its latency is the
reactor's lag.  Stream start, ``/api/status``, ingest, a catalog change, a
restart (layouts loaded from disk), one more scaling step and seeks (PLAY with
Range from Ready and while playing, forwards and backwards, each looking for a
keyframe through 33 blocks) must each keep the worst answer under 50 ms:
placement layouts are computed in a process pool and cached per (file, scaling
history), the catalog is replicated and written per record off the reactor, the
time index is outside it (stored per file, loaded in the pool), and the seek's
block scans run in the pool.  Each operation is measured from the same cold
state up to five times and the best attempt counts (the machine is shared);
main before this work stalled 0.4-3.4 s on every attempt.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from yimaporc.admin.client import AdminClient
from yimaporc.secret import admin_token, load_or_create_secret
from yimaporc.testing.procs import NodeProc, wait_for
from yimaporc.yima.cli import upload

HOST = "127.0.114.1"
PORT, ADMIN, RTSP = 31946, 31080, 31554
BLOCK = 1316  # one RTP payload of MPEG-TS per block: many blocks, a small file
BLOCKS = 6000
SECONDS = 7200.0
LIMIT_MS = 50.0
SEEK_BLOCKS = 48


def long_ts(path: Path, blocks: int = BLOCKS, seconds: float = SECONDS) -> Path:
    """``blocks`` x 1316 bytes of MPEG-TS lasting ``seconds``: a PCR packet and 6 null packets
    per block (about 1.5 kbit/s for two hours)."""
    null = b"\x47\x1f\xff\x10" + b"\xff" * 184
    out = bytearray()
    for i in range(blocks):
        pcr = round(i * seconds / blocks * 27_000_000)
        base, ext = divmod(pcr, 300)
        base &= (1 << 33) - 1
        field = bytes([0x10, base >> 25, (base >> 17) & 0xFF, (base >> 9) & 0xFF,
                       (base >> 1) & 0xFF, ((base & 1) << 7) | 0x7E | (ext >> 8), ext & 0xFF])  # fmt: skip
        head = bytes([0x47, 0x01, 0x00, 0x20 | (i & 0x0F), 183])
        out += head + field + b"\xff" * (183 - len(field)) + null * 6
    path.write_bytes(bytes(out))
    return path


def _pts(value: int) -> bytes:
    value &= (1 << 33) - 1
    return bytes([0x21 | (value >> 29) & 0x0E, (value >> 22) & 0xFF, (value >> 14) & 0xFE | 1,
                  (value >> 7) & 0xFF, (value << 1) & 0xFE | 1])  # fmt: skip


def seek_ts(path: Path, payloads: int, seconds: float = SECONDS) -> Path:
    """``payloads`` x 1316 bytes of MPEG-TS lasting ``seconds``, for seeking: per payload a
    PCR packet and 6 packets that start a PES packet with a PTS on the PCR PID, none a
    random access point, so a keyframe search reads and parses every packet of its
    33 blocks and finds nothing (the worst case)."""
    out = bytearray()
    for i in range(payloads):
        pcr = round(i * seconds / payloads * 27_000_000)
        base, ext = divmod(pcr, 300)
        base &= (1 << 33) - 1
        field = bytes([0x10, base >> 25, (base >> 17) & 0xFF, (base >> 9) & 0xFF,
                       (base >> 1) & 0xFF, ((base & 1) << 7) | 0x7E | (ext >> 8), ext & 0xFF])  # fmt: skip
        out += bytes([0x47, 0x01, 0x00, 0x20 | (i * 7 & 0x0F), 183])
        out += field + b"\xff" * (183 - len(field))
        for k in range(1, 7):
            pes = b"\x00\x00\x01\xe0\x00\x00\x80\x80\x05" + _pts(base + 90_000)
            out += bytes([0x47, 0x41, 0x00, 0x10 | ((i * 7 + k) & 0x0F)])
            out += pes + b"\xff" * (184 - len(pes))
    path.write_bytes(bytes(out))
    return path


class LagProbe:
    """GET a no-route path every 10 ms on one keep-alive connection; keep each latency."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.samples: list[tuple[float, float]] = []  # (started, seconds)
        self._stop = threading.Event()
        self._answered = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
                conn.request("GET", "/api/lag-probe")
                conn.getresponse().read()
            except OSError:
                if conn is not None:
                    conn.close()
                conn = None
                self._stop.wait(0.05)  # node restarting
                continue
            with self._answered:
                self.samples.append((started, time.perf_counter() - started))
                self._answered.notify_all()
            self._stop.wait(0.01)  # the probe's period
        if conn is not None:
            conn.close()

    def __enter__(self) -> LagProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def wait_for_probes(self, since: float, count: int, timeout: float = 30) -> None:
        """Block until ``count`` probes started at ``since`` or later have answered."""
        with self._answered:
            self._answered.wait_for(
                lambda: sum(1 for t, _ in self.samples if t >= since) >= count, timeout
            )

    @contextmanager
    def window(self, what: str, results: dict[str, float]) -> Iterator[None]:
        """Record the worst latency (ms) of probes started while the block runs."""
        start = time.perf_counter()
        yield
        # Even a quick operation gets a few probes; then the one in flight must answer.
        self.wait_for_probes(start, 5)
        end = time.perf_counter()
        self.wait_for_probes(end, 1)
        inside = [dt for t, dt in self.samples if start <= t <= end]
        assert inside, f"no probe answered during {what}"
        results[what] = round(1000 * max(inside), 1)


def _client(node: NodeProc) -> AdminClient:
    assert node.secret_file is not None
    return AdminClient(node.admin_url, admin_token(load_or_create_secret(node.secret_file, False)))


def _ingest(node: NodeProc, path: Path, name: str, block: int = BLOCK) -> dict[str, Any]:
    """The CLI's upload, in this process (no interpreter start-up inside a measurement)."""
    query = {"name": name, "block_size": str(block)}
    out: dict[str, Any] = upload(_client(node), "/api/yima/media", query, path)
    return out


def _rtsp(sock: socket.socket, request: str) -> str:
    sock.sendall(request.encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "RTSP connection closed"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    need = int(length.group(1)) if length else 0
    while len(rest) < need:
        rest += sock.recv(65536)
    text = head.decode() + "\r\n\r\n" + rest[:need].decode()
    assert text.startswith("RTSP/1.0 200"), text
    return text


def _stream(name: str, seconds: float) -> int:
    """DESCRIBE, SETUP (interleaved over TCP), PLAY, read ``seconds`` of RTP, TEARDOWN;
    the bytes received."""
    url = f"rtsp://{HOST}:{RTSP}/{name}"
    with socket.create_connection((HOST, RTSP), timeout=10) as sock:
        sdp = _rtsp(sock, f"DESCRIBE {url} RTSP/1.0\r\nCSeq: 1\r\nAccept: application/sdp\r\n\r\n")
        controls = re.findall(r"(?m)^a=control:(\S+)", sdp)
        track = next(c for c in controls if c != "*")
        track_url = track if "://" in track else f"{url}/{track}"
        reply = _rtsp(sock, f"SETUP {track_url} RTSP/1.0\r\nCSeq: 2\r\n"
                            "Transport: RTP/AVP/TCP;unicast;interleaved=0-1\r\n\r\n")  # fmt: skip
        found = re.search(r"(?im)^session:\s*([^;\r\n]+)", reply)
        assert found is not None, reply
        session = found.group(1).strip()
        sock.sendall(f"PLAY {url} RTSP/1.0\r\nCSeq: 3\r\nSession: {session}\r\n\r\n".encode())
        received = 0
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            try:
                received += len(sock.recv(65536))
            except TimeoutError:
                break
        sock.sendall(f"TEARDOWN {url} RTSP/1.0\r\nCSeq: 4\r\nSession: {session}\r\n\r\n".encode())
    return received


class _RtspConn:
    """One RTSP connection with RTP interleaved over it: replies are read past the
    ``$`` frames of the stream."""

    def __init__(self, name: str) -> None:
        self.url = f"rtsp://{HOST}:{RTSP}/{name}"
        self.sock = socket.create_connection((HOST, RTSP), timeout=10)
        self.buf = b""
        self.cseq = 0
        self.session = ""
        self.rtp = 0  # interleaved bytes received

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, "RTSP connection closed"
        self.buf += chunk

    def _skip_frames(self) -> None:
        while self.buf[:1] == b"$":
            while len(self.buf) < 4:
                self._fill()
            end = 4 + int.from_bytes(self.buf[2:4], "big")
            while len(self.buf) < end:
                self._fill()
            self.rtp += end - 4
            self.buf = self.buf[end:]

    def request(self, method: str, url: str, headers: str = "") -> str:
        """Send a request, return the reply (asserting 200)."""
        self.cseq += 1
        session = f"Session: {self.session}\r\n" if self.session else ""
        self.sock.sendall(f"{method} {url} RTSP/1.0\r\nCSeq: {self.cseq}\r\n{session}"
                          f"{headers}\r\n".encode())  # fmt: skip
        while True:
            self._skip_frames()
            if b"\r\n\r\n" in self.buf and not self.buf.startswith(b"$"):
                break
            self._fill()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        need = int(length.group(1)) if length else 0
        while len(rest) < need:
            self._fill()
            head, _, rest = self.buf.partition(b"\r\n\r\n")
        self.buf = rest[need:]
        text = head.decode() + "\r\n\r\n" + rest[:need].decode()
        assert text.startswith("RTSP/1.0 200"), text
        return text

    def setup(self) -> None:
        sdp = self.request("DESCRIBE", self.url, "Accept: application/sdp\r\n")
        track = next(c for c in re.findall(r"(?m)^a=control:(\S+)", sdp) if c != "*")
        track_url = track if "://" in track else f"{self.url}/{track}"
        reply = self.request("SETUP", track_url,
                             "Transport: RTP/AVP/TCP;unicast;interleaved=0-1\r\n")  # fmt: skip
        found = re.search(r"(?im)^session:\s*([^;\r\n]+)", reply)
        assert found is not None, reply
        self.session = found.group(1).strip()

    def seek(self, npt: float) -> float:
        """PLAY from ``npt``; the seconds the answer took (its RTP-Info checked)."""
        started = time.perf_counter()
        reply = self.request("PLAY", self.url, f"Range: npt={npt:.3f}-\r\n")
        took = time.perf_counter() - started
        assert re.search(r"(?im)^rtp-info:.*seq=\d+", reply), reply
        found = re.search(r"(?im)^range:\s*npt=([\d.]+)-", reply)
        assert found is not None and abs(float(found.group(1)) - npt) < 2.5, reply
        return took

    def read_for(self, seconds: float) -> None:
        """Read the stream for ``seconds`` (interleaved frames only, no reply pending)."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            self._fill()
            self._skip_frames()


def _status(node: NodeProc) -> dict[str, object]:
    doc = node.status()
    assert doc is not None
    return doc


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProc]:
    """One yima node with three disks and RTSP, on 127.0.114.1."""
    secret = tmp_path / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    extra = [a for d in "abc" for a in ("--disk", str(tmp_path / d))]
    extra += ["--rtsp", f"tcp:{RTSP}:interface={HOST}"]
    n = NodeProc("yima", "y1", HOST, tmp_path / "data", PORT, ADMIN, extra=extra,
                 secret_file=secret)  # fmt: skip
    n.start()
    try:
        yield n
    finally:
        n.kill(signal.SIGTERM)


def test_no_reactor_stall_with_a_two_hour_file_after_ten_scaling_steps(
    node: NodeProc, tmp_path: Path
) -> None:
    """Worst reactor lag < 50 ms while ingesting, streaming, answering status, after a
    catalog change, after a restart, while scaling and seeking, with 6000 blocks and
    10+ steps."""
    wait_for(lambda: (s := node.status()) is not None and len(s["disks"]) == 3, 30, "3 disks")
    # Ten scaling steps before the media arrive (nothing to move, so they are quick).
    client = _client(node)
    for k in range(5):
        client.post("/api/yima/disks", {"path": str(tmp_path / f"extra{k}")})
        oldest = _status(node)["disks"][0]["disk_id"]  # type: ignore[index]
        client.post("/api/yima/disks/remove", {"disk_id": oldest})
    status = _status(node)
    assert status["storage"]["scaling_steps"] == 10  # type: ignore[index]
    films = [long_ts(tmp_path / "film.ts")]
    clip = long_ts(tmp_path / "clip.ts", blocks=20, seconds=20)
    lag: dict[str, float] = {}
    tries: dict[str, list[float]] = {}
    clips: list[str] = []

    def change_catalog() -> None:
        clips.append(f"clip{len(clips)}")
        _ingest(node, clip, clips[-1])

    def ingest() -> None:
        k = len(films)
        out = _ingest(node, films[0], "film" if k == 1 else f"film{k}")
        assert out["streamable"] and out["blocks"] == BLOCKS
        films.append(films[0])

    def status() -> None:
        for _ in range(20):
            doc = _status(node)
        blocks = sum(d["blocks"] for d in doc["disks"])  # type: ignore[attr-defined]
        # Counted from layouts that are cached (or computed in the pool), all of them.
        assert blocks == (len(films) - 1) * (BLOCKS + BLOCKS // 2) + len(clips) * (20 + 10)

    def restart() -> None:
        node.kill(signal.SIGTERM)
        node.start()

    def back_and_stream() -> None:
        wait_for(lambda: node.status() is not None, 30, "the node back")
        for _ in range(3):
            _status(node)
        assert _stream("film", 1.5) > 0

    k = iter(range(9, 100))

    def scale() -> None:
        out = _client(node).post("/api/yima/disks", {"path": str(tmp_path / f"extra{next(k)}")})
        assert out["moved"] > 0

    def none() -> None:
        pass

    answers: dict[str, float] = {}

    def seek_film() -> None:
        if not answers:  # once: 2 hours in 48 blocks of 336,896 bytes (the default size)
            path = seek_ts(tmp_path / "seek.ts", SEEK_BLOCKS * 256)
            out = _ingest(node, path, "seekfilm", 256 * 1316)
            assert out["streamable"] and out["blocks"] == SEEK_BLOCKS
            answers["ingested"] = 1

    def seeks() -> None:
        """From Ready to 90 min, then while playing back to 10 min, forward to 1:56:40,
        back to 30 min and to 2 s: each answered, RTP flowing after each."""
        conn = _RtspConn("seekfilm")
        try:
            conn.setup()
            for npt in (5400.0, 600.0, 7000.0, 1800.0, 2.0):
                took = conn.seek(npt)
                answers[f"{npt:g}"] = round(1000 * took, 1)
                before = conn.rtp
                conn.read_for(0.3)
                assert conn.rtp > before, f"nothing streamed after the seek to {npt}"
            conn.request("TEARDOWN", conn.url)
        finally:
            conn.close()

    with LagProbe(HOST, ADMIN) as probe:

        def measure(what: str, prepare: Callable[[], None], operation: Callable[[], None]) -> None:
            # A stall of our own code recurs on every attempt (each prepares the same cold
            # state: main's code stalled 0.4-3.4 s on every one); a machine busy elsewhere
            # (2 cores shared by many test runs) delays some attempts, not all five.
            for _ in range(5):
                prepare()
                with probe.window(what, lag):
                    operation()
                tries.setdefault(what, []).append(lag[what])
                if lag[what] < LIMIT_MS:
                    break
            lag[what] = min(tries[what])

        probe.wait_for_probes(0.0, 5)
        measure("idle", none, lambda: probe.wait_for_probes(time.perf_counter(), 40))
        measure("ingest", none, ingest)
        measure("status after a catalog change", change_catalog, status)
        measure("catalog change (ingest of another file)", none, change_catalog)
        measure("stream start after a catalog change", change_catalog,
                lambda: assert_streams(_stream("film", 1.5)))  # fmt: skip
        measure("restart: status + stream start", restart, back_and_stream)
        measure("scaling step", none, scale)
        measure("seeks (Range from Ready and while playing, back and forth)", seek_film, seeks)
    print(f"reactor lag, worst probe answer per operation (ms): {lag}; attempts: {tries}")
    print(f"seek answers, last attempt (ms, by npt): {answers}")
    stalls = {k: v for k, v in lag.items() if v >= LIMIT_MS}
    assert not stalls, f"reactor stalls >= {LIMIT_MS} ms: {stalls} (all: {tries})"


def assert_streams(received: int) -> None:
    """The stream delivered something."""
    assert received > 0
