"""Hostile RTSP clients against three real yima nodes: reflection and a SETUP flood.

Runs with whatever ``yimaporc`` is on PYTHONPATH (so the same script measures the code
before and after a change) and prints one JSON object:

- ``reflection``: SETUP with ``destination=<victim>`` (plain and ``x-yima-fanout``), PLAY
  if the SETUP was accepted, then packets/bytes that reached a UDP socket on the victim
  address within ``--watch`` seconds;
- ``flood``: ``--setups`` SETUPs without PLAY from one address (pipelined on 4
  connections), its duration, the node's fd count before / at the peak / after, the
  statuses; then ffmpeg (from 127.0.0.1, a 1 s recording) retried every second until
  it succeeds: its failures and when it first succeeded; the longest ``/api/status`` answer (a reactor stall proxy) while the
  flood's sessions expire, and whether any node's view (epoch) changed.

    PYTHONPATH=src .venv/bin/python bench/rtsp_hostile.py --net 127.0.103 --setups 10000
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from yimaporc.rtsp import RtspClientConnection
from yimaporc.rtsp._events import NEED_DATA
from yimaporc.testing.procs import NodeProc, views_agree, wait_for
from yimaporc.yima.media.sample import make_sample_ts

RTSP = 18554


class Rtsp:
    def __init__(self, source: str, host: str) -> None:
        self.sock = socket.create_connection((host, RTSP), timeout=120, source_address=(source, 0))
        self.conn = RtspClientConnection()

    def responses(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            event = self.conn.next_event()
            if event is NEED_DATA:
                data = self.sock.recv(1 << 16)
                if not data:
                    out += [0] * (n - len(out))  # closed by the server
                    break
                self.conn.receive_data(data)
            elif hasattr(event, "response"):
                out.append(event.response.status)  # type: ignore[union-attr]
        return out

    def ask(self, method: str, url: str, headers: list[tuple[str, str]] | None = None) -> int:
        self.sock.sendall(self.conn.request(method, url, headers or [])[1])
        return self.responses(1)[0]


def fds(node: NodeProc) -> int:
    assert node.process is not None
    return len(os.listdir(f"/proc/{node.process.pid}/fd"))


def epochs(nodes: list[NodeProc]) -> list[int]:
    return [(n.status() or {}).get("epoch", -1) for n in nodes]


def status_latency(node: NodeProc) -> float:
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(node.admin_url + "/api/status", timeout=30) as r:
            r.read()
    except OSError:
        return 30.0
    return time.monotonic() - t0


def reflection(net: str, url: str, watch: float) -> dict[str, Any]:
    victim = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    victim.bind((f"{net}.99", 0))
    port = victim.getsockname()[1]
    c = Rtsp(f"{net}.10", f"{net}.1")
    out: dict[str, Any] = {}
    for label, extra in (("plain", ""), ("fanout", ";x-yima-fanout")):
        c.conn.session = None
        t = f"RTP/AVP;unicast;destination={net}.99;client_port={port}-{port + 1}{extra}"
        setup = c.ask("SETUP", url + "/track1", [("Transport", t)])
        play = c.ask("PLAY", url) if setup == 200 else None
        out[label] = {"setup": setup, "play": play}
    c.sock.close()  # the attacker leaves at once
    packets = octets = 0
    end = time.monotonic() + watch
    while time.monotonic() < end:
        ready, _, _ = select.select([victim], [], [], 0.2)
        if ready:
            octets += len(victim.recv(65536))
            packets += 1
    victim.close()
    out["victim_packets"], out["victim_bytes"] = packets, octets
    return out


def ffmpeg_plays(url: str) -> bool:
    r = subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-rtsp_transport", "tcp", "-i", url,
         "-t", "1", "-f", "null", "-"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    return r.returncode == 0


def flood(nodes: list[NodeProc], net: str, url: str, setups: int, wait: float) -> dict[str, Any]:
    node = nodes[0]
    before = fds(node)
    start_epochs = epochs(nodes)
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            try:
                peak[0] = max(peak[0], fds(node))
            except OSError:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    attackers = [Rtsp(f"{net}.20", f"{net}.1") for _ in range(4)]
    transport = [("Transport", "RTP/AVP;unicast;client_port=40000-40001")]
    statuses: dict[int, int] = {}
    t0 = time.monotonic()
    per = setups // len(attackers)
    batch = 250
    for done in range(0, per, batch):
        n = min(batch, per - done)
        for a in attackers:
            a.conn.session = None
            a.sock.sendall(b"".join(a.conn.request("SETUP", url + "/track1", transport)[1]
                                    for _ in range(n)))  # fmt: skip
        for a in attackers:
            for s in a.responses(n):
                statuses[s] = statuses.get(s, 0) + 1
    flood_s = time.monotonic() - t0
    for a in attackers:
        a.sock.close()
    # ffmpeg every second until it plays (or `wait` s), then the reaping.
    t1 = time.monotonic()
    refused_s = None
    failures = 0
    while time.monotonic() - t1 < wait:
        if ffmpeg_plays(url):
            refused_s = time.monotonic() - t1
            break
        failures += 1
        time.sleep(1.0)
    worst = 0.0
    t2 = time.monotonic()
    while time.monotonic() - t2 < wait:
        worst = max(worst, status_latency(node))
        doc = node.status() or {}
        live = doc.get("rtsp", {}).get("sessions", doc.get("streaming", {}).get("sessions"))
        if live == 0:
            break
        time.sleep(0.2)
    for _ in range(10):
        worst = max(worst, status_latency(node))
        time.sleep(0.2)
    stop.set()
    sampler.join()
    return {
        "setups": setups, "seconds": round(flood_s, 2), "statuses": statuses,
        "fds_before": before, "fds_peak": peak[0], "fds_after": fds(node),
        # from the flood's end to the end of ffmpeg's first successful 1 s play
        "ffmpeg_ok_after_s": None if refused_s is None else round(refused_s, 1),
        "ffmpeg_failures": failures,
        "status_latency_max_ms": round(worst * 1000),
        "view_changed": epochs(nodes) != start_epochs or not views_agree(nodes),
        "rtsp_status": (node.status() or {}).get("rtsp"),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--net", default="127.0.103", help="three nodes on NET.1-3")
    ap.add_argument("--setups", type=int, default=10_000)
    ap.add_argument("--watch", type=float, default=8.0, help="seconds to listen as the victim")
    ap.add_argument("--wait", type=float, default=120.0, help="max seconds for ffmpeg / reaping")
    ap.add_argument("--node-arg", action="append", default=[], help="extra yima-node argument")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rtsp-hostile-"))
    secret = tmp / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    nodes = [
        NodeProc("yima", f"h{i}", f"{a.net}.{i}", tmp / f"h{i}" / "data", 17946, 18080,
                 extra=["--rtsp", f"tcp:{RTSP}:interface={a.net}.{i}", *a.node_arg],
                 join=[] if i == 1 else [f"{a.net}.1:17946"], secret_file=secret)
        for i in (1, 2, 3)
    ]  # fmt: skip
    try:
        for n in nodes:
            n.start()
        wait_for(lambda: views_agree(nodes), 30, "views")
        wait_for(lambda: all(len((n.status() or {}).get("disks", [])) == 3 for n in nodes), 30,
                 "disks")  # fmt: skip
        clip = make_sample_ts(tmp / "clip.ts", 10)
        subprocess.run(
            [sys.executable, "-m", "yimaporc.cli", "media", "ingest", str(clip), "--name", "clip",
             "--block-size", "13160", "--admin", nodes[0].admin_url, "--secret-file", str(secret)],
            check=True, capture_output=True,
        )  # fmt: skip
        url = f"rtsp://{a.net}.1:{RTSP}/clip"
        out = {"reflection": reflection(a.net, url, a.watch)}
        out["flood"] = flood(nodes, a.net, url, a.setups, a.wait)
        print(json.dumps(out))
    finally:
        for n in nodes:
            n.kill(signal.SIGTERM)


if __name__ == "__main__":
    main()
