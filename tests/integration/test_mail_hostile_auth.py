"""A real porcupine node against header injection, password guessing, and for private files."""

from __future__ import annotations

import imaplib
import os
import re
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from yimaporc.testing.procs import NodeProc, assert_lag_small, wait_for

HOST = "127.0.105.1"
SMTP, POP3, IMAP = 2525, 1110, 1143
USER, PASSWORD = "demo@example.org", "s3cret"


def add_user(node: NodeProc) -> None:
    cli = [sys.executable, "-m", "yimaporc.cli", "mail", "adduser", USER, "--password", PASSWORD,
           "--admin", node.admin_url, "--secret-file", str(node.data_dir / "cluster.secret")]  # fmt: skip
    subprocess.run(cli, check=True, capture_output=True)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    """One mail node on 127.0.105.1 with fast throttle delays and the user demo."""
    base = tmp_path_factory.mktemp("hostile")
    n = NodeProc(
        "porcupine", "h1", HOST, base / "h1" / "data", 7946, 8080,
        extra=["--domain", "example.org", "--smtp", f"tcp:{SMTP}:interface={HOST}",
               "--pop3", f"tcp:{POP3}:interface={HOST}", "--imap", f"tcp:{IMAP}:interface={HOST}",
               "--auth-throttle", "delay=0.05,max-delay=0.4"],
    )  # fmt: skip
    n.start()
    try:
        wait_for(lambda: (n.status() or {}).get("services", {}).get("imap"), 20, "mail services")
        add_user(n)
        yield n
    finally:
        n.kill(signal.SIGTERM)


def smtp_reply(f: object) -> bytes:
    while True:
        line: bytes = f.readline()  # type: ignore[attr-defined]
        if line[3:4] != b"-":
            return line


def fetch_all(user: str = USER, password: str = PASSWORD) -> list[bytes]:
    m = imaplib.IMAP4(HOST, IMAP, timeout=10)
    m.login(user, password)
    m.select("INBOX", readonly=True)
    _, data = m.uid("FETCH", "1:*", "(BODY.PEEK[])")
    m.logout()
    return [item[1] for item in data if isinstance(item, tuple)]


def test_ehlo_with_cr_is_refused_and_forges_no_header(node: NodeProc) -> None:
    """EHLO evil\rX-Injected: yes gets 500 5.5.2 and a close (a bare CR in a command
    line, as Postfix's smtpd_forbid_bare_newline); the next session's mail has no
    X-Injected header."""
    epoch = (node.status() or {})["epoch"]
    with socket.create_connection((HOST, SMTP), timeout=10) as s:
        f = s.makefile("rwb")
        assert smtp_reply(f).startswith(b"220")
        f.write(b"EHLO evil\rX-Injected: yes\r\n")
        f.flush()
        assert smtp_reply(f).startswith(b"500 5.5.2")
        assert f.readline() == b"", "closed after the refusal"
    with socket.create_connection((HOST, SMTP), timeout=10) as s:
        f = s.makefile("rwb")
        assert smtp_reply(f).startswith(b"220")
        for cmd, want in [
            (b"EHLO client.example", b"250"),
            (b"MAIL FROM:<a@x.org>", b"250"),
            (b"RCPT TO:<demo@example.org>", b"250"),
            (b"DATA", b"354"),
            (b"Subject: injected?\r\n\r\nbody\r\n.", b"250"),
        ]:
            f.write(cmd + b"\r\n")
            f.flush()
            assert smtp_reply(f).startswith(want), cmd
    stored = [m for m in fetch_all() if b"Subject: injected?" in m]
    assert len(stored) == 1
    head = stored[0].split(b"\r\n\r\n", 1)[0]
    assert b"X-Injected" not in head and b"evil" not in head
    assert re.search(rb"Received: from client\.example ", head)
    doc = node.status() or {}
    assert doc["client_errors"]["smtp_bare_newlines"] >= 1 and doc["epoch"] == epoch


def imap_login(source: str, password: str) -> tuple[bytes, bool]:
    """One LOGIN from ``source``: the tagged reply and whether the server then closed."""
    with socket.create_connection((HOST, IMAP), timeout=10, source_address=(source, 0)) as s:
        f = s.makefile("rwb")
        assert f.readline().startswith(b"* OK")
        f.write(b"a1 LOGIN demo " + password.encode() + b"\r\n")
        f.flush()
        while not (line := f.readline()).startswith(b"a1 "):
            assert line, "closed before the tagged reply"
        s.settimeout(2)
        try:
            f.write(b"a2 NOOP\r\n")
            f.flush()
            closed = f.readline() == b""
        except OSError:
            closed = True
        return line, closed


def test_imap_password_guessing_is_throttled_and_the_owner_still_gets_in(node: NodeProc) -> None:
    """20 wrong LOGINs from one address: slowed, then refused and closed; the owner elsewhere is prompt."""
    epoch = (node.status() or {})["epoch"]
    attacker, owner = "127.0.105.10", "127.0.105.11"
    replies = []
    closes = 0
    failures_on_connection = 0
    with socket.create_connection((HOST, IMAP), timeout=10, source_address=(attacker, 0)) as s:
        f = s.makefile("rwb")
        assert f.readline().startswith(b"* OK")
        for i in range(3):  # one connection: the third failure closes it
            f.write(b"t%d LOGIN demo wrong%d\r\n" % (i, i))
            f.flush()
            replies.append(f.readline())
            failures_on_connection += 1
        assert f.readline() == b""
    for i in range(17):
        reply, closed = imap_login(attacker, f"wrong-{i}")
        replies.append(reply)
        closes += closed
    assert len(replies) == 20
    failed = [r for r in replies if b"NO [AUTHENTICATIONFAILED]" in r]
    refused = [r for r in replies if b"NO [UNAVAILABLE]" in r]
    assert len(failed) == 5 and len(refused) == 15, replies  # pair-failures=5 by default
    assert closes >= 15  # every refusal closes
    # the right password from the attacker's address is refused too (no scrypt spent)
    assert b"NO [UNAVAILABLE]" in imap_login(attacker, PASSWORD)[0]
    start = time.monotonic()
    reply, _ = imap_login(owner, PASSWORD)
    took = time.monotonic() - start
    assert reply.startswith(b"a1 OK"), reply
    assert took < 1.0, took
    auth = (node.status() or {})["auth"]
    assert auth["failures"] >= 5 and auth["refused"] >= 16 and auth["throttled"] >= 4
    assert auth["in_flight"] == 0
    assert (node.status() or {})["epoch"] == epoch
    assert_lag_small([node])


