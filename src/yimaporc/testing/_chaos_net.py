"""The chaos run's network: a bridge, one namespace per node, iptables cuts
(:mod:`yimaporc.testing.chaos`), and the addresses and ports the clients use."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

PREFIX = "ychaos"
BRIDGE = "ychbr0"
NET = "10.123.0"
CLIENT_IP = f"{NET}.254"
CLUSTER, ADMIN, SMTP, POP3, IMAP = 7946, 8080, 2525, 1110, 1143
LOCK = Path(tempfile.gettempdir()) / "yimaporc-chaos.lock"
MARKER = re.compile(rb"Subject: chaos (\S+)")
KINDS = ("partition", "bridge", "kill", "pause", "skew", "rolling")
#: Socket timeout of every IMAP/POP3 operation (a paused node holds a reader this long).
IO_TIMEOUT = 10.0
#: SMTP clients wait longer: a node whose peers are cut off answers after its RPC
#: timeouts (10 s), and a real MTA waits minutes for the reply to the final dot.
SMTP_TIMEOUT = 40.0
GREETING_TIMEOUT = 3.0


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def unavailable() -> str | None:
    """Why chaos runs cannot work here (not root, no ``ip``/``iptables``, no network
    namespaces, no libfaketime), or None."""
    if os.geteuid() != 0:
        return "chaos runs need root (network namespaces, veth, iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if faketime_lib() is None:
        return "libfaketime is not installed (apt-get install faketime)"
    probe = f"{PREFIX}-probe"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:
        rules = _run("ip", "netns", "exec", probe, "iptables", "-S", check=False)
        if rules.returncode != 0:
            return f"iptables does not work in a namespace: {rules.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


def faketime_lib() -> str | None:
    """The multi-threaded libfaketime (the ``faketime`` command forks, so its PID is
    not the node's: we preload the library ourselves)."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
    found += sorted(glob.glob("/usr/lib/faketime/libfaketimeMT.so.1"))
    return found[0] if found else None


def ip_of(i: int) -> str:
    """Node ``i``'s address on the bridge."""
    return f"{NET}.{i}"


class Network:
    """The bridge, one namespace per node, and the iptables cuts between them."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.cuts: set[tuple[int, int]] = set()

    @staticmethod
    def ns(i: int) -> str:
        """Node ``i``'s namespace."""
        return f"{PREFIX}-p{i}"

    @staticmethod
    def cleanup_leftovers() -> list[str]:
        """Remove namespaces, bridge and veths a previous run left behind (killing, by
        PID, the processes still inside those namespaces); return what was removed."""
        gone = []
        listing = _run("ip", "netns", "list", check=False).stdout.split("\n")
        for line in listing:
            name = line.split(" ")[0]
            if not name.startswith(PREFIX + "-"):
                continue
            for pid in _run("ip", "netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _run("ip", "netns", "del", name, check=False)
            gone.append(name)
        links = _run("ip", "-o", "link", "show", check=False).stdout
        for name in re.findall(r"^\d+: (ych[a-z]*\d+)[@:]", links, re.M):
            _run("ip", "link", "del", name, check=False)
            gone.append(name)
        return gone

    def setup(self) -> None:
        """The bridge with the clients' address, and a namespace per node."""
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{CLIENT_IP}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        for i in range(1, self.count + 1):
            ns, outer, inner = self.ns(i), f"ychv{i}", f"ychn{i}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            _run("ip", "link", "set", inner, "netns", ns)
            _run("ip", "link", "set", outer, "master", BRIDGE)
            _run("ip", "link", "set", outer, "up")
            inside = ("ip", "netns", "exec", ns)
            _run(*inside, "ip", "link", "set", "lo", "up")
            _run(*inside, "ip", "addr", "add", f"{ip_of(i)}/24", "dev", inner)
            _run(*inside, "ip", "link", "set", inner, "up")

    def teardown(self) -> None:
        """Remove everything ``setup`` made."""
        self.cleanup_leftovers()

    def cut(self, groups: list[set[int]]) -> None:
        """Drop traffic between every two nodes that share no group (both directions,
        in both namespaces)."""
        for i in range(1, self.count + 1):
            for j in range(i + 1, self.count + 1):
                if not any(i in g and j in g for g in groups):
                    for a, b in ((i, j), (j, i)):
                        inside = ("ip", "netns", "exec", self.ns(a), "iptables")
                        _run(*inside, "-A", "INPUT", "-s", ip_of(b), "-j", "DROP")
                        _run(*inside, "-A", "OUTPUT", "-d", ip_of(b), "-j", "DROP")
                    self.cuts.add((i, j))

    def heal(self) -> None:
        """Remove every cut."""
        for i in range(1, self.count + 1):
            for chain in ("INPUT", "OUTPUT"):
                _run("ip", "netns", "exec", self.ns(i), "iptables", "-F", chain)
        self.cuts.clear()
