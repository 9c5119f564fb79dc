"""Hostile RTSP clients against real `twistd yima-node` processes (issue 13, items 1 and 4):
no reflection of media to a host that never spoke RTSP, and a SETUP flood from one client
neither fills the node's fds nor locks ffmpeg out nor changes the cluster view."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from yimaporc.rtsp import RtspClientConnection
from yimaporc.rtsp._events import NEED_DATA
from yimaporc.testing.procs import NodeProc, assert_lag_small, framemd5, views_agree, wait_for
from yimaporc.yima.media.sample import make_sample_ts

NET = "127.0.103"
RTSP = 18554
URL = f"rtsp://{NET}.1:{RTSP}/clip"
CLIENT = f"{NET}.10"  # the reflection test's RTSP client
VICTIM = f"{NET}.99"  # never speaks RTSP
ATTACKER = f"{NET}.20"  # the SETUP flood's one address


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProc]]:
    """3 bipartite yima nodes on 127.0.103.1-3 holding a 4 s clip; never-played sessions
    live 3 s (--rtsp-setup-timeout) so the flood's reaping happens within the test."""
    tmp = tmp_path_factory.mktemp("hostile")
    secret = tmp / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    procs = [
        NodeProc(
            "yima", f"h{i}", f"{NET}.{i}", tmp / f"h{i}" / "data", 17946, 18080,
            extra=["--rtsp", f"tcp:{RTSP}:interface={NET}.{i}", "--rtsp-setup-timeout", "3"],
            join=[] if i == 1 else [f"{NET}.1:17946"], secret_file=secret,
        )
        for i in (1, 2, 3)
    ]  # fmt: skip
    try:
        for n in procs:
            n.start()
        wait_for(lambda: views_agree(procs), 30, "3 yima nodes to agree")
        wait_for(lambda: all(len((n.status() or {}).get("disks", [])) == 3 for n in procs), 30,
                 "disks")  # fmt: skip
        clip = make_sample_ts(tmp / "clip.ts", 4)
        subprocess.run(
            [sys.executable, "-m", "yimaporc.cli", "media", "ingest", str(clip), "--name", "clip",
             "--block-size", "13160", "--admin", procs[0].admin_url, "--secret-file", str(secret)],
            check=True, capture_output=True,
        )  # fmt: skip
        yield procs
    finally:
        for n in procs:
            n.kill(signal.SIGTERM)


class Rtsp:
    """A blocking RTSP client from a chosen source address (sans-IO parsing)."""

    def __init__(self, source: str, host: str = f"{NET}.1") -> None:
        self.sock = socket.create_connection((host, RTSP), timeout=15, source_address=(source, 0))
        self.conn = RtspClientConnection()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def responses(self, n: int) -> list[int]:
        """Read ``n`` responses; their status codes (interleaved data is skipped)."""
        out: list[int] = []
        while len(out) < n:
            event = self.conn.next_event()
            if event is NEED_DATA:
                data = self.sock.recv(1 << 16)
                assert data, "the server closed the connection"
                self.conn.receive_data(data)
            elif hasattr(event, "response"):
                out.append(event.response.status)  # type: ignore[union-attr]
        return out

    def ask(self, method: str, url: str, headers: list[tuple[str, str]] | None = None) -> int:
        self.send(self.conn.request(method, url, headers or [])[1])
        return self.responses(1)[0]

    def close(self) -> None:
        self.sock.close()


def _udp_pair(host: str) -> tuple[socket.socket, socket.socket]:
    """Two UDP sockets on ``host`` with consecutive ports (RTP, RTCP)."""
    for _ in range(50):
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        a.bind((host, 0))
        port = a.getsockname()[1]
        if port % 2 == 0 and port < 65000:
            b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                b.bind((host, port + 1))
                return a, b
            except OSError:
                b.close()
        a.close()
    raise AssertionError(f"no consecutive UDP ports on {host}")


def _fds(node: NodeProc) -> int:
    assert node.process is not None
    return len(os.listdir(f"/proc/{node.process.pid}/fd"))


def _epochs(nodes: list[NodeProc]) -> list[int]:
    return [(n.status() or {}).get("epoch", -1) for n in nodes]


def _status_latency(node: NodeProc) -> float:
    t0 = time.monotonic()
    with urllib.request.urlopen(node.admin_url + "/api/status", timeout=10) as r:
        r.read()
    return time.monotonic() - t0