def walk_modes(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            out[name] = stat.S_IMODE(os.lstat(name).st_mode)
    return out


def test_every_file_under_the_data_dir_is_private(node: NodeProc) -> None:
    """After start, a user and a delivery, files are 0600 and directories 0700."""
    with smtplib.SMTP(HOST, SMTP, timeout=10) as s:
        s.sendmail("a@x.org", [USER], b"Subject: modes\r\n\r\nx\r\n")
    assert any(b"Subject: modes" in m for m in fetch_all())
    modes = walk_modes(node.data_dir)
    names = {os.path.basename(p) for p in modes}
    assert {"profiles.sqlite", "profiles.sqlite-wal", "cluster.secret"} <= names, names
    assert any(n.startswith("replication.sqlite") for n in names)
    wrong = {
        p: oct(m)
        for p, m in modes.items()
        if m != (0o700 if os.path.isdir(p) and not os.path.islink(p) else 0o600)
    }
    assert not wrong


class RunAsNode(NodeProc):
    """A node started with an interpreter that the user ``nobody`` can read."""

    python: list[str] = []
    pythonpath = ""

    def argv(self) -> list[str]:
        """twistd's arguments after ``python``."""
        return [*self.python, *super().argv()[1:]] if self.python else super().argv()

    def start(self) -> None:
        """Launch with ``pythonpath`` (the venv's packages for a system interpreter)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        self.process = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env=env,
        )  # fmt: skip


def python_for_nobody() -> tuple[list[str], str] | None:
    """([python, -c, twistd] or [], PYTHONPATH) that ``nobody`` can run; None if none can.

    The venv's own interpreter when its standard library is readable by nobody;
    otherwise (e.g. pyenv under /root) the system python of the same version
    with the venv's site-packages, which must then be readable.
    """
    import yimaporc
    from yimaporc.tap.privileges import lookup_account, unreadable_for

    nobody = lookup_account("nobody")
    src = str(Path(yimaporc.__file__).parents[1])
    site = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    if unreadable_for(nobody, [src, *site]):
        return None
    if not unreadable_for(nobody, [os.path.dirname(os.__file__)]):
        return [], ""
    system = shutil.which(
        f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin"
    )
    if system is None:
        return None
    stdlib = subprocess.run(
        [system, "-I", "-c", "import os; print(os.path.dirname(os.__file__))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if unreadable_for(nobody, [stdlib]):
        return None
    run = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
    return [system, "-c", run], os.pathsep.join([src, *site])


@pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root")
def test_user_nobody_binds_port_25_then_runs_unprivileged() -> None:
    """--user nobody: SMTP on port 25 works, the process runs as nobody with only the bind cap."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    python = python_for_nobody()
    if python is None:
        pytest.skip("no Python installation that the user nobody can read")
    base = Path(tempfile.mkdtemp(prefix="yimaporc-runas-", dir="/tmp"))
    host = "127.0.105.2"
    n = RunAsNode(
        "porcupine", "u1", host, base / "data", 7946, 8080,
        extra=["--domain", "example.org", "--smtp", f"tcp:25:interface={host}",
               "--imap", f"tcp:{IMAP}:interface={host}", "--user", "nobody"],
    )  # fmt: skip
    n.python, n.pythonpath = python
    try:
        os.chown(base, nobody.pw_uid, nobody.pw_gid)
        n.start()
        wait_for(lambda: (n.status() or {}).get("services", {}).get("smtp"), 20, "smtp")
        assert n.process is not None
        proc = Path(f"/proc/{n.process.pid}/status").read_text()
        uids = re.search(r"^Uid:\s+(.*)$", proc, re.M).group(1).split()  # type: ignore[union-attr]
        gids = re.search(r"^Gid:\s+(.*)$", proc, re.M).group(1).split()  # type: ignore[union-attr]
        cap_eff = re.search(r"^CapEff:\s+(\w+)$", proc, re.M).group(1)  # type: ignore[union-attr]
        assert set(uids) == {str(nobody.pw_uid)} and set(gids) == {str(nobody.pw_gid)}
        assert int(cap_eff, 16) == 1 << 10  # CAP_NET_BIND_SERVICE only
        add_user(n)
        with smtplib.SMTP(host, 25, timeout=10) as s:
            s.sendmail("a@x.org", [USER], b"Subject: as nobody\r\n\r\nx\r\n")
        m = imaplib.IMAP4(host, IMAP, timeout=10)
        m.login(USER, PASSWORD)
        assert m.select("INBOX")[1] == [b"1"]
        m.logout()
        owners = {os.lstat(p).st_uid for p in walk_modes(n.data_dir)}
        assert owners == {nobody.pw_uid}
    finally:
        n.kill(signal.SIGTERM)
        shutil.rmtree(base, ignore_errors=True)
