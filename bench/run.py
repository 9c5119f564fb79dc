#!/usr/bin/env python3
"""``make bench``: yimaporc against the servers users would pick instead, in one run.

    .venv/bin/python bench/run.py [--quick] [--only PART,PART] [--keep-work]

Parts (all by default, in this order):

    udp           loopback ceiling: plain sendto and UDP GSO (UDP_SEGMENT) from one Python process
    mail-peers    Postfix + Dovecot (Maildir) and a minimal twisted.mail server
    mail-target   one ``twistd -n porcupine-node`` (SMTP, POP3, IMAP), fresh data dir
    mail-cluster  Porcupine deliveries/s with 1, 2, 3 nodes (load spread over their SMTP ports)
    rtsp-peer     GStreamer's RTSP server on a 4 Mbit/s VBR MPEG-TS clip
    rtsp-target   ``twistd -n yima-node``: bipartite and master-slave with 1, 2, 3 nodes
    model         cost model, SIMULATED: 1-8 nodes with a core and a disk each (bench/model.py)

Every part runs the same load generator (``bench/peers/``) against its servers,
then the run prints a table of yimaporc / peer ratios, writes
``bench/results/results.json`` and PNG plots in ``bench/results/``.  A part that
cannot start or serve its server is recorded with a one-line reason; the run then
exits non-zero (after printing everything that did work) and no ratio is ever
computed against a missing figure.  Everything started here is stopped by PID.
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = HERE / "peers"
RESULTS = HERE / "results"
PY = sys.executable
VENV_BIN = Path(sys.executable).parent
SYSPY = "/usr/bin/python3"  # Debian's GI bindings (GStreamer) live in the system Python
WORK = Path(os.environ.get("YIMAPORC_BENCH_WORK", "/tmp/yimaporc-bench"))

PEER_HOST = "127.0.8.1"  # peers; away from local-cluster's 127.0.1.x / 127.0.2.x
PORC_NET = "127.0.9"  # porcupine node i on 127.0.9.i
YIMA_NET = "127.0.10"  # yima node i on 127.0.10.i
DOMAIN = "bench.test"
PASSWORD = "pw"
PORTS = {"smtp": 2525, "pop3": 1110, "imap": 1143, "rtsp": 8554, "admin": 8080, "cluster": 7946}
APT_PACKAGES = [
    "postfix",
    "dovecot-imapd",
    "dovecot-pop3d",
    "ffmpeg",
    "python3-gi",
    "gir1.2-gst-rtsp-server-1.0",
    "gstreamer1.0-plugins-base",
    "gstreamer1.0-plugins-good",
    "gstreamer1.0-plugins-bad",
    "util-linux",
    "nftables",
]
PARTS = [
    "udp",
    "mail-peers",
    "mail-target",
    "mail-cluster",
    "rtsp-peer",
    "rtsp-target",
    "retransmit",
    "model",  # last: it takes its costs from the figures measured before it
]


class PartFailed(Exception):
    """A server did not start or serve; the message is the user-facing reason."""


def say(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- settings
class Settings:
    """Lengths of everything; ``--quick`` shrinks them (QUICK=1 must stay under 3 min)."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.udp_duration = 1.0 if quick else 3.0
        self.mail_warmup = 1.0 if quick else 2.0
        self.mail_duration = 3.0 if quick else 8.0
        self.mail_conns = 16
        self.mail_users = 10 if quick else 50
        self.mail_per_user = 5 if quick else 20
        self.mail_fetch = 5
        self.cluster_nodes = [1, 3] if quick else [1, 2, 3]
        self.replicas = [2] if quick else [1, 2, 3]
        self.clip_seconds = 30 if quick else 60
        self.rtsp_warmup = 1.0 if quick else 2.0
        self.rtsp_window = 3.0 if quick else 8.0
        self.rtsp_budget_peer = 25.0 if quick else 90.0
        self.rtsp_budget_target = 15.0 if quick else 60.0
        self.rtsp_start_peer = 128 if quick else 32
        self.rtsp_start_target = 24 if quick else 16
        # a trial of many hundred sessions costs a minute of set-up and teardown on an
        # overloaded machine: above this the capacity is reported as ">= max"
        self.rtsp_max = 256 if quick else 512
        # the whole run must end in time (QUICK=1 < 3 min, full < 15 min): the streaming
        # ramps, which come last, get what is left of this, minus a reserve for the report
        self.total_s = 150.0 if quick else 800.0
        self.t0 = time.monotonic()
        self.retx_rates = [0.0, 0.01, 0.05, 0.1]
        self.retx_seeds = 2 if quick else 5
        self.retx_sim_s = 10.0 if quick else 30.0
        self.retx_play_s = 6.0 if quick else 12.0
        # bipartite = standard client, the RTSP node relays in order; bipartite-fanout =
        # the client opts in (x-yima-fanout) and every node sends to it directly (Yima-2)
        self.yima_configs = (
            [("bipartite", 1), ("bipartite-fanout", 3), ("master-slave", 3)]
            if quick
            else [("bipartite", n) for n in (1, 2, 3)]
            + [("bipartite-fanout", n) for n in (2, 3)]
            + [("master-slave", n) for n in (2, 3)]
        )
        # with one node both designs are the same server (no one to fetch from or fan
        # out from): master-slave x1 is bipartite x1, plotted as the common start

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.t0)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "t0"}


# --------------------------------------------------------------------------- processes
class Procs:
    """Every process this run starts, stopped by PID (TERM, then KILL after 10 s)."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.cleanups: list[tuple[str, Callable[[], None]]] = []

    def start(self, name: str, argv: list[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            p = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kw,
            )
        self.procs.append((name, p))
        return p

    def on_stop(self, name: str, fn: Callable[[], None]) -> None:
        self.cleanups.append((name, fn))

    def stop_all(self) -> None:
        for _name, fn in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                fn()
        self.cleanups.clear()
        for _name, p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(p.pid, signal.SIGTERM)  # its own session: the group is ours
        end = time.monotonic() + 10
        for _name, p in self.procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()


PROCS = Procs()


@contextlib.contextmanager
def scoped() -> Iterator[None]:
    """Stop whatever was started inside the block when it ends."""
    try:
        yield
    finally:
        PROCS.stop_all()


def pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def need_free(host: str, port: int) -> None:
    for _ in range(50):
        if not port_open(host, port):
            return
        time.sleep(0.2)
    raise PartFailed(f"{host}:{port} is already in use; stop whatever holds it")


def wait_port(host: str, port: int, seconds: float, proc: subprocess.Popen[bytes] | None) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if port_open(host, port):
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.1)
    return False


def tail(path: Path, n: int = 5) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:])


def run(argv: list[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run to completion with output captured; a hang becomes PartFailed."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise PartFailed(f"{' '.join(argv[:4])} ... did not finish in {timeout:.0f} s") from e


def run_daemon(argv: list[str], log: Path, timeout: float = 60) -> int:
    """Start a self-daemonising server (postfix, dovecot): its output goes to log."""
    with open(log, "ab") as out:
        try:
            return subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired as e:
            raise PartFailed(f"{' '.join(argv[:3])} did not return in {timeout:.0f} s") from e


# --------------------------------------------------------------------------- profiles
PROFILE = False  # --profile: py-spy samples the yimaporc targets while they carry load


class Profiler:
    """``py-spy record --format raw`` on the given PIDs for the span of a ``with`` block;
    the summary (top frames by own and by inclusive samples) goes into results.json."""

    def __init__(self, name: str, pids: list[int], into: dict[str, Any]) -> None:
        self.name = name
        self.pids = pids
        self.into = into
        self.procs: list[tuple[int, subprocess.Popen[bytes], Path]] = []

    def __enter__(self) -> Profiler:
        if not PROFILE:
            return self
        spy = VENV_BIN / "py-spy"
        out = WORK / "profiles"
        out.mkdir(parents=True, exist_ok=True)
        for pid in self.pids:
            path = out / f"{self.name}-{pid}.txt"
            with contextlib.suppress(OSError):
                path.unlink()
            argv = [str(spy), "record", "-p", str(pid), "-r", "50", "--format", "raw"]
            argv += ["--nonblocking", "-o", str(path)]
            p = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.procs.append((pid, p, path))
        return self

    def __exit__(self, *exc: object) -> None:
        for _pid, p, _path in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for _pid, p, _path in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        summary = [profile_summary(path) for _pid, _p, path in self.procs]
        if summary:
            self.into.setdefault("profiles", {})[self.name] = summary
            for sm in summary:
                say(f"    profile {self.name} ({sm['file']}): {sm['samples']} samples")
                for fn, pct in sm["top_self"][:6]:
                    say(f"      self {pct:5.1f}%  {fn}")


def profile_summary(path: Path) -> dict[str, Any]:
    """Top functions of a py-spy raw (collapsed) profile: own and inclusive share."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[-1] if " (" in f else f
            for f in stack.split(";")
        ]
        frames = [re.sub(r":\d+\)$", ")", f) for f in frames]
        total += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n

    def top(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, 100.0 * v / total) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:15]]

    return {
        "file": str(path),
        "samples": total,
        "top_self": top(own) if total else [],
        "top_inclusive": top(incl) if total else [],
    }


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


