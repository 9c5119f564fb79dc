"""Start, poll and stop real ``twistd`` node processes for end-to-end tests.

Polling waits on a real condition (an HTTP answer, a membership view) with a
deadline; every process started here is stopped by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        pause.wait(interval)


def twistd() -> str:
    """The twistd of the running interpreter's environment."""
    return str(Path(sys.executable).parent / "twistd")


@attrs.define
class NodeProc:
    """One ``twistd -n KIND-node`` child."""

    kind: str
    node_id: str
    host: str
    data_dir: Path
    cluster_port: int
    admin_port: int
    extra: list[str] = attrs.field(factory=list)
    join: list[str] = attrs.field(factory=list)
    secret_file: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def admin_url(self) -> str:
        """``http://host:port`` of its admin API."""
        return f"http://{self.host}:{self.admin_port}"

    @property
    def log_path(self) -> Path:
        """Where twistd logs."""
        return self.data_dir.parent / f"{self.node_id}.log"

    def argv(self) -> list[str]:
        """The command line."""
        args = [
            twistd(), "-n", "--pidfile=", "--logfile", str(self.log_path),
            f"{self.kind}-node",
            "--node-id", self.node_id,
            "--data-dir", str(self.data_dir),
            "--cluster", f"tcp:{self.cluster_port}:interface={self.host}",
            "--admin", f"tcp:{self.admin_port}:interface={self.host}",
        ]  # fmt: skip
        if self.secret_file is not None:
            args += ["--secret-file", str(self.secret_file)]
        for seed in self.join:
            args += ["--join", seed]
        return args + self.extra

    def start(self) -> None:
        """Launch the process."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the process and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def status(self) -> dict[str, Any] | None:
        """The node's status document, or None while it does not answer."""
        if self.process is not None and self.process.poll() is not None:
            log = (
                self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
            )
            raise AssertionError(f"{self.node_id} exited with {self.process.returncode}:\n{log}")
        try:
            with urllib.request.urlopen(self.admin_url + "/api/status", timeout=2) as r:
                doc: dict[str, Any] = json.load(r)
                return doc
        except OSError:
            return None

    def members(self) -> set[str] | None:
        """Member ids in this node's view, or None while it does not answer."""
        doc = self.status()
        return None if doc is None else {m["node_id"] for m in doc["members"]}


def views_agree(nodes: list[NodeProc]) -> bool:
    """All ``nodes`` answer with the same epoch and exactly themselves as members."""
    want = {n.node_id for n in nodes}
    docs = [n.status() for n in nodes]
    if any(d is None for d in docs):
        return False
    epochs = {d["epoch"] for d in docs if d is not None}
    return len(epochs) == 1 and all(
        {m["node_id"] for m in d["members"]} == want for d in docs if d is not None
    )


def mail_node(
    tmp_path: Path,
    name: str,
    host: str,
    ports: dict[str, int],
    secret: Path,
    join: list[str],
    extra: list[str] | None = None,
) -> NodeProc:
    """A ``porcupine-node`` for ``example.org`` on ``host``; ``ports`` has ``cluster``,
    ``admin`` and any of ``smtp``, ``pop3``, ``imap``; ``extra`` more options."""
    args = ["--domain", "example.org"]
    for svc in ("smtp", "pop3", "imap"):
        if svc in ports:
            args += [f"--{svc}", f"tcp:{ports[svc]}:interface={host}"]
    return NodeProc(
        "porcupine", name, host, tmp_path / name / "data", ports["cluster"], ports["admin"],
        extra=args + (extra or []), join=join, secret_file=secret,
    )  # fmt: skip


@contextlib.contextmanager
def three_nodes(
    tmp_path: Path, make: Callable[[Path, int, Path], NodeProc]
) -> Iterator[tuple[list[NodeProc], Path]]:
    """``make(tmp_path, i, secret)`` for i = 1, 2, 3 with a fresh shared secret; all
    started, and all stopped (SIGTERM, by PID) at the end."""
    secret = tmp_path / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    nodes = [make(tmp_path, i, secret) for i in (1, 2, 3)]
    try:
        for n in nodes:
            n.start()
        yield nodes, secret
    finally:
        for n in nodes:
            n.kill(signal.SIGTERM)


