"""Bytes between the nodes of one /24, counted by nftables (docs/benchmarks.md)."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import threading
import time

from parts.common import PORTS, PROCS

# --------------------------------------------------------------------------- internode bytes
SELF_HOSTS = 8  # per-host "to itself" rules (node i on NET.i, i <= 8)


class Internode:
    """Bytes and packets between the nodes of one 127.0.N.0/24 net (TCP RPC and UDP,
    both directions), from an nftables counter in a table of our own, sampled every
    0.2 s so a window can be cut out afterwards. Clients talk from 127.0.0.1 and are
    not counted. Unavailable (no nft, no permission): ``error`` says why, the
    benchmark itself goes on."""

    def __init__(self, net: str) -> None:
        self.net = net
        self.table = "yimaporc_bench_" + net.replace(".", "_")
        self.samples: list[tuple[float, int, int, int]] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _nft(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nft", *args], capture_output=True, text=True, timeout=10)

    def read(self) -> tuple[int, int, int] | None:
        r = self._nft("list", "table", "inet", self.table)
        found = [
            (int(p), int(b)) for p, b in re.findall(r"counter packets (\d+) bytes (\d+)", r.stdout)
        ]
        if len(found) != SELF_HOSTS + 4:
            return None
        own, inter = found[:SELF_HOSTS], found[SELF_HOSTS:]
        return sum(b for _p, b in inter), sum(p for p, _b in inter), sum(b for _p, b in own)

    def __enter__(self) -> Internode:
        if shutil.which("nft") is None:
            self.error = "nft not installed"
            return self
        self._nft("delete", "table", "inet", self.table)
        cmds = [
            ("add", "table", "inet", self.table),
            (
                "add",
                "chain",
                "inet",
                self.table,
                "out",
                "{ type filter hook output priority 0 ; policy accept ; }",
            ),
        ]
        # Node-to-node traffic, each packet counted once. Nodes connect out from
        # unbound sockets, so the kernel may pick 127.0.0.1 as the source: match on
        # the cluster port and on UDP into the nodes (load generators send none).
        net, cport = f"{self.net}.0/24", str(PORTS["cluster"])
        # first, a node talking to itself over loopback (e.g. its own packets into its
        # own relay socket) is counted apart and not as internode traffic
        rules = [
            f"ip saddr {self.net}.{i} ip daddr {self.net}.{i} counter return"
            for i in range(1, SELF_HOSTS + 1)
        ]
        rules += [
            f"ip daddr {net} meta l4proto udp counter",
            f"ip daddr {net} tcp dport {cport} counter",
            f"ip saddr {net} tcp sport {cport} counter",
            f"ip saddr {net} ip daddr {net} tcp dport != {cport} tcp sport != {cport} counter",
        ]
        cmds += [("add", "rule", "inet", self.table, "out", *r.split()) for r in rules]
        for cmd in cmds:
            r = self._nft(*cmd)
            if r.returncode != 0:
                self.error = f"nft: {r.stderr.strip()[:200]}"
                self._nft("delete", "table", "inet", self.table)
                return self
        PROCS.on_stop(self.table, lambda: self._nft("delete", "table", "inet", self.table) and None)

        def sample() -> None:
            while not self._stop.is_set():
                try:
                    v = self.read()
                except (OSError, subprocess.SubprocessError):
                    v = None
                if v is not None:
                    self.samples.append((time.monotonic(), *v))
                self._stop.wait(0.2)

        v = self.read()
        if v is None:
            self.error = "nft counter unreadable"
            return self
        self.samples.append((time.monotonic(), *v))
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._nft("delete", "table", "inet", self.table)

    def between(self, t0: float, t1: float) -> tuple[float, float, float] | None:
        """(internode bytes, packets, a node's bytes to itself) between t0 and t1
        (monotonic), interpolated."""
        sm = list(self.samples)
        if self.error:
            return None
        if len(sm) < 2 or sm[0][0] > t0 or sm[-1][0] < t1 - 0.5:
            self.error = (
                f"counter samples do not cover the window ({len(sm)} samples, "
                f"{sm[0][0] - t0 if sm else 0:+.2f} s .. {sm[-1][0] - t1 if sm else 0:+.2f} s)"
            )
            return None

        def at(t: float) -> tuple[float, ...]:
            for a, b in itertools.pairwise(sm):
                if a[0] <= t <= b[0]:
                    f = (t - a[0]) / (b[0] - a[0]) if b[0] > a[0] else 0.0
                    return tuple(x + f * (y - x) for x, y in zip(a[1:], b[1:], strict=True))
            return tuple(float(x) for x in sm[-1][1:])

        v0, v1 = at(t0), at(t1)
        return v1[0] - v0[0], v1[1] - v0[1], v1[2] - v0[2]