# --------------------------------------------------------------------------- set-up
def install(peers: bool = True) -> None:
    """Peers from Debian packages (apt-get as root) and matplotlib from PyPI, when missing."""
    missing = [p for p in APT_PACKAGES if peers and run(["dpkg", "-s", p], 30).returncode != 0]
    if missing:
        if os.geteuid() != 0:
            raise SystemExit(f"error: missing packages {missing}; run make bench as root")
        say(f"# apt-get install {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        sel = (
            "postfix postfix/main_mailer_type select No configuration\n"
            "postfix postfix/mailname string localhost\n"
        )
        subprocess.run(["debconf-set-selections"], input=sel, text=True, check=False)
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        r = subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            raise SystemExit(f"error: apt-get install failed: {r.stderr.strip()[-500:]}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        say("# pip install matplotlib")
        r = subprocess.run(
            [PY, "-m", "pip", "install", "-q", "matplotlib"], capture_output=True, text=True
        )
        if r.returncode != 0:
            raise SystemExit(
                f"error: pip install matplotlib failed: {r.stderr.strip()[-500:]}"
            ) from None
    if PROFILE and not (VENV_BIN / "py-spy").exists():
        say("# pip install py-spy")
        subprocess.run([PY, "-m", "pip", "install", "-q", "py-spy"], capture_output=True)
        if not (VENV_BIN / "py-spy").exists():
            raise SystemExit("error: pip install py-spy failed (needed by --profile)")
    try:
        pwd.getpwnam("pbmail")
    except KeyError:
        if not peers:
            return
        subprocess.run(
            ["useradd", "-r", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", "pbmail"],
            check=True,
        )


def ensure_loopback_alias(host: str) -> None:
    """127.0.0.0/8 is all local on Linux; check that binding works, nothing to add."""
    with socket.socket() as s:
        try:
            s.bind((host, 0))
        except OSError as e:
            raise PartFailed(f"cannot bind {host}: {e}") from e


# --------------------------------------------------------------------------- generators
def parse_result(text: str, kind: str) -> dict[str, str] | None:
    found = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(f"RESULT {kind} "):
            found = dict(p.split("=", 1) for p in line.split()[2:] if "=" in p)
    return found


def fnum(v: Any) -> float | None:
    try:
        x = float(str(v).rstrip("%").lstrip(">"))
    except (TypeError, ValueError):
        return None
    return None if x != x else x  # NaN -> None


def mail_load(
    s: Settings,
    proto: str,
    host: str,
    port: int,
    label: str,
    server_pids: list[int],
    extra: list[str] | None = None,
    conns: int | None = None,
    procs: int = 2,
    log: Path | None = None,
) -> dict[str, Any]:
    """One mail_load.py run; its RESULT line as numbers (PartFailed if it did not serve)."""
    argv = [
        PY,
        str(PEERS / "mail_load.py"),
        proto,
        "--host",
        host,
        "--port",
        str(port),
        "--conns",
        str(conns or s.mail_conns),
        "--procs",
        str(procs),
        "--duration",
        str(s.mail_duration),
        "--warmup",
        str(s.mail_warmup),
        "--users",
        str(s.mail_users),
        "--fetch",
        str(s.mail_fetch),
        "--domain",
        DOMAIN,
        "--password",
        PASSWORD,
        "--label",
        label,
        "--timeout",
        "10",
        *[a for pid in server_pids for a in ("--server-pid", str(pid))],
        *(extra or []),
    ]
    limit = s.mail_warmup + s.mail_duration + 120
    r = run(argv, limit)
    if log:
        with open(log, "a") as f:
            f.write(" ".join(argv) + "\n" + r.stdout + r.stderr + "\n")
    kv = parse_result(r.stdout, "mail")
    if kv is None:
        raise PartFailed(
            f"{label} {proto}: load generator gave no result: {r.stderr.strip()[-300:]}"
        )
    last_err = ""
    m = re.search(r"last error: (.*)", r.stdout)
    if m:
        last_err = m.group(1)
    out: dict[str, Any] = {k: (fnum(v) if fnum(v) is not None else v) for k, v in kv.items()}
    rate_key = "msgs_per_s" if proto == "smtp" else "sessions_per_s"
    rate = out.get(rate_key) or 0.0
    errors = out.get("errors") or 0.0
    if rate <= 0:
        raise PartFailed(
            f"{label} {proto} on {host}:{port} served nothing ({last_err or 'no error'})"
        )
    done = rate * s.mail_duration
    if errors > max(3.0, 0.01 * done):
        raise PartFailed(
            f"{label} {proto} on {host}:{port}: {int(errors)} failed sessions against "
            f"{int(done)} good ones ({last_err})"
        )
    if proto == "smtp" and "delivered" in kv:
        dv = kv["delivered"].split("/")
        if len(dv) == 2 and int(dv[0]) < int(dv[1]):
            raise PartFailed(
                f"{label} accepted {dv[1]} messages but only {dv[0]} reached the Maildirs"
            )
    cpu = out.get("server_cpu_pct")
    if isinstance(cpu, float):
        per = out.get("msgs_per_s") or rate
        out["server_cpu_s_per_msg"] = cpu / 100.0 / per if per else None
        out["server_cpu_s_per_session"] = cpu / 100.0 / rate
    out["last_error"] = last_err
    say(
        f"  {label:16s} {proto:5s} {rate_key}={rate:.1f} p50_ms={out.get('p50_ms')} "
        f"p99_ms={out.get('p99_ms')} server_cpu_pct={cpu} errors={int(errors)}"
    )
    return out


def rtsp_ramp(
    s: Settings,
    url: str,
    label: str,
    server_pids: list[int],
    budget: float,
    start: int,
    log: Path,
    fanout: bool = False,
) -> dict[str, Any]:
    argv = [
        PY,
        str(PEERS / "rtsp_load.py"),
        *(["--fanout"] if fanout else []),
        "--max",
        str(s.rtsp_max),
        "--url",
        url,
        "--ramp",
        "--start",
        str(start),
        "--budget",
        str(budget),
        "--warmup",
        str(s.rtsp_warmup),
        "--window",
        str(s.rtsp_window),
        "--label",
        label,
        *[a for pid in server_pids for a in ("--server-pid", str(pid))],
    ]
    r = run(argv, budget + 180)
    with open(log, "a") as f:
        f.write(" ".join(argv) + "\n" + r.stdout + r.stderr + "\n")
    for line in r.stdout.splitlines():
        if line.strip().startswith("trial"):
            say("    " + line.strip())
    kv = parse_result(r.stdout, "rtsp")
    if kv is None:
        raise PartFailed(f"{label}: rtsp_load gave no result: {r.stderr.strip()[-300:]}")
    if fanout:
        for g, n_ok in re.findall(r"fanout=(\d+)/(\d+)", r.stdout):
            if int(g) < int(n_ok):
                raise PartFailed(
                    f"{label}: asked for x-yima-fanout, granted to {g} of {n_ok} sessions"
                )
    out: dict[str, Any] = {k: (fnum(v) if fnum(v) is not None else v) for k, v in kv.items()}
    if not out.get("trials"):
        raise PartFailed(f"{label}: the ramp had no time for a trial (budget {budget:.0f} s)")
    if not out.get("max_sessions"):
        m = re.findall(r"setup errors: \d+, first: (.*)", r.stdout)
        why = m[0][:300] if m else f"no trial passed, the first at N={start}"
        raise PartFailed(f"{label} at {url}: not one session kept real time ({why})")
    n = out["max_sessions"]
    # the ramp ran out of budget before a trial failed: the capacity is at least n
    out["first_fail"] = kv.get("first_fail")
    out["lower_bound"] = str(kv.get("first_fail", ">")).startswith(">")
    cpu = out.get("server_cpu_pct")
    if isinstance(cpu, float) and n:
        out["server_cpu_pct_per_stream"] = cpu / n
    # Datagrams per core-second of the server (issue 19): the datagrams the clients
    # received in the window (payload bytes / 1316, one MPEG-TS RTP payload) over the
    # server's CPU seconds in it (/proc, every process of the cluster).
    mbps = out.get("agg_mbps")
    if isinstance(cpu, float) and cpu > 0 and isinstance(mbps, float):
        out["datagrams_per_core_s"] = mbps * 1e6 / 8 / 1316 / (cpu / 100.0)
    say(
        f"  {label}: max_sessions={'>=' if out['lower_bound'] else ''}{n:.0f} agg_mbps={out.get('agg_mbps')} server_cpu_pct={cpu}"
        f" datagrams/core-s={out.get('datagrams_per_core_s') or 0:.0f}"
    )
    return out


def internode_trial(
    s: Settings,
    url: str,
    label: str,
    pids: list[int],
    work: Path,
    fanout: bool = False,
) -> dict[str, Any]:
    """One stream on a fresh cluster (cold block caches), counting the bytes that cross
    between the nodes: internode bytes per delivered byte (Yima-1's master fetches every
    block it does not hold; Yima-2 sends from where the block is, relaying through the
    RTSP node only for standard clients). Many sessions of one clip would share the
    master's block cache and hide the transfer, hence one."""
    n = 1
    argv = [PY, str(PEERS / "rtsp_load.py"), "--url", url, "--sessions", str(n)]
    argv += ["--fanout"] if fanout else []
    argv += ["--warmup", str(s.rtsp_warmup), "--window", str(s.rtsp_window), "--label", label]
    argv += [a for pid in pids for a in ("--server-pid", str(pid))]
    with Internode(YIMA_NET) as net:
        t_launch = time.monotonic()
        r = run(argv, s.rtsp_warmup + s.rtsp_window + 120)
        time.sleep(0.3)
    with open(work / "load.log", "a") as f:
        f.write(" ".join(argv) + "\n" + r.stdout + r.stderr + "\n")
    kv = parse_result(r.stdout, "rtsp") or {}
    m = re.search(r"setup_s=([\d.]+)", r.stdout)
    agg = fnum(kv.get("agg_mbps"))
    out: dict[str, Any] = {"internode_trial_sessions": n, "internode_trial_pass": kv.get("pass")}
    if m is None or not agg:
        out["internode"] = "trial gave no result"
        return out
    w0 = t_launch + 0.3 + float(m.group(1)) + s.rtsp_warmup
    got = net.between(w0, w0 + s.rtsp_window)
    if got is None:
        out["internode"] = net.error
        return out
    delivered = agg * 1e6 / 8 * s.rtsp_window
    out["internode_bytes_per_delivered_byte"] = got[0] / delivered
    # a node's own packets through its own sockets (the relay's loopback hop)
    out["self_loop_bytes_per_delivered_byte"] = got[2] / delivered
    say(
        f"  {label}: {n} sessions, internode bytes per delivered byte "
        f"{got[0] / delivered:.3f} ({got[0] * 8 / s.rtsp_window / 1e6:.0f} Mbit/s between nodes; "
        f"{got[2] / delivered:.3f} from a node to itself)"
    )
    return out


def ffmpeg_check(url: str, label: str, work: Path) -> dict[str, Any]:
    """A real client: ffmpeg copies 5 s over RTP/UDP; a peer that fails this does not serve."""
    out = work / f"ffcheck-{label}.ts"
    with contextlib.suppress(OSError):
        out.unlink()
    r = run(
        [
            "ffmpeg",
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-rtsp_transport",
            "udp",
            "-i",
            url,
            "-c",
            "copy",
            "-t",
            "5",
            str(out),
        ],
        40,
    )
    size = out.stat().st_size if out.exists() else 0
    if r.returncode != 0 or size < 1_000_000:
        raise PartFailed(
            f"{label}: ffmpeg could not record 5 s from {url} "
            f"(rc={r.returncode}, {size} bytes): {r.stderr.strip()[-200:]}"
        )
    say(f"  {label}: ffmpeg recorded 5 s from {url} ({size} bytes)")
    return {"ffmpeg_bytes": size}


# --------------------------------------------------------------------------- udp ceiling
def part_udp(s: Settings, res: dict[str, Any]) -> None:
    out = {}
    for stack in ("sendto", "gso"):
        r = run(
            [
                PY,
                str(PEERS / "udp_ceiling.py"),
                "--stack",
                stack,
                "--duration",
                str(s.udp_duration),
                "--warmup",
                "0.5",
            ],
            s.udp_duration + 60,
        )
        kv = parse_result(r.stdout, "udp")
        if kv is None or not fnum(kv.get("tx_pps")):
            raise PartFailed(f"udp {stack}: no result ({r.stderr.strip()[-300:]})")
        d = {k: fnum(v) if fnum(v) is not None else v for k, v in kv.items()}
        d["tx_mbps"] = d["tx_pps"] * 1316 * 8 / 1e6
        # on a shared machine the sender may not get a whole core: per core-second too
        if d.get("tx_cpu_pct"):
            d["tx_pps_per_core"] = d["tx_pps"] / (d["tx_cpu_pct"] / 100.0)
        out[stack] = d
        say(
            f"  udp {stack:6s} tx_pps={d['tx_pps']:.0f} ({d['tx_mbps']:.0f} Mbit/s, "
            f"{d['tx_mbps'] / 4.0:.0f} x 4 Mbit/s streams) rx_pps={d['rx_pps']:.0f} "
            f"sender_cpu={d['tx_cpu_pct']:.0f}%"
        )
    res["udp"] = out


# --------------------------------------------------------------------------- mail peers
def users_list(s: Settings) -> list[str]:
    return [f"{p}{i:03d}" for i in range(1, s.mail_users + 1) for p in ("user", "pop")]


def populate_maildirs(s: Settings, root: Path, uid: int = -1, gid: int = -1) -> None:
    argv = [
        PY,
        str(PEERS / "mail_load.py"),
        "populate",
        "--maildir-root",
        str(root),
        "--users",
        str(s.mail_users),
        "--per-user",
        str(s.mail_per_user),
        "--domain",
        DOMAIN,
    ]
    if uid >= 0:
        argv += ["--uid", str(uid), "--gid", str(gid)]
    r = run(argv, 120)
    if r.returncode != 0:
        raise PartFailed(f"populate {root}: {r.stderr.strip()[-300:]}")


def setup_postfix(s: Settings, w: Path) -> None:
    pb = pwd.getpwnam("pbmail")
    shutil.rmtree(w, ignore_errors=True)
    for d in ("etc", "spool", "data", "mail"):
        (w / d).mkdir(parents=True)
    shutil.chown(w / "data", "postfix")
    os.chown(w / "mail", pb.pw_uid, pb.pw_gid)
    # Ported from /work/shared/peers/bench_mail.sh (setup_postfix), on PEER_HOST.
    (w / "etc" / "main.cf").write_text(
        f"""# private benchmark instance: postfix -c {w}/etc start|stop
compatibility_level = 3.6
queue_directory = {w}/spool
data_directory = {w}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.localdomain
mydomain = localdomain
myorigin = $myhostname
mydestination =
relay_domains =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = reject_unauth_destination
default_transport = error:outbound mail disabled (benchmark)
relay_transport = error:outbound mail disabled (benchmark)
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
smtpd_banner = $myhostname ESMTP
alias_maps =
alias_database =
local_recipient_maps =
biff = no
append_dot_mydomain = no
readme_directory = no
smtputf8_enable = no
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {w}/mail
virtual_mailbox_maps = texthash:{w}/etc/vmailbox
virtual_minimum_uid = 100
virtual_uid_maps = static:{pb.pw_uid}
virtual_gid_maps = static:{pb.pw_gid}
default_process_limit = 200
maillog_file_prefixes = {w}
maillog_file = {w}/maillog
"""
    )
    (w / "etc" / "master.cf").write_text(
        f"{PEER_HOST}:{PORTS['smtp']} inet n - n - - smtpd\n"
        + """pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""
    )
    (w / "etc" / "vmailbox").write_text(
        "".join(f"{u}@{DOMAIN} {u}/\n" for u in users_list(s)),
    )


def start_postfix(w: Path) -> int:
    need_free(PEER_HOST, PORTS["smtp"])
    # postfix(1) reports start-up errors only to syslog/maillog; a pseudo-tty shows them
    PROCS.on_stop(
        "postfix",
        lambda: run_daemon(["postfix", "-c", str(w / "etc"), "stop"], w / "stop.log") and None,
    )
    r = run(["script", "-qc", f"postfix -c {w / 'etc'} start", "/dev/null"], 60)
    if not wait_port(PEER_HOST, PORTS["smtp"], 15, None):
        raise PartFailed(
            f"postfix did not start ({(r.stdout + r.stderr).strip()[-200:]}; "
            f"maillog: {tail(w / 'maillog')})"
        )
    return int((w / "spool" / "pid" / "master.pid").read_text().strip())


def setup_dovecot(s: Settings, d: Path, maildirs: Path) -> None:
    pb = pwd.getpwnam("pbmail")
    u, g = pb.pw_uid, pb.pw_gid
    shutil.rmtree(d, ignore_errors=True)
    (d / "run").mkdir(parents=True)
    (d / "state").mkdir()
    (d / "passwd").write_text(
        "".join(f"{n}:{{PLAIN}}{PASSWORD}:{u}:{g}::{maildirs}/{n}::\n" for n in users_list(s))
    )
    shutil.chown(d / "passwd", group="dovecot")
    os.chmod(d / "passwd", 0o640)
    # Ported from bench_mail.sh (setup_dovecot, "tuned": processes reused).
    (d / "dovecot.conf").write_text(
        f"""base_dir = {d}/run
state_dir = {d}/state
instance_name = yimaporc-bench
protocols = imap pop3
listen = {PEER_HOST}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_username_format = %Ln
log_path = {d}/dovecot.log
mail_location = maildir:~/
mail_uid = {u}
mail_gid = {g}
first_valid_uid = {u}
last_valid_uid = {u}
first_valid_gid = {g}
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {d}/passwd
}}
userdb {{
  driver = passwd-file
  args = {d}/passwd
}}
service imap-login {{
  inet_listener imap {{
    address = {PEER_HOST}
    port = {PORTS["imap"]}
  }}
  inet_listener imaps {{
    port = 0
  }}
  service_count = 0
  process_min_avail = 2
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {PEER_HOST}
    port = {PORTS["pop3"]}
  }}
  inet_listener pop3s {{
    port = 0
  }}
  service_count = 0
  process_min_avail = 2
}}
service auth {{
  client_limit = 4096
}}
service imap {{
  service_count = 0
  process_min_avail = 16
}}
service pop3 {{
  service_count = 0
  process_min_avail = 16
}}
"""
    )


def start_dovecot(d: Path) -> int:
    need_free(PEER_HOST, PORTS["imap"])
    need_free(PEER_HOST, PORTS["pop3"])
    pidfile = d / "run" / "master.pid"

    def stop() -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not pid_alive(pid):
                    return
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)

    PROCS.on_stop("dovecot", stop)
    rc = run_daemon(["dovecot", "-c", str(d / "dovecot.conf")], d / "start.log")
    if rc != 0 or not (
        wait_port(PEER_HOST, PORTS["imap"], 15, None)
        and wait_port(PEER_HOST, PORTS["pop3"], 15, None)
    ):
        raise PartFailed(
            f"dovecot did not start (rc={rc}: {tail(d / 'start.log')}; "
            f"log: {tail(d / 'dovecot.log')})"
        )
    time.sleep(1.0)  # process_min_avail workers
    return int(pidfile.read_text().strip())


def part_mail_peers(s: Settings, res: dict[str, Any], errors: list[str]) -> None:
    peers = res.setdefault("mail", {})
    work = WORK / "mail"
    log = work / "load.log"
    work.mkdir(parents=True, exist_ok=True)
    # Postfix (SMTP -> virtual(8) Maildir) + Dovecot (POP3/IMAP on the same Maildirs)
    try:
        with scoped():
            w = work / "postfix"
            setup_postfix(s, w)
            pb = pwd.getpwnam("pbmail")
            populate_maildirs(s, w / "mail", pb.pw_uid, pb.pw_gid)
            ppid = start_postfix(w)
            r: dict[str, Any] = {}
            r["smtp"] = mail_load(
                s,
                "smtp",
                PEER_HOST,
                PORTS["smtp"],
                "postfix",
                [ppid],
                ["--maildir-root", str(w / "mail")],
                log=log,
            )
            d = work / "dovecot"
            setup_dovecot(s, d, w / "mail")
            dpid = start_dovecot(d)
            for proto in ("pop3", "imap"):
                r[proto] = mail_load(
                    s,
                    proto,
                    PEER_HOST,
                    PORTS[proto],
                    "dovecot",
                    [dpid],
                    ["--user-suffix", "@" + DOMAIN],
                    log=log,
                )
            peers["postfix+dovecot"] = r
    except PartFailed as e:
        errors.append(f"peer postfix+dovecot: {e}")
        peers["postfix+dovecot"] = {"error": str(e)}
    # twisted.mail: ESMTP + POP3 on Maildir (the floor of the same stack; no IMAP)
    try:
        with scoped():
            w = work / "twisted"
            shutil.rmtree(w, ignore_errors=True)
            w.mkdir(parents=True)
            need_free(PEER_HOST, PORTS["smtp"])
            need_free(PEER_HOST, PORTS["pop3"])
            p = PROCS.start(
                "twisted.mail",
                [
                    PY,
                    str(PEERS / "tw_mail_server.py"),
                    "--maildir-root",
                    str(w / "mail"),
                    "--users",
                    ",".join(users_list(s)),
                    "--domain",
                    DOMAIN,
                    "--password",
                    PASSWORD,
                    "--host",
                    PEER_HOST,
                    "--smtp-port",
                    str(PORTS["smtp"]),
                    "--pop3-port",
                    str(PORTS["pop3"]),
                ],
                w / "server.log",
            )
            if not (
                wait_port(PEER_HOST, PORTS["smtp"], 20, p)
                and wait_port(PEER_HOST, PORTS["pop3"], 20, p)
            ):
                raise PartFailed(f"twisted.mail did not start: {tail(w / 'server.log')}")
            populate_maildirs(s, w / "mail")
            r = {}
            r["smtp"] = mail_load(
                s,
                "smtp",
                PEER_HOST,
                PORTS["smtp"],
                "twisted.mail",
                [p.pid],
                ["--maildir-root", str(w / "mail")],
                log=log,
            )
            r["pop3"] = mail_load(
                s,
                "pop3",
                PEER_HOST,
                PORTS["pop3"],
                "twisted.mail",
                [p.pid],
                ["--user-suffix", "@" + DOMAIN],
                log=log,
            )
            peers["twisted.mail"] = r
    except PartFailed as e:
        errors.append(f"peer twisted.mail: {e}")
        peers["twisted.mail"] = {"error": str(e)}


# --------------------------------------------------------------------------- yimaporc nodes
def yimaporc_cli() -> str:
    return str(VENV_BIN / "yimaporc")


def admin_token(secret: Path) -> str:
    r = run([yimaporc_cli(), "token", "--secret-file", str(secret)], 60)
    if r.returncode != 0 or not r.stdout.strip():
        raise PartFailed(f"yimaporc token failed: {r.stderr.strip()}")
    return r.stdout.strip().splitlines()[-1]


def admin_status(url: str, token: str) -> dict[str, Any] | None:
    req = urllib.request.Request(url + "/api/status")
    req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=3) as f:
            doc: dict[str, Any] = json.load(f)
            return doc
    except (OSError, ValueError, urllib.error.URLError):
        return None


class Cluster:
    """N ``twistd -n KIND-node`` processes on NET.1..NET.N (local-cluster's layout)."""

    def __init__(self, kind: str, n: int, work: Path, extra: list[str] | None = None) -> None:
        self.kind = kind
        self.n = n
        self.net = PORC_NET if kind == "porcupine" else YIMA_NET
        self.work = work
        self.extra = extra or []
        self.hosts = [f"{self.net}.{i}" for i in range(1, n + 1)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.secret = work / "cluster.secret"
        self.token = ""

    def admin(self, i: int = 0) -> str:
        return f"http://{self.hosts[i]}:{PORTS['admin']}"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self, timeout: float = 60.0) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        (self.work / "logs").mkdir(parents=True)
        twistd = str(VENV_BIN / "twistd")
        services = ["smtp", "pop3", "imap"] if self.kind == "porcupine" else ["rtsp"]
        for i, host in enumerate(self.hosts, start=1):
            for port in [PORTS["admin"], PORTS["cluster"]] + [PORTS[x] for x in services]:
                need_free(host, port)
            node_id = f"{self.kind[0]}b{i}"

            def ep(port: int, host: str = host) -> str:
                return f"tcp:{port}:interface={host}"

            argv = [
                twistd,
                "-n",
                "--pidfile=",
                "--logfile",
                str(self.work / "logs" / f"{node_id}.log"),
                f"{self.kind}-node",
                "--node-id",
                node_id,
                "--data-dir",
                str(self.work / node_id),
                "--cluster",
                ep(PORTS["cluster"]),
                "--admin",
                ep(PORTS["admin"]),
                "--secret-file",
                str(self.secret),
            ]
            if i > 1:
                argv += ["--join", f"{self.hosts[0]}:{PORTS['cluster']}"]
            if self.kind == "porcupine":
                argv += ["--domain", DOMAIN]
            else:  # the load generators play every session from one address
                argv += ["--rtsp-max-sessions-per-client", "1024"]
            for svc in services:
                argv += [f"--{svc}", ep(PORTS[svc])]
            argv += self.extra
            log = self.work / "logs" / f"{node_id}.log"
            self.logs.append(log)
            self.procs.append(
                PROCS.start(node_id, argv, self.work / "logs" / f"{node_id}.out", cwd=self.work)
            )
            if i == 1:
                # the first node creates the shared secret; the others read it
                end = time.monotonic() + timeout
                while not self.secret.exists() and time.monotonic() < end:
                    self.check_alive()
                    time.sleep(0.1)
        self.token = admin_token(self.secret)
        end = time.monotonic() + timeout
        want = self.n
        while True:
            self.check_alive()
            views = [admin_status(self.admin(i), self.token) for i in range(self.n)]
            if all(v is not None and len(v.get("members", [])) == want for v in views):
                epochs = {v["epoch"] for v in views if v is not None}
                if len(epochs) == 1:
                    self.status = views[0] or {}
                    return
            if time.monotonic() > end:
                raise PartFailed(
                    f"{self.n} {self.kind} nodes did not agree on membership in {timeout:.0f} s "
                    f"(logs in {self.work / 'logs'})"
                )
            time.sleep(0.3)

    def check_alive(self) -> None:
        for p, log in zip(self.procs, self.logs, strict=False):
            if p.poll() is not None:
                out = log.with_suffix(".out")
                raise PartFailed(
                    f"{self.kind}-node exited with {p.returncode}: {tail(log, 2)} {tail(out, 2)}"
                )

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, YIMAPORC_TOKEN=self.token)
        return run([yimaporc_cli(), *args], timeout, env=env)