def test_media_never_goes_to_a_destination_other_than_the_client(nodes: list[NodeProc]) -> None:
    """SETUP naming destination=127.0.103.99 (plain and fan-out) is refused with 461, a PLAY
    after it streams nothing there, while the client's own session streams to itself."""
    victim = _udp_pair(VICTIM)
    own = _udp_pair(CLIENT)
    vport, oport = victim[0].getsockname()[1], own[0].getsockname()[1]
    epochs = _epochs(nodes)
    c = Rtsp(CLIENT)
    try:
        for extra in ("", ";x-yima-fanout"):
            transport = f"RTP/AVP;unicast;destination={VICTIM};client_port={vport}-{vport + 1}"
            status = c.ask("SETUP", URL + "/track1", [("Transport", transport + extra)])
            assert status == 461, f"SETUP with a foreign destination answered {status}"
            if c.conn.session_id is not None:  # (not reached while the rule holds)
                c.ask("PLAY", URL)
        mine = f"RTP/AVP;unicast;client_port={oport}-{oport + 1}"
        assert c.ask("SETUP", URL + "/track1", [("Transport", mine)]) == 200
        assert c.ask("PLAY", URL) == 200
        got = {"own": 0, "victim": 0}
        deadline = time.monotonic() + 20
        socks = {own[0]: "own", own[1]: "own", victim[0]: "victim", victim[1]: "victim"}
        # Until the client's own stream is well under way (and 2 s more), count arrivals.
        until = None
        while time.monotonic() < (until or deadline):
            ready, _, _ = select.select(list(socks), [], [], 0.2)
            for s in ready:
                s.recv(65536)
                got[socks[s]] += 1
            if until is None and got["own"] >= 100:
                until = time.monotonic() + 2
        assert got["own"] >= 100, f"the client's own stream did not arrive: {got}"
        assert got["victim"] == 0, f"media reached a host that never spoke RTSP: {got}"
        status = nodes[0].status() or {}
        assert status["rtsp"]["refused_destinations"] >= 2
        assert _epochs(nodes) == epochs
        assert_lag_small(nodes)
    finally:
        c.close()
        for s in (*victim, *own):
            s.close()


def test_setup_flood_from_one_client_is_harmless(nodes: list[NodeProc], tmp_path: Path) -> None:
    """3,000 pipelined SETUPs without PLAY from one address: the node's fds stay bounded,
    the surplus gets 453, ffmpeg from another address plays meanwhile, the sessions are
    reaped, and no node's view changes."""
    node = nodes[0]
    wait_for(lambda: (node.status() or {}).get("rtsp", {}).get("sessions") == 0, 30, "no sessions")
    fds_before = _fds(node)
    epochs = _epochs(nodes)
    attackers = [Rtsp(ATTACKER) for _ in range(4)]
    statuses: list[int] = []
    fds_peak = 0
    latencies = []
    t0 = time.monotonic()
    transport = [("Transport", "RTP/AVP;unicast;client_port=40000-40001")]
    try:
        for _round in range(3):
            for a in attackers:
                a.conn.session = None  # each SETUP asks for a new session
                a.send(b"".join(a.conn.request("SETUP", URL + "/track1", transport)[1]
                                for _ in range(250)))  # fmt: skip
            for a in attackers:
                statuses += a.responses(250)
            fds_peak = max(fds_peak, _fds(node))
            latencies.append(_status_latency(node))
        flood_s = time.monotonic() - t0
        assert len(statuses) == 3000
        accepted = statuses.count(200)
        assert accepted <= 64 and statuses.count(453) == 3000 - accepted, set(statuses)
        # ffmpeg from another loopback address (127.0.0.1) still plays, over UDP.
        out = tmp_path / "during.ts"
        subprocess.run(
            ["ffmpeg", "-hide_banner", "-loglevel", "error", "-rtsp_transport", "udp", "-i", URL,
             "-c", "copy", "-f", "mpegts", "-y", str(out)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        assert len(framemd5(out)) > 50
        status = node.status() or {}
        assert status["rtsp"]["refused_sessions"] >= 3000 - accepted
    finally:
        for a in attackers:
            a.close()
    # The flood's sessions expire (3 s) and are reaped without a stall or a view change.
    wait_for(lambda: (node.status() or {}).get("rtsp", {}).get("sessions") == 0, 30, "reaping")
    latencies.append(_status_latency(node))
    fds_after = _fds(node)
    print(f"\nflood: {flood_s:.2f} s for 3000 SETUPs, fds {fds_before} -> peak {fds_peak} -> "
          f"{fds_after}, status latency max {max(latencies) * 1000:.0f} ms")  # fmt: skip
    assert fds_peak - fds_before < 50, (fds_before, fds_peak)
    assert fds_after - fds_before < 10, (fds_before, fds_after)
    assert max(latencies) < 2.0
    assert _epochs(nodes) == epochs
    assert views_agree(nodes)
    print("reactor lag max ms:", assert_lag_small(nodes))


def test_udp_session_ends_soon_after_its_rtsp_connection_closes(nodes: list[NodeProc]) -> None:
    """A played UDP session whose client drops the RTSP connection is torn down within
    the 10 s grace (not the 60 s session timeout), and its relay socket closed."""
    node = nodes[0]
    wait_for(lambda: (node.status() or {}).get("rtsp", {}).get("sessions") == 0, 30, "no sessions")
    own = _udp_pair(CLIENT)
    port = own[0].getsockname()[1]
    c = Rtsp(CLIENT)
    try:
        transport = f"RTP/AVP;unicast;client_port={port}-{port + 1}"
        assert c.ask("SETUP", URL + "/track1", [("Transport", transport)]) == 200
        assert c.ask("PLAY", URL) == 200
        assert (node.status() or {})["rtsp"]["relay_ports"] == 1
    finally:
        c.close()
        closed = time.monotonic()
    try:
        wait_for(lambda: (node.status() or {})["rtsp"]["sessions"] == 0, 20, "the session to end")
        ended = time.monotonic() - closed
        assert 8 < ended < 15, f"ended {ended:.1f} s after the connection closed"
        assert (node.status() or {})["rtsp"]["relay_ports"] == 0
    finally:
        for s in own:
            s.close()