@contextlib.contextmanager
def yima_cluster(
    tmp_path: Path,
    net: str,
    count: int = 3,
    disks: int = 0,
    mesh: bool = False,
    rtsp: int = 18554,
    extra: list[str] | None = None,
) -> Iterator[list[NodeProc]]:
    """``count`` yima nodes on ``net``.1, .2, ... (RTSP on ``rtsp``), with ``disks``
    ``--disk`` directories each (0: the default one), joining the first or, with
    ``mesh``, naming every other node (docs/deploy.md); yielded once every node sees
    them all and all their disks; all stopped (SIGTERM, by PID) at the end."""
    secret = tmp_path / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    nodes = []
    for i in range(1, count + 1):
        args = ["--rtsp", f"tcp:{rtsp}:interface={net}.{i}", *(extra or [])]
        for d in range(disks):
            args += ["--disk", str(tmp_path / f"y{i}" / f"disk{d}")]
        others = [j for j in range(1, count + 1) if j != i] if mesh else ([1] if i > 1 else [])
        join = [f"{net}.{j}:17946" for j in others]
        nodes.append(NodeProc("yima", f"y{i}", f"{net}.{i}", tmp_path / f"y{i}" / "data",
                              17946, 18080, args, join, secret))  # fmt: skip
    total = count * max(disks, 1)
    try:
        for n in nodes:
            n.start()
        wait_for(lambda: views_agree(nodes), 30, f"{count} yima nodes to agree")
        wait_for(
            lambda: all(len((n.status() or {}).get("disks", [])) == total for n in nodes),
            30,
            f"{total} disks",
        )
        yield nodes
    finally:
        for n in nodes:
            n.kill(signal.SIGTERM)


def mail_settled(nodes: list[NodeProc]) -> bool:
    """Every node sees exactly ``nodes``, each with buckets, none is settling, and
    none holds back UID marks for a read lease of an earlier view (docs/mail.md:
    buckets that moved get their first UIDs up to one lease after a view change)."""
    want = {n.node_id for n in nodes}
    for n in nodes:
        doc = n.status()
        if doc is None or {m["node_id"] for m in doc["members"]} != want:
            return False
        if set(doc.get("buckets", {})) != want or doc["mail_cluster"]["settling_buckets"]:
            return False
        if doc["mail_cluster"].get("read_lease", {}).get("marks_blocked"):
            return False
    return True


def framemd5(path: Path, ffmpeg: str = "ffmpeg") -> list[str]:
    """The MD5 of every video frame of ``path`` (ffmpeg's framemd5 muxer)."""
    out = subprocess.run(
        [ffmpeg, "-hide_banner", "-loglevel", "error", "-i", str(path), "-map", "0:v",
         "-f", "framemd5", "-"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return [line.split(",")[-1].strip() for line in out.splitlines() if not line.startswith("#")]


def ffmpeg_record(url: str, out: Path, transport: str = "tcp") -> subprocess.Popen[bytes]:
    """ffmpeg recording ``url`` (RTSP over ``transport``) to the MPEG-TS file ``out``."""
    return subprocess.Popen(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-rtsp_transport", transport, "-i", url,
         "-c", "copy", "-f", "mpegts", "-y", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


def reactor_lag(node: NodeProc) -> dict[str, float]:
    """The node's ``reactor_lag`` (``max_ms``, ``p99_ms`` over the last minute)."""
    doc = wait_for(node.status, 10, f"{node.node_id} to answer /api/status")
    lag: dict[str, float] = doc["reactor_lag"]
    return lag


def assert_lag_small(nodes: list[NodeProc], max_ms: float = 1000.0) -> dict[str, float]:
    """Fail unless every node's reactor ran its timers at most ``max_ms`` late in the last
    minute; return ``{node_id: max_ms}`` for the report."""
    seen = {n.node_id: reactor_lag(n)["max_ms"] for n in nodes}
    slow = {k: v for k, v in seen.items() if v > max_ms}
    assert not slow, f"reactor lag over {max_ms} ms: {slow}"
    return seen


def view_changes(node: NodeProc) -> int:
    """How many views the node committed so far (its ``membership: epoch`` log lines)."""
    if not node.log_path.exists():
        return 0
    text = node.log_path.read_text(errors="replace")
    return text.count("membership: epoch ")