def require_service(c: Cluster, svc: str, port: int) -> None:
    """Every node listens on svc, or the part fails saying the service is not there yet."""
    for i, host in enumerate(c.hosts):
        if not wait_port(host, port, 10, c.procs[i]):
            c.check_alive()
            listed = sorted((admin_status(c.admin(i), c.token) or {}).get("services", {}))
            raise PartFailed(
                f"{c.kind}-node has no {svc.upper()} service yet: nothing listens on "
                f"{host}:{port} although --{svc} was given (services in status: {listed or 'none'})"
            )


def cli_missing(r: subprocess.CompletedProcess[str]) -> bool:
    return "invalid choice" in r.stderr


def add_users(c: Cluster, names: list[str], replicas: int | None = None) -> None:
    """``yimaporc mail adduser ADDRESS --password pw [--replicas R] --admin URL`` for each."""
    more = ["--replicas", str(replicas)] if replicas else []

    def one(name: str) -> str | None:
        r = c.cli(
            "mail",
            "adduser",
            f"{name}@{DOMAIN}",
            "--password",
            PASSWORD,
            *more,
            "--admin",
            c.admin(0),
        )
        if r.returncode == 0:
            return None
        if cli_missing(r):
            return "yimaporc has no 'mail adduser' command yet"
        return f"yimaporc mail adduser {name}@{DOMAIN}: {r.stderr.strip()[-200:]}"

    first = one(names[0])
    if first:
        raise PartFailed(first)
    with ThreadPoolExecutor(max_workers=4) as ex:
        for err in ex.map(one, names[1:]):
            if err:
                raise PartFailed(err)


