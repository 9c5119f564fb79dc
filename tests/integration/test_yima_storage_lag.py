"""Reactor lag of a real yima node holding a 2-hour file after 10 scaling steps.

A thread in the test asks the node's admin API for a path that is no route
every 10 ms; the answer needs the node's reactor, so its latency is the
reactor's lag.  Stream start, ``/api/status``, ingest, a catalog change, a
restart (layouts loaded from disk) and one more scaling step must each keep
the worst answer under 50 ms: placement layouts are computed in a process pool
and cached per (file, scaling history), the catalog is replicated and written
per record off the reactor.  Each operation is measured from the same cold
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


def _ingest(node: NodeProc, path: Path, name: str) -> dict[str, Any]:
    """The CLI's upload, in this process (no interpreter start-up inside a measurement)."""
    query = {"name": name, "block_size": str(BLOCK)}
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
    catalog change, after a restart and while scaling, with 6000 blocks and 10+ steps."""
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
    print(f"reactor lag, worst probe answer per operation (ms): {lag}; attempts: {tries}")
    stalls = {k: v for k, v in lag.items() if v >= LIMIT_MS}
    assert not stalls, f"reactor stalls >= {LIMIT_MS} ms: {stalls} (all: {tries})"


def assert_streams(received: int) -> None:
    """The stream delivered something."""
    assert received > 0
