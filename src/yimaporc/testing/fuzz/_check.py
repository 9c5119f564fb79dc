"""After each batch: is the node alive, serving, bounded, quiet in its log, and in the same view?"""

from __future__ import annotations

import imaplib
import poplib
import re
import smtplib
import socket
import threading
import time
from pathlib import Path

import attrs

from ...admin.client import AdminClient, AdminError
from ..procs import NodeProc
from ._lab import Lab, slot_of
from ._seeds import MEDIA, PASSWORD, SINK, USER

BAD_LOG = ("Traceback", "Unhandled Error")
_SHORT = re.compile(r'(?<=File ")[^"]*/(?:site-packages|src)/')
_BRIEF = re.compile(r"^(/\S+\.py):(\d+):(\S+)$")  # a Failure's brief traceback line
_SYSTEM = re.compile(r"^\S+ \[([^\]]*)\] ")


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (/proc/PID/status VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    """Open file descriptors of ``pid`` (/proc/PID/fd)."""
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


@attrs.frozen
class Traceback:
    """One traceback in a node's log: its exception line, innermost frame and source slot."""

    exception: str
    frame: str
    slot: int | None

    @property
    def signature(self) -> str:
        """What makes two tracebacks the same bug."""
        return f"{self.exception.split(':')[0]} at {self.frame}"


def parse_tracebacks(text: str) -> list[Traceback]:
    """Tracebacks and "Unhandled Error" blocks in twistd log ``text``.

    twistd writes a multi-line event as a header line (time, ``[system]``) and
    continuation lines starting with a tab.
    """
    out: list[Traceback] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not any(b in line for b in BAD_LOG):
            i += 1
            continue
        m = _SYSTEM.match(line)
        system = m.group(1) if m else ""
        host = system.rsplit(",", 1)[-1]
        block = [line]
        i += 1
        while i < len(lines) and lines[i].startswith("\t"):
            block.append(lines[i][1:])
            i += 1
        frames = [k for k, b in enumerate(block) if b.startswith("  File ") or _BRIEF.match(b)]
        failure = [b for b in block if b.startswith("Failure: ")]
        if failure:  # a logged Failure: "Failure: type: message", brief frames below
            exception = failure[0][len("Failure: ") :].strip()
        else:  # the first unindented line after the innermost frame (and its source line)
            after = block[frames[-1] + 1 :] if frames else block[1:]
            lines_ = [b for b in after if b.strip() and not b.startswith((" ", "Traceback"))]
            exception = lines_[0].strip() if lines_ else line[m.end() if m else 0 :].strip()
        if frames:
            last = block[frames[-1]].strip()
            brief = _BRIEF.match(last)
            if brief:
                last = f'File "{brief.group(1)}", line {brief.group(2)}, in {brief.group(3)}'
            frame = _SHORT.sub("", last)
        else:
            frame = "(no frame)"
        out.append(Traceback(exception[:300], frame[:300], slot_of(host)))
    return out


@attrs.define
class LogWatch:
    """New bytes of a twistd log since the last look.

    twistd rotates LOG to LOG.1 (shifting LOG.1 to LOG.2 ...) every megabyte; the file
    we were reading is found again by its inode, read from where we stopped, then every
    newer rotated file and LOG itself.
    """

    path: Path
    offset: int = 0
    inode: int = 0

    def mark(self) -> None:
        """Skip everything written so far."""
        st = self.path.stat()
        self.offset, self.inode = st.st_size, st.st_ino

    def _rotated(self) -> list[Path]:
        """LOG.1, LOG.2, ... (newest first)."""
        found = []
        n = 1
        while (p := self.path.with_name(f"{self.path.name}.{n}")).exists():
            found.append(p)
            n += 1
        return found

    def read_new(self) -> str:
        """Text appended since the last call (retried when a rotation races the reading)."""
        for _ in range(10):
            try:
                return self._read_new()
            except FileNotFoundError:
                continue
        return ""

    def _read_new(self) -> str:
        if not self.path.exists():
            return ""
        st = self.path.stat()
        files: list[tuple[Path, int]] = [(self.path, self.offset)]
        if st.st_ino != self.inode:
            rotated = self._rotated()
            older = [i for i, p in enumerate(rotated) if p.stat().st_ino == self.inode]
            # ours, then every newer one whole, then the current file
            newer = rotated[: older[0]] if older else rotated[:0]
            files = ([(rotated[older[0]], self.offset)] if older else []) + [
                (p, 0) for p in reversed(newer)
            ]
            files.append((self.path, 0))
        chunks = []
        for path, offset in files:
            with path.open("rb") as f:
                f.seek(offset)
                chunks.append(f.read())
        self.offset, self.inode = len(chunks[-1]) + files[-1][1], st.st_ino
        return b"".join(chunks).decode("utf-8", "replace")


@attrs.frozen
class Bounds:
    """How far RSS and fds may grow over the baseline, and how long a real client may take."""

    rss_growth_kib: int = 200 * 1024
    fd_growth: int = 64
    client_timeout: float = 10.0


@attrs.frozen
class CheckResult:
    """What one check found; ``problems`` empty means the node is fine."""

    problems: tuple[str, ...]
    tracebacks: tuple[Traceback, ...]
    rss_kib: int
    fds: int
    client_seconds: float


def _view(node: NodeProc) -> tuple[int, frozenset[str]] | None:
    try:
        doc = node.status()
    except AssertionError:  # the process exited
        return None
    if doc is None:
        return None
    return doc["epoch"], frozenset(m["node_id"] for m in doc["members"])


def real_client(lab: Lab, door: str, timeout: float) -> None:
    """A real client's normal session on ``door``; raises if the answer is wrong or late."""
    host, port = lab.address(door)
    if door == "smtp":
        with smtplib.SMTP(host, port, timeout=timeout) as s:
            refused = s.sendmail("check@example.net", [SINK], b"Subject: check\r\n\r\nok\r\n")
            if refused:
                raise AssertionError(f"smtp refused {refused}")
    elif door == "pop3":
        p = poplib.POP3(host, port, timeout=timeout)
        try:
            p.user(USER)
            p.pass_(PASSWORD)
            count, _size = p.stat()
            if count < 0:
                raise AssertionError("pop3 STAT")
        finally:
            p.quit()
    elif door == "imap":
        i = imaplib.IMAP4(host, port, timeout=timeout)
        try:
            if i.login(USER, PASSWORD)[0] != "OK" or i.select("INBOX")[0] != "OK":
                raise AssertionError("imap login/select")
            if i.search(None, "ALL")[0] != "OK":
                raise AssertionError("imap search")
        finally:
            i.logout()
    elif door == "rtsp":
        rtsp_describe(host, port, timeout)
    elif door == "admin":
        doc = AdminClient(f"http://{host}:{port}", timeout=timeout).get("/api/status")
        if doc.get("node_id") != lab.node_for(door).node_id:
            raise AssertionError(f"admin status: {doc!r:.200}")
    elif door.startswith("cluster"):
        node = lab.node_for(door)
        result = AdminClient(node.admin_url, lab.token(), timeout=timeout).get("/api/rpc-check")
        peers = result.get("peers") if isinstance(result, dict) else None
        if not peers or not all(r.get("ok") for r in peers.values()):
            raise AssertionError(f"rpc-check: {result!r:.200}")
    else:
        raise ValueError(door)


def rtsp_describe(host: str, port: int, timeout: float) -> None:
    """OPTIONS then DESCRIBE the clip, as ffmpeg starts; both 200, the SDP has a video track."""
    url = f"rtsp://{host}:{port}/{MEDIA}"
    with socket.create_connection((host, port), timeout=timeout) as s:
        f = s.makefile("rb")
        for cseq, (method, extra) in enumerate(
            [("OPTIONS", ""), ("DESCRIBE", "Accept: application/sdp\r\n")], 1
        ):
            s.sendall(f"{method} {url} RTSP/1.0\r\nCSeq: {cseq}\r\n{extra}\r\n".encode())
            status = f.readline()
            if not status.startswith(b"RTSP/1.0 200"):
                raise AssertionError(f"rtsp {method}: {status!r}")
            length = 0
            while (line := f.readline()) not in (b"\r\n", b"\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = f.read(length)
            if method == "DESCRIBE" and b"m=video" not in body:
                raise AssertionError(f"rtsp DESCRIBE body {body!r:.200}")


@attrs.define
class Checker:
    """Baselines one door's node, then checks it after every batch."""

    lab: Lab
    door: str
    bounds: Bounds = Bounds()
    baseline_rss: int = 0
    baseline_fds: int = 0
    views: dict[str, tuple[int, frozenset[str]] | None] = attrs.field(factory=dict)
    logs: dict[str, LogWatch] = attrs.field(factory=dict)
    max_rss: int = 0
    max_fds: int = 0

    @property
    def node(self) -> NodeProc:
        """The node under fuzzing."""
        return self.lab.node_for(self.door)

    def _peers(self) -> list[NodeProc]:
        return [n for n in self.lab.nodes.values() if n.kind == self.node.kind]

    def baseline(self) -> None:
        """Record the view, RSS and fds before fuzzing; start reading logs from here."""
        real_client(self.lab, self.door, self.bounds.client_timeout)
        pid = self._pid()
        self.baseline_rss, self.baseline_fds = rss_kib(pid), fd_count(pid)
        self.max_rss, self.max_fds = self.baseline_rss, self.baseline_fds
        for n in self._peers():
            self.views[n.node_id] = _view(n)
            watch = LogWatch(n.log_path)
            watch.mark()
            self.logs[n.node_id] = watch

    def _pid(self) -> int:
        proc = self.node.process
        assert proc is not None
        return proc.pid

    def check(self) -> CheckResult:
        """Everything the brief asks after a batch."""
        problems: list[str] = []
        proc = self.node.process
        assert proc is not None
        if proc.poll() is not None:
            problems.append(f"{self.node.node_id} exited with {proc.returncode}")
            tbs = self._tracebacks()
            return CheckResult(tuple(problems), tuple(tbs), 0, 0, 0.0)
        start = time.monotonic()
        try:
            real_client(self.lab, self.door, self.bounds.client_timeout)
        except (OSError, AssertionError, AdminError, smtplib.SMTPException, poplib.error_proto,
                imaplib.IMAP4.error, ValueError) as e:  # fmt: skip
            problems.append(f"real {self.door} client failed: {type(e).__name__}: {e}"[:300])
        took = time.monotonic() - start
        if took > self.bounds.client_timeout:
            problems.append(f"real {self.door} client took {took:.1f}s")
        pid = proc.pid
        rss = rss_kib(pid)
        fds = self._settled_fds(pid)
        self.max_rss, self.max_fds = max(self.max_rss, rss), max(self.max_fds, fds)
        if rss - self.baseline_rss > self.bounds.rss_growth_kib:
            problems.append(f"RSS grew {self.baseline_rss} -> {rss} KiB")
        if fds - self.baseline_fds > self.bounds.fd_growth:
            problems.append(f"fds grew {self.baseline_fds} -> {fds}")
        for n in self._peers():
            now = _view(n)
            if now != self.views[n.node_id]:
                problems.append(f"{n.node_id} view changed {self.views[n.node_id]} -> {now}")
                self.views[n.node_id] = now
        tbs = self._tracebacks()
        if tbs:
            problems.append(f"{len(tbs)} tracebacks in the log")
        return CheckResult(tuple(problems), tuple(tbs), rss, fds, took)

    def _settled_fds(self, pid: int) -> int:
        """fds once connections the batch just closed are gone (bounded wait)."""
        deadline = time.monotonic() + 5.0
        fds = fd_count(pid)
        while fds - self.baseline_fds > self.bounds.fd_growth and time.monotonic() < deadline:
            threading.Event().wait(0.1)
            fds = fd_count(pid)
        return fds

    def _tracebacks(self) -> list[Traceback]:
        return [tb for w in self.logs.values() for tb in parse_tracebacks(w.read_new())]