def deliver_for_retrieval(s: Settings, hosts: list[str]) -> None:
    """pop001..popU get per_user messages over SMTP (the same 4-8 KB shape as populate)."""
    sys.path.insert(0, str(PEERS))
    import random

    import mail_load  # type: ignore[import-not-found]

    rng = random.Random(1)
    jobs = []
    for u in range(1, s.mail_users + 1):
        for i in range(s.mail_per_user):
            rcpt = f"pop{u:03d}@{DOMAIN}"
            msg = mail_load.make_message(rng, rng.randint(4096, 8192), "load@bench.load", rcpt, i)
            jobs.append((hosts[len(jobs) % len(hosts)], rcpt, msg))
    lock = threading.Lock()
    failures: list[str] = []

    def worker(k: int) -> None:
        for host, rcpt, msg in jobs[k::8]:
            try:
                with smtplib.SMTP(
                    host, PORTS["smtp"], local_hostname="load.bench", timeout=30
                ) as m:
                    m.sendmail("load@bench.load", [rcpt], msg)
            except (OSError, smtplib.SMTPException) as e:
                with lock:
                    failures.append(f"{rcpt}: {e!r}")

    with ThreadPoolExecutor(max_workers=8) as ex:
        list(ex.map(worker, range(8)))
    if failures:
        raise PartFailed(f"porcupine refused retrieval mail ({len(failures)}x, {failures[0]})")


