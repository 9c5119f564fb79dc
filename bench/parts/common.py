"""What every part shares: settings, constants, processes stopped by PID, profiles,
set-up, and the small helpers (``say``, ``run``, ``fnum``, ``fmt``)."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]  # bench/
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
    "scaling-yima",  # scaled-down nodes (own CPU group each): streams for 1..8 nodes
    "scaling-mail",  # and Porcupine deliveries/retrievals for 1..8 nodes, replicas 1-3
    "model",  # last: it takes its costs from the figures measured before it
]
# names that stand for several parts
ALIASES = {"scaling": ["scaling-yima", "scaling-mail"]}


class PartFailed(Exception):
    """A server did not start or serve; the message is the user-facing reason.

    ``figures``: what was measured before it failed and still holds on its own (a ramp
    that did not find its limit still measured CPU per stream at its last passing N);
    never the figure the failure withholds (that ramp's capacity)."""

    def __init__(self, msg: str, figures: dict[str, Any] | None = None) -> None:
        super().__init__(msg)
        self.figures = dict(figures or {})

    def row(self) -> dict[str, Any]:
        """The part's result row: the reason and the figures that hold."""
        return {**self.figures, "error": str(self)}


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
        # a trial fails when more than rtsp_max_bad of the packets the clients expected
        # over the window were lost or arrived rtsp_late_ms after their scheduled time
        self.rtsp_window = 4.0 if quick else 20.0
        self.rtsp_max_bad = 0.001
        self.rtsp_late_ms = 200.0
        # bisection stops when the first failing N is within this fraction of the
        # largest passing one (and always at N + 1)
        self.rtsp_resolution = 0.1
        self.rtsp_budget_peer = 25.0 if quick else 90.0
        self.rtsp_budget_target = 15.0 if quick else 60.0
        self.rtsp_start_peer = 128 if quick else 32
        # x this per passing trial; 1.25 from a start given near GStreamer's known limit
        # (--rtsp-peer-start): a GStreamer trial far above its limit costs a minute of
        # set-up and teardown (384 sessions: 24 s and 18 s), so the ramp overshoots little
        self.rtsp_growth_peer = 2.0
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
        # --yima-workers 1,2: each rtsp-target layout once per setting, side by side (keys
        # MODE-wW-N); empty: the nodes' default (one delivery worker per core)
        self.yima_workers: list[str] = []
        #: porcupine-node --mail-workers of the mail-target part (0: none).
        self.mail_workers = 0
        # --yima-send-ahead 10,40: and once per yima-node --send-ahead-ms (keys MODE-saS-N)
        self.yima_send_ahead: list[str] = []
        # scaling (bench/parts/scaling.py): scaled-down nodes, each in its own CPU group
        self.scaling_nodes = [1, 2, 4, 8] if quick else list(range(1, 9))
        self.scaling_quota = 0.1  # cores per node: 8 nodes use 0.8 of this machine's 2
        self.scaling_replicas = [1, 2, 3]
        # SMTP/POP3 connections per node: 8, so 8 nodes of 0.1 core are saturated (with 4
        # each they ran at ~0.078 of 0.1 core: the closed loop, not the nodes, was the
        # limit; one node is at its quota with either)
        self.scaling_mail_conns = 8
        self.scaling_pop_warmup = 3.0
        self.scaling_pop_window = 12.0 if quick else 20.0
        self.scaling_clip_video_mbps = 1  # the bench clip's scenes at 1 Mbit/s video
        # sessions start spread over its first part (all but the last ~55 s): 240 s puts
        # ~150 blocks in play, so each of 8 nodes serves close to 1/8 of the load (over
        # the ~30 blocks of a 90 s clip the busiest node of 8 had ~1.5x the mean)
        self.scaling_clip_seconds = 240
        self.scaling_block_payloads = 256  # the default block (337 KB): ~200 per clip
        self.scaling_growth = 1.5  # ramp steps while trials pass (then bisection)
        # a node held to 0.1 core is throttled for up to 90 ms of each 100 ms CFS period:
        # its packets are late by that much at any load, so late = 500 ms here
        self.scaling_late_ms = 500.0
        # first trial at one node: a 0.1-core node sustained 121-181 streams on 2026-12-06
        # (after the scheduler heap); from 16 the QUICK ramps ran out of their budgets
        self.scaling_start = 48
        self.scaling_max_streams = 512
        # bisection to the first failing N: N + 1 in the full run, within 10 % with QUICK
        self.scaling_resolution = 0.1 if quick else 0.0
        # the Yima ramps share this (a ramp gets at least scaling_ramp_min_s)
        self.scaling_yima_total_s = 540.0 if quick else 2400.0
        self.scaling_ramp_min_s = 80.0 if quick else 150.0
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
        self.afterwards: list[tuple[str, Callable[[], None]]] = []

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

    def after_stop(self, name: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the processes are stopped (e.g. remove their CPU groups)."""
        self.afterwards.append((name, fn))

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
        for name, fn in reversed(self.afterwards):
            try:
                fn()
            except Exception as e:  # say it, go on with the others
                say(f"  cleanup {name}: {e!r}")
        self.afterwards.clear()


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


def users_list(s: Settings) -> list[str]:
    return [f"{p}{i:03d}" for i in range(1, s.mail_users + 1) for p in ("user", "pop")]


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


def fmt(v: float | None, note: str | None = None) -> str:
    if v is None:
        return note or "n/a"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.1f}"
    return f"{v:.3g}"