def part_mail_target(s: Settings, res: dict[str, Any], errors: list[str]) -> None:
    mail = res.setdefault("mail", {})
    log = WORK / "mail" / "load.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with scoped():
            c = Cluster("porcupine", 1, WORK / "porcupine-1")
            c.start()
            host = c.hosts[0]
            require_service(c, "smtp", PORTS["smtp"])
            require_service(c, "pop3", PORTS["pop3"])
            require_service(c, "imap", PORTS["imap"])
            add_users(c, users_list(s))
            deliver_for_retrieval(s, c.hosts)
            r: dict[str, Any] = {}
            with Profiler("porcupine-smtp", c.pids, res):
                r["smtp"] = mail_load(s, "smtp", host, PORTS["smtp"], "porcupine", c.pids, log=log)
            for proto in ("pop3", "imap"):
                with Profiler(f"porcupine-{proto}", c.pids, res):
                    r[proto] = mail_load(
                        s,
                        proto,
                        host,
                        PORTS[proto],
                        "porcupine",
                        c.pids,
                        ["--user-suffix", "@" + DOMAIN],
                        log=log,
                    )
            mail["porcupine"] = r
    except PartFailed as e:
        errors.append(f"target porcupine-node: {e}")
        mail["porcupine"] = {"error": str(e)}


def cluster_smtp(
    s: Settings, n: int, replicas: int | None, work: Path, log: Path
) -> dict[str, Any]:
    """SMTP load spread over n porcupine nodes; deliveries/s summed, internode bytes counted."""
    c = Cluster("porcupine", n, work)
    c.start()
    require_service(c, "smtp", PORTS["smtp"])
    add_users(c, [f"user{i:03d}" for i in range(1, s.mail_users + 1)], replicas)
    # one generator per node, the same C connections in total, spread evenly
    per = [s.mail_conns // n + (1 if i < s.mail_conns % n else 0) for i in range(n)]
    with Internode(PORC_NET) as net, ThreadPoolExecutor(max_workers=n) as ex:
        t_launch = time.monotonic()
        futs = [
            ex.submit(
                mail_load,
                s,
                "smtp",
                host,
                PORTS["smtp"],
                f"porcupine-{n}n{f'-r{replicas}' if replicas else ''}-{host}",
                c.pids if i == 0 else [],
                None,
                per[i],
                max(1, 2 // n),
                log,
            )
            for i, host in enumerate(c.hosts)
        ]
        rows = [f.result() for f in futs]
        time.sleep(0.3)  # a counter sample after the window's end
        # mail_load's window opens 0.2 s + warm-up after it starts (~0.15 s to start)
        w0 = t_launch + 0.35 + s.mail_warmup
        inter = net.between(w0, w0 + s.mail_duration)
    rate = sum(r["msgs_per_s"] for r in rows)
    cpu = rows[0].get("server_cpu_pct")
    row: dict[str, Any] = {
        "nodes": n,
        "replicas": replicas,
        "msgs_per_s": rate,
        "p50_ms": max(r["p50_ms"] for r in rows),
        "p99_ms": max(r["p99_ms"] for r in rows),
        "server_cpu_pct": cpu,
        "server_cpu_s_per_msg": cpu / 100.0 / rate if cpu and rate else None,
        "per_node": rows,
    }
    if inter is not None and rate:
        b, pk, _own = inter
        row["internode_bytes_per_msg"] = b / s.mail_duration / rate
        row["internode_packets_per_msg"] = pk / s.mail_duration / rate
    else:
        row["internode"] = net.error or "not measured"
    say(
        f"  porcupine {n} node(s){f' replicas {replicas}' if replicas else ''}: "
        f"{rate:.1f} deliveries/s, internode bytes/message "
        f"{fmt(row.get('internode_bytes_per_msg'), row.get('internode'))}"
    )
    return row


def part_mail_cluster(s: Settings, res: dict[str, Any], errors: list[str]) -> None:
    out = res.setdefault("porcupine_cluster", {})
    log = WORK / "mail" / "load.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    for n in s.cluster_nodes:
        try:
            with scoped():
                out[str(n)] = cluster_smtp(s, n, None, WORK / f"porcupine-cluster-{n}", log)
        except PartFailed as e:
            errors.append(f"target porcupine cluster of {n}: {e}")
            out[str(n)] = {"nodes": n, "error": str(e)}
    # Porcupine's replication experiment: 3 nodes, users made with --replicas R
    rep = res.setdefault("porcupine_replicas", {})
    three = out.get("3", {})
    for r in s.replicas:
        if "error" in three:
            rep[str(r)] = {"replicas": r, "error": "the 3-node cluster failed (see above)"}
            continue
        try:
            with scoped():
                rep[str(r)] = cluster_smtp(s, 3, r, WORK / f"porcupine-replicas-{r}", log)
        except PartFailed as e:
            errors.append(f"target porcupine 3 nodes, replicas {r}: {e}")
            rep[str(r)] = {"replicas": r, "error": str(e)}


# --------------------------------------------------------------------------- streaming
CLIP_SCENES = [  # lavfi sources from cheap to costly to code: the bitrate follows them
    "testsrc2=s=1280x720:r=25:d={d}",
    "mandelbrot=s=1280x720:r=25,trim=duration={d},setpts=PTS-STARTPTS",
    "smptehdbars=s=1280x720:r=25:d={d}",
    "life=s=1280x720:r=25:mold=10:ratio=0.1:death_color=#C83232:life_color=#00ff00,"
    "trim=duration={d},setpts=PTS-STARTPTS",
    "testsrc=s=1280x720:r=25:d={d}",
    "cellauto=s=1280x720:r=25:rule=110,trim=duration={d},setpts=PTS-STARTPTS",
]


def make_clip(s: Settings) -> Path:
    """A 4 Mbit/s VBR MPEG-TS clip (MPEG-2 720p video + MP2 audio), cached by its length.

    Scenes of 2.5 s cycle through sources of very different complexity, so the video
    bitrate swings between ~0.4 and ~11 Mbit/s within every few seconds (average 4,
    maxrate 8, 4 Mbit VBV): a server that paces by bytes instead of media time shows
    it inside a ramp's 8 s window."""
    clip = WORK / f"clip-vbr4m-scenes-{s.clip_seconds}s.ts"
    if clip.exists() and clip.stat().st_size > 1_000_000:
        return clip
    WORK.mkdir(parents=True, exist_ok=True)
    say(f"# generating {clip} ({s.clip_seconds} s, 4 Mbit/s VBR)")
    tmp = clip.with_suffix(".tmp.ts")
    seg = 2.5
    n = int(s.clip_seconds / seg)
    parts = [
        CLIP_SCENES[i % len(CLIP_SCENES)].format(d=seg) + f",format=yuv420p[s{i}]" for i in range(n)
    ]
    graph = ";".join(parts) + ";" + "".join(f"[s{i}]" for i in range(n))
    graph += f"concat=n={n}:v=1:a=0[v]"
    r = run(
        [
            "ffmpeg",
            "-hide_banner",
            "-loglevel",
            "fatal",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=1000:sample_rate=48000",
            "-filter_complex",
            graph,
            "-map",
            "[v]",
            "-map",
            "0:a",
            "-t",
            str(s.clip_seconds),
            "-c:v",
            "mpeg2video",
            "-b:v",
            "4M",
            "-maxrate",
            "8M",
            "-bufsize",
            "4M",
            "-g",
            "25",
            "-c:a",
            "mp2",
            "-b:a",
            "128k",
            "-f",
            "mpegts",
            str(tmp),
        ],
        600,
    )
    if r.returncode != 0:
        raise SystemExit(f"error: ffmpeg could not make the clip: {r.stderr.strip()[-300:]}")
    tmp.rename(clip)
    clip.chmod(0o644)
    return clip


def clip_info(clip: Path) -> dict[str, Any]:
    r = run(
        [
            "ffprobe",
            "-v",
            "error",
            "-show_entries",
            "format=duration,bit_rate",
            "-of",
            "json",
            str(clip),
        ],
        60,
    )
    fmt = json.loads(r.stdout or "{}").get("format", {})
    return {
        "path": str(clip),
        "bytes": clip.stat().st_size,
        "duration_s": fnum(fmt.get("duration")),
        "mbps": (fnum(fmt.get("bit_rate")) or 0) / 1e6,
    }


def part_rtsp_peer(s: Settings, res: dict[str, Any], errors: list[str], clip: Path) -> None:
    out = res.setdefault("rtsp", {})
    work = WORK / "rtsp"
    work.mkdir(parents=True, exist_ok=True)
    try:
        with scoped():
            need_free(PEER_HOST, PORTS["rtsp"])
            p = PROCS.start(
                "gst-rtsp-server",
                [
                    SYSPY,
                    str(PEERS / "gst_rtsp_server.py"),
                    "--file",
                    str(clip),
                    "--address",
                    PEER_HOST,
                    "--port",
                    str(PORTS["rtsp"]),
                ],
                work / "gst.log",
            )
            if not wait_port(PEER_HOST, PORTS["rtsp"], 15, p):
                raise PartFailed(f"GStreamer RTSP server did not start: {tail(work / 'gst.log')}")
            url = f"rtsp://{PEER_HOST}:{PORTS['rtsp']}/test"
            r = ffmpeg_check(url, "gstreamer", work)
            r.update(
                rtsp_ramp(
                    s,
                    url,
                    "gstreamer",
                    [p.pid],
                    max(
                        s.rtsp_warmup + s.rtsp_window + 6.0,
                        min(s.rtsp_budget_peer, 0.4 * (s.left() - 15.0)),
                    ),
                    s.rtsp_start_peer,
                    work / "load.log",
                )
            )
            out["gstreamer"] = r
    except PartFailed as e:
        errors.append(f"peer gstreamer: {e}")
        out["gstreamer"] = {"error": str(e)}


def part_rtsp_target(s: Settings, res: dict[str, Any], errors: list[str], clip: Path) -> None:
    out = res.setdefault("yima", {})
    work = WORK / "rtsp"
    work.mkdir(parents=True, exist_ok=True)
    first_error = None
    for mode, n in s.yima_configs:
        key = f"{mode}-{n}"
        if first_error is not None:
            # the same reason holds for every layout: say it once, do not wait for it again
            out[key] = {"mode": mode, "nodes": n, "error": first_error}
            continue
        try:
            with scoped():
                fanout = mode == "bipartite-fanout"
                node_mode = "bipartite" if fanout else mode
                c = Cluster("yima", n, WORK / f"yima-{key}", ["--mode", node_mode])
                c.start()
                t_ingest = time.monotonic()
                r = c.cli(
                    "media",
                    "ingest",
                    str(clip),
                    "--name",
                    "test",
                    "--admin",
                    c.admin(0),
                    timeout=600,
                )
                if r.returncode != 0:
                    if cli_missing(r):
                        raise PartFailed("yimaporc has no 'media ingest' command yet")
                    raise PartFailed(f"yimaporc media ingest: {r.stderr.strip()[-300:]}")
                say(f"  yima {key}: ingested {clip.name} in {time.monotonic() - t_ingest:.1f} s")
                require_service(c, "rtsp", PORTS["rtsp"])
                url = f"rtsp://{c.hosts[0]}:{PORTS['rtsp']}/test"
                row: dict[str, Any] = {"mode": mode, "nodes": n}
                if n > 1:
                    # first, on cold caches: one stream, bytes crossing between nodes
                    row.update(internode_trial(s, url, f"yima-{key}", c.pids, work, fanout))
                if n == 1 or (mode, n) == s.yima_configs[0]:
                    row.update(ffmpeg_check(url, f"yima-{key}", work))
                todo = len(s.yima_configs) - s.yima_configs.index((mode, n))
                budget = s.rtsp_budget_target * (1.5 if n == 1 and mode == "bipartite" else 1.0)
                # at least one trial (warm-up + window + ~6 s of set-up, pause and baseline)
                budget = min(budget, (s.left() - 45.0) / todo - 15.0)
                budget = max(budget, s.rtsp_warmup + s.rtsp_window + 6.0)
                # start near what this mode sustained with fewer nodes (fewer trials)
                prev = [
                    v.get("max_sessions") or 0
                    for k, v in out.items()
                    if isinstance(v, dict) and (v.get("mode") == mode or k == "bipartite-1")
                ]
                start = max([s.rtsp_start_target] + [int(0.75 * x) for x in prev])
                with Profiler(f"yima-{key}", c.pids, res):
                    ramp = rtsp_ramp(
                        s,
                        url,
                        f"yima-{key}",
                        c.pids,
                        budget,
                        start,
                        work / "load.log",
                        fanout,
                    )
                row.update(ramp)
                out[key] = row
        except PartFailed as e:
            msg = str(e)
            errors.append(f"target yima {mode} {n} node(s): {msg}")
            out[key] = {"mode": mode, "nodes": n, "error": msg}
            if "yet" in msg:
                first_error = msg


def part_retransmit(s: Settings, res: dict[str, Any], errors: list[str], clip: Path) -> None:
    """Packets missing at playout vs loss rate, with and without retransmission: the
    protocol in the deterministic simulator (3 nodes, real schedulers and player core),
    then the real player (``yimaporc play --drop RATE``) against 3 bipartite nodes."""
    out = res.setdefault("retransmit", {})
    r = run(
        [
            PY,
            "-c",
            "import json, sys; from yimaporc.yima.player.sim import loss_table; "
            "print(json.dumps(loss_table(range(int(sys.argv[1])), "
            "[float(x) for x in sys.argv[2].split(',')], float(sys.argv[3]))))",
            str(s.retx_seeds),
            ",".join(str(x) for x in s.retx_rates),
            str(s.retx_sim_s),
        ],
        300,
    )
    try:
        rows = json.loads(r.stdout.strip().splitlines()[-1])
        out["simulator"] = [
            {"drop": d, "missing_without": a, "missing_with": b, "nacked": c} for d, a, b, c in rows
        ]
        for row in out["simulator"]:
            say(
                f"  simulator drop {row['drop']:.2%}: missing at playout "
                f"{row['missing_without']:.3%} without, {row['missing_with']:.3%} with retransmission"
            )
    except (IndexError, ValueError):
        errors.append(f"retransmission simulator: {r.stderr.strip()[-300:]}")
        out["simulator"] = {"error": r.stderr.strip()[-300:]}
    work = WORK / "retransmit"
    try:
        with scoped():
            c = Cluster("yima", 3, WORK / "yima-retransmit", ["--mode", "bipartite"])
            c.start()
            ing = c.cli("media", "ingest", str(clip), "--name", "test", "--admin", c.admin(0))
            if ing.returncode != 0:
                if cli_missing(ing):
                    raise PartFailed("yimaporc has no 'media ingest' command yet")
                raise PartFailed(f"yimaporc media ingest: {ing.stderr.strip()[-300:]}")
            require_service(c, "rtsp", PORTS["rtsp"])
            url = f"rtsp://{c.hosts[0]}:{PORTS['rtsp']}/test"
            work.mkdir(parents=True, exist_ok=True)

            def play(rate: float) -> dict[str, Any]:
                stats = work / f"play-{rate}.json"
                with contextlib.suppress(OSError):
                    stats.unlink()
                p = c.cli(
                    "play",
                    url,
                    "--duration",
                    str(s.retx_play_s),
                    "--drop",
                    str(rate),
                    "--seed",
                    "1",
                    "--stats",
                    str(stats),
                    timeout=s.retx_play_s + 60,
                )
                if p.returncode != 0:
                    if cli_missing(p):
                        raise PartFailed("yimaporc has no 'play' command yet")
                    raise PartFailed(f"yimaporc play --drop {rate}: {p.stderr.strip()[-300:]}")
                st = json.loads(stats.read_text())
                exp = st.get("packets_expected") or 0
                if not exp:
                    raise PartFailed(f"yimaporc play --drop {rate}: no packet expected ({st})")
                return {
                    "drop": rate,
                    "missing_with": st["packets_missing_at_playout"] / exp,
                    # what would be missing without retransmission: the loss rate among
                    # arrivals (the server sends ahead of --duration, so not / expected)
                    "missing_without": st["packets_dropped_simulated"]
                    / max(1, st.get("packets_received") or 0),
                    "nacks_sent": st.get("nacks_sent"),
                    "retransmissions_received": st.get("retransmissions_received"),
                    "packets_expected": exp,
                    "late_packets": st.get("late_packets"),
                }

            # the players run side by side: a few 4 Mbit/s streams are far below capacity
            with ThreadPoolExecutor(max_workers=len(s.retx_rates)) as ex:
                real = list(ex.map(play, s.retx_rates))
            out["player"] = real
            for row in real:
                say(
                    f"  yimaporc play drop {row['drop']:.2%}: missing at playout "
                    f"{row['missing_with']:.3%} with retransmission "
                    f"({row['missing_without']:.3%} dropped)"
                )
    except PartFailed as e:
        errors.append(f"target yima retransmission (3 nodes, yimaporc play): {e}")
        out["player"] = {"error": str(e)}


# --------------------------------------------------------------------------- cost model
def model_module() -> Any:
    """bench/model.py (bench/ is not a package)."""
    import importlib.util

    mod = sys.modules.get("yimaporc_bench_model")
    if mod is None:
        spec = importlib.util.spec_from_file_location("yimaporc_bench_model", HERE / "model.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["yimaporc_bench_model"] = mod
        spec.loader.exec_module(mod)
    return mod


def part_model(s: Settings, res: dict[str, Any], errors: list[str]) -> None:
    """Scaling with one core and one disk per node, simulated with the costs measured
    above (or, for a figure this run lacks, bench/results/ or the reference run's)."""
    try:
        out = model_module().run_model(res, s.quick)
    except Exception as e:  # a model bug must not hide the measured figures
        errors.append(f"cost model: {e!r}")
        res["model"] = {"error": repr(e)}
        return
    res["model"] = out
    y, p = out["yima"], out["porcupine"]
    say(
        f"  model (simulated): Yima-2 fan-out {y['fanout'][0]:.0f} -> {y['fanout'][-1]:.0f} "
        f"streams, Yima-1 {y['master-slave'][0]:.0f} -> {y['master-slave'][-1]:.0f}, "
        f"Porcupine R=1 {p['1'][0]:.0f} -> {p['1'][-1]:.0f} deliveries/s "
        f"({y['nodes'][0]} -> {y['nodes'][-1]} nodes; {out['elapsed_s']:.1f} s)"
    )


# --------------------------------------------------------------------------- report
def val(d: dict[str, Any] | None, *path: str) -> float | None:
    cur: Any = d
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return cur if isinstance(cur, int | float) and cur == cur else None


def why(d: dict[str, Any] | None) -> str:
    if isinstance(d, dict) and "error" in d:
        return "FAILED"
    return "n/a"


def ratio_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """(metric, yimaporc, peer, ratio) rows; a ratio only where both sides were measured."""
    rows: list[dict[str, Any]] = []
    mail = res.get("mail", {})
    target = mail.get("porcupine")
    specs = [
        ("smtp", "msgs_per_s", "SMTP messages/s", True),
        ("smtp", "p50_ms", "SMTP p50 latency ms", False),
        ("smtp", "p99_ms", "SMTP p99 latency ms", False),
        ("smtp", "server_cpu_s_per_msg", "SMTP server CPU s/message", False),
        ("pop3", "sessions_per_s", "POP3 sessions/s", True),
        ("pop3", "msgs_per_s", "POP3 messages/s", True),
        ("pop3", "p99_ms", "POP3 p99 session ms", False),
        ("pop3", "server_cpu_s_per_msg", "POP3 server CPU s/message", False),
        ("imap", "sessions_per_s", "IMAP sessions/s", True),
        ("imap", "msgs_per_s", "IMAP messages/s", True),
        ("imap", "p99_ms", "IMAP p99 session ms", False),
        ("imap", "server_cpu_s_per_msg", "IMAP server CPU s/message", False),
    ]
    for peer in ("postfix+dovecot", "twisted.mail"):
        pd = mail.get(peer)
        for proto, key, label, higher in specs:
            pv = val(pd, proto, key)
            tv = val(target, proto, key)
            if pv is None and proto not in (pd or {}) and "error" not in (pd or {}):
                continue  # this peer does not speak the protocol (twisted.mail: no IMAP)
            rows.append(
                {
                    "group": "mail",
                    "metric": label,
                    "peer": peer,
                    "yimaporc": tv,
                    "peer_value": pv,
                    "ratio": tv / pv if tv is not None and pv else None,
                    "higher_is_better": higher,
                    "yimaporc_note": None if tv is not None else why(target),
                    "peer_note": None if pv is not None else why(pd),
                }
            )
    cl = res.get("porcupine_cluster", {})
    pf = val(mail.get("postfix+dovecot"), "smtp", "msgs_per_s")
    for n in ("1", "2", "3"):
        tv = val(cl.get(n), "msgs_per_s")
        if n in cl:
            rows.append(
                {
                    "group": "mail",
                    "metric": f"Porcupine {n} node(s) deliveries/s",
                    "peer": "postfix+dovecot",
                    "yimaporc": tv,
                    "peer_value": pf,
                    "ratio": tv / pf if tv is not None and pf else None,
                    "higher_is_better": True,
                    "yimaporc_note": None if tv is not None else why(cl.get(n)),
                    "peer_note": None if pf is not None else why(mail.get("postfix+dovecot")),
                }
            )
    gst = res.get("rtsp", {}).get("gstreamer")
    yima = res.get("yima", {})
    for key, y in sorted(yima.items()):
        for metric, label, higher in (
            ("max_sessions", "max streams", True),
            ("server_cpu_pct_per_stream", "CPU %/stream", False),
        ):
            if metric == "server_cpu_pct_per_stream" and key != "bipartite-1":
                continue
            tv = val(y, metric)
            pv = val(gst, metric)
            mode, _, n = key.rpartition("-")
            bound = metric == "max_sessions" and (
                (isinstance(y, dict) and y.get("lower_bound"))
                or (isinstance(gst, dict) and gst.get("lower_bound"))
            )
            rows.append(
                {
                    "group": "streaming",
                    "metric": f"Yima {mode} x{n}: {label}",
                    "note": "ramp hit its time budget: a lower bound" if bound else None,
                    "peer": "gstreamer",
                    "yimaporc": tv,
                    "peer_value": pv,
                    "ratio": tv / pv if tv is not None and pv else None,
                    "higher_is_better": higher,
                    "yimaporc_note": None if tv is not None else why(y),
                    "peer_note": None if pv is not None else why(gst),
                }
            )
    return rows


def fmt(v: float | None, note: str | None = None) -> str:
    if v is None:
        return note or "n/a"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.1f}"
    return f"{v:.3g}"


def print_table(res: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    say("")
    say("== yimaporc / peer ratios (same machine, same run, same load generator)")
    say("   ratio > 1 is better where 'better' says higher, < 1 where it says lower")
    head = f"{'metric':48s} {'peer':16s} {'yimaporc':>10s} {'peer':>10s} {'ratio':>7s}  better"
    say(head)
    say("-" * len(head))
    for r in rows:
        say(
            f"{r['metric']:48s} {r['peer']:16s} {fmt(r['yimaporc'], r['yimaporc_note']):>10s} "
            f"{fmt(r['peer_value'], r['peer_note']):>10s} "
            f"{fmt(r['ratio'], '-'):>7s}  {'higher' if r['higher_is_better'] else 'lower'}"
            + (f"  ({r['note']})" if r.get("note") else "")
        )
    cl = res.get("porcupine_cluster", {})
    rep = res.get("porcupine_replicas", {})
    yima = res.get("yima", {})
    if cl or rep or yima or res.get("retransmit"):
        say("")
        say("== paper experiments (yimaporc alone; all nodes share this machine's 2 cores)")
    one = val(cl.get("1"), "msgs_per_s")
    for k, d in sorted(cl.items()):
        v = val(d, "msgs_per_s")
        say(
            f"  Porcupine {k} node(s): deliveries/s {fmt(v, why(d))}"
            + (f"  x{v / one:.2f} of 1 node" if v is not None and one else "")
            + f"  internode bytes/message {fmt(val(d, 'internode_bytes_per_msg'), '-')}"
        )
    for k, d in sorted(rep.items()):
        say(
            f"  Porcupine 3 nodes, replicas {k}: deliveries/s {fmt(val(d, 'msgs_per_s'), why(d))}"
            f"  internode bytes/message {fmt(val(d, 'internode_bytes_per_msg'), '-')}"
        )
    for k, d in yima.items():
        mx = val(d, "max_sessions")
        lb = ">=" if isinstance(d, dict) and d.get("lower_bound") else ""
        say(
            f"  Yima {k}: max streams {lb}{fmt(mx, why(d))}  internode bytes per delivered "
            f"byte {fmt(val(d, 'internode_bytes_per_delivered_byte'), '-')}"
        )
    rt = res.get("retransmit", {})
    for src in ("simulator", "player"):
        pts = rt.get(src)
        if isinstance(pts, list):
            say(f"  retransmission ({src}): drop -> missing at playout without / with")
            for p in pts:
                say(
                    f"    {p['drop']:6.2%} -> {p['missing_without']:7.3%} / {p['missing_with']:7.3%}"
                )
        elif isinstance(pts, dict):
            say(f"  retransmission ({src}): FAILED")
    u = res.get("udp", {})
    if u:
        say("")
        say("== loopback ceiling, one Python sender process, 1316-byte datagrams")
        for k in ("sendto", "gso"):
            if k in u:
                d = u[k]
                say(
                    f"  {k:7s} {d['tx_pps']:>10.0f} pkt/s  {d['tx_mbps']:>7.0f} Mbit/s  "
                    f"= {d['tx_mbps'] / 4.0:.0f} x 4 Mbit/s streams (sender CPU {d['tx_cpu_pct']:.0f}%,"
                    f" {d.get('tx_pps_per_core', 0) / 1e3:.0f}k pkt/s per core-second)"
                )
        if "sendto" in u and "gso" in u:
            say(f"  gso / sendto = {u['gso']['tx_pps'] / u['sendto']['tx_pps']:.2f}")
        for key, y in sorted(res.get("yima", {}).items()):
            dpc, gso = val(y, "datagrams_per_core_s"), u.get("gso", {}).get("tx_pps_per_core")
            if dpc is not None and gso:
                say(
                    f"  yima {key}: {dpc / 1e3:.0f}k datagrams per core-second = {dpc / gso:.2f} x gso"
                )
    m = res.get("model")
    if isinstance(m, dict) and "yima" in m:
        say("")
        for line in model_module().report(m):
            say(line)
    elif isinstance(m, dict):
        say("")
        say("== cost model (simulated): FAILED")


def plots(res: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    RESULTS.mkdir(parents=True, exist_ok=True)

    # 1. mail rates per server
    mail = res.get("mail", {})
    servers = [k for k in ("porcupine", "postfix+dovecot", "twisted.mail") if k in mail]
    if servers:
        tests = [("smtp", "msgs_per_s", "SMTP msg/s"), ("pop3", "sessions_per_s", "POP3 sess/s")]
        tests.append(("imap", "sessions_per_s", "IMAP sess/s"))
        fig, ax = plt.subplots(figsize=(8, 4.5))
        width = 0.8 / len(servers)
        for i, srv in enumerate(servers):
            ys = [val(mail[srv], p, k) or 0.0 for p, k, _ in tests]
            xs = [j + i * width for j in range(len(tests))]
            bars = ax.bar(xs, ys, width, label=srv + (" (FAILED)" if "error" in mail[srv] else ""))
            for b, y in zip(bars, ys, strict=False):
                if y:
                    ax.annotate(
                        f"{y:.0f}",
                        (b.get_x() + b.get_width() / 2, y),
                        ha="center",
                        va="bottom",
                        fontsize=8,
                    )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tests))], [t[2] for t in tests])
        ax.set_ylabel("per second")
        ax.set_title("Mail: same load, same machine (16 connections, 4-8 KB messages)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "mail_rates.png", dpi=110)
        plt.close(fig)
        made.append("mail_rates.png")

    # 2. Porcupine deliveries/s vs nodes (Porcupine paper, throughput vs cluster size)
    cl = res.get("porcupine_cluster", {})
    if cl:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ns = sorted(int(k) for k in cl)
        ys = [val(cl[str(n)], "msgs_per_s") for n in ns]
        pts = [(n, y) for n, y in zip(ns, ys, strict=False) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="Porcupine (yimaporc)")
        else:
            ax.text(
                0.5,
                0.5,
                "porcupine target FAILED\n(see results.json)",
                ha="center",
                transform=ax.transAxes,
            )
        pf = val(mail.get("postfix+dovecot"), "smtp", "msgs_per_s")
        if pf:
            ax.axhline(pf, color="gray", ls="--", label="Postfix, 1 host")
        tw = val(mail.get("twisted.mail"), "smtp", "msgs_per_s")
        if tw:
            ax.axhline(tw, color="gray", ls=":", label="twisted.mail, 1 process")
        rep = res.get("porcupine_replicas", {})
        rpts = [
            (int(k), val(d, "msgs_per_s"))
            for k, d in sorted(rep.items())
            if val(d, "msgs_per_s") is not None
        ]
        for r, y in rpts:
            ax.plot([3], [y], "^", label=f"3 nodes, replicas {r}")
        ax.set_xlabel("nodes (processes on one 2-core machine)")
        ax.set_ylabel("SMTP deliveries / s")
        ax.set_xticks([1, 2, 3])
        ax.set_ylim(bottom=0)
        ax.set_title("Porcupine deliveries vs cluster size")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "porcupine_nodes.png", dpi=110)
        plt.close(fig)
        made.append("porcupine_nodes.png")

    # 3. Yima streams vs nodes, bipartite vs master-slave (Yima paper's Fig. shape)
    yima = res.get("yima", {})
    gst = val(res.get("rtsp", {}).get("gstreamer"), "max_sessions")
    if yima or gst:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        anything = False
        for mode, style in (
            ("bipartite", "o-"),
            ("bipartite-fanout", "D-"),
            ("master-slave", "s--"),
        ):
            pts = []
            for y in yima.values():
                same = y.get("mode") == mode or (
                    y.get("mode") == "bipartite" and y.get("nodes") == 1
                )
                if same and val(y, "max_sessions") is not None:
                    pts.append((y["nodes"], val(y, "max_sessions"), bool(y.get("lower_bound"))))
            pts.sort()
            if pts:
                anything = True
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"Yima {mode}")
                for x, yv, lb in pts:
                    if lb:  # the ramp's time ran out first: at least this many
                        ax.annotate(
                            ">=", (x, yv), textcoords="offset points", xytext=(4, 4), fontsize=8
                        )
        if not anything:
            ax.text(
                0.5,
                0.6,
                "yima target FAILED\n(see results.json)",
                ha="center",
                transform=ax.transAxes,
            )
        if gst:
            ax.axhline(gst, color="gray", ls="--", label="GStreamer RTSP, 1 process")
        u = res.get("udp", {})
        ax.set_xlabel("nodes (processes on one 2-core machine)")
        ax.set_ylabel("concurrent 4 Mbit/s streams, <= 0.1% late/lost")
        ax.set_xticks([1, 2, 3])
        ax.set_ylim(bottom=0)
        title = "Streams sustained vs nodes"
        if "sendto" in u:
            title += f"\n(loopback sendto ceiling = {u['sendto']['tx_mbps'] / 4:.0f} streams)"
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "yima_nodes.png", dpi=110)
        plt.close(fig)
        made.append("yima_nodes.png")

    # 3b. retransmission (Yima paper's missing-at-playout vs loss figure)
    rt = res.get("retransmit", {})
    if rt:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for src, style in (("simulator", "--"), ("player", "-")):
            pts = rt.get(src)
            if not isinstance(pts, list) or not pts:
                continue
            xs = [100 * p["drop"] for p in pts]
            ax.plot(
                xs,
                [100 * p["missing_without"] for p in pts],
                "s" + style,
                label=f"{src}: no retransmission",
            )
            ax.plot(
                xs,
                [100 * p["missing_with"] for p in pts],
                "o" + style,
                label=f"{src}: with retransmission",
            )
        if isinstance(rt.get("player"), dict):
            ax.text(
                0.02,
                0.95,
                "real player FAILED (see results.json)",
                transform=ax.transAxes,
                fontsize=8,
                va="top",
            )
        ax.set_xlabel("packets dropped at the client (%)")
        ax.set_ylabel("packets missing at playout (%)")
        ax.set_title("Selective retransmission, 3 nodes, bipartite")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / "retransmit.png", dpi=110)
        plt.close(fig)
        made.append("retransmit.png")

    # 4. all ratios
    rr = [r for r in rows if r["ratio"] is not None]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.35 * max(1, len(rr)) + 1.2)))
    if rr:
        labels = [f"{r['metric']} / {r['peer']}" for r in rr]
        vals = [r["ratio"] for r in rr]
        colors = [
            "tab:green" if (v >= 1) == r["higher_is_better"] else "tab:red"
            for v, r in zip(vals, rr, strict=False)
        ]
        # bars grow from 1 (parity): left for < 1, right for > 1
        ax.barh(range(len(rr)), [v - 1.0 for v in vals], left=1.0, color=colors)
        ax.set_yticks(range(len(rr)), labels, fontsize=8)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xscale("log")
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.2g}", (v, i), va="center", fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("yimaporc / peer, log scale (green = yimaporc better)")
    else:
        ax.text(
            0.5,
            0.5,
            "no ratio: every yimaporc target failed (see results.json)",
            ha="center",
            transform=ax.transAxes,
        )
        ax.set_axis_off()
    ax.set_title("yimaporc / peer")
    fig.tight_layout()
    fig.savefig(RESULTS / "ratios.png", dpi=110)
    plt.close(fig)
    made.append("ratios.png")

    # 4b. the cost model's scaling (simulated, not measured)
    m = res.get("model")
    if isinstance(m, dict) and "yima" in m:
        model_module().plot(m, RESULTS / "model_scaling.png")
        made.append("model_scaling.png")

    # 5. UDP ceiling
    u = res.get("udp", {})
    if u:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ks = [k for k in ("sendto", "gso") if k in u]
        ax.bar(ks, [u[k]["tx_mbps"] for k in ks], color="tab:blue")
        ax.set_ylabel("Mbit/s sent (1316-byte datagrams)")
        ax.set_title("Loopback ceiling, one Python process")
        fig.tight_layout()
        fig.savefig(RESULTS / "udp_ceiling.png", dpi=110)
        plt.close(fig)
        made.append("udp_ceiling.png")
    return made


def git_rev() -> str:
    r = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], 10)
    return r.stdout.strip() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="short settings (make bench QUICK=1)")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="sample the yimaporc targets with py-spy under load (top frames in results.json)",
    )
    a = ap.parse_args()
    global PROFILE
    PROFILE = a.profile
    parts = [p.strip() for p in a.only.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        print(f"error: unknown part(s) {bad}; choose from {PARTS}", file=sys.stderr)
        return 2
    s = Settings(a.quick)
    t0 = time.monotonic()

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    if set(parts) - {"model"}:
        install()
    else:
        install(peers=False)  # the model needs no server, only matplotlib
    for h in (PEER_HOST, f"{PORC_NET}.1", f"{YIMA_NET}.1"):
        ensure_loopback_alias(h)
    WORK.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "make bench" + (" QUICK=1" if a.quick else ""),
        "parts": parts,
        "git": git_rev(),
        "machine": {
            "cores": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "loadavg_start": os.getloadavg(),
        },
        "settings": s.as_dict(),
    }
    errors: list[str] = []
    try:
        timings: dict[str, float] = res.setdefault("part_seconds", {})

        def timed(name: str, title: str, fn: Callable[[], None]) -> None:
            if name not in parts:
                return
            say(f"# {title}  [{s.left():.0f} s of the run's time left]")
            t = time.monotonic()
            fn()
            timings[name] = round(time.monotonic() - t, 1)

        def udp() -> None:
            try:
                part_udp(s, res)
            except PartFailed as e:
                errors.append(f"udp ceiling: {e}")

        timed("udp", "udp ceiling", udp)
        timed(
            "mail-peers",
            "mail peers: postfix+dovecot, twisted.mail",
            lambda: part_mail_peers(s, res, errors),
        )
        timed(
            "mail-target", "mail target: porcupine-node", lambda: part_mail_target(s, res, errors)
        )
        timed(
            "mail-cluster",
            "porcupine cluster: 1, 2, 3 nodes, replicas",
            lambda: part_mail_cluster(s, res, errors),
        )
        if {"rtsp-peer", "rtsp-target", "retransmit"} & set(parts):
            clip = make_clip(s)
            res["clip"] = clip_info(clip)
            say(f"# clip: {res['clip']}")
            timed(
                "rtsp-peer",
                "streaming peer: GStreamer RTSP server",
                lambda: part_rtsp_peer(s, res, errors, clip),
            )
            timed(
                "rtsp-target",
                "streaming target: yima-node",
                lambda: part_rtsp_target(s, res, errors, clip),
            )
            timed(
                "retransmit",
                "retransmission: missing at playout vs loss (simulator, then yimaporc play)",
                lambda: part_retransmit(s, res, errors, clip),
            )
        timed(
            "model",
            "cost model (simulated): 1-8 nodes, one core and one disk each",
            lambda: part_model(s, res, errors),
        )
    except KeyboardInterrupt:
        errors.append("interrupted")
    finally:
        PROCS.stop_all()
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    res["errors"] = errors
    rows = ratio_rows(res)
    res["ratios"] = rows
    print_table(res, rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    try:
        made = plots(res, rows)
        say(f"\nwrote {RESULTS / 'results.json'} and {', '.join(made)} in {RESULTS}")
    except Exception as e:  # plots must not hide the figures above
        errors.append(f"plots: {e!r}")
    say(f"elapsed {res['elapsed_s']:.0f} s")
    if errors:
        print("\nFAILED parts (no ratio is reported against them):", file=sys.stderr)
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
