"""A real ``twistd porcupine-node --mail-workers 2`` on 127.0.181.x: mail delivered by
SMTP is read by POP3 and IMAP sessions served in the worker processes (IDLE and
EXPUNGE notices crossing between them), a worker killed with SIGKILL in mid-session
is counted and replaced while the node keeps serving, with no message lost or
duplicated; garbage on the workers' unix socket is a counter; the workers end with
the node."""

from __future__ import annotations

import imaplib
import os
import poplib
import signal
import smtplib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from yimaporc.testing.procs import NodeProc, assert_lag_small, mail_node, wait_for

pytestmark = pytest.mark.integration

HOST = "127.0.181.20"
PORTS = {"cluster": 17201, "admin": 18201, "smtp": 12601, "pop3": 11201, "imap": 11501}
USER, PW = "alice@example.org", "pw-alice"


def workers(node: NodeProc) -> dict[str, Any] | None:
    doc = node.status()
    return None if doc is None else doc.get("mail_workers")


@pytest.fixture
def node_and_pids(tmp_path: Path) -> Iterator[tuple[NodeProc, set[int]]]:
    """The node with two mail workers live and alice created; stopped (SIGTERM) after,
    and its workers checked gone."""
    secret = tmp_path / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    n = mail_node(tmp_path, "w1", HOST, PORTS, secret, [], ["--mail-workers", "2"])
    pids: set[int] = set()
    try:
        n.start()
        st = wait_for(lambda: (w := workers(n)) and w["live"] == 2 and w, 60, "2 live workers")
        pids |= set(st["pids"])
        cmd = [sys.executable, "-m", "yimaporc.cli", "mail", "adduser", USER, "--password", PW]
        cmd += ["--admin", n.admin_url, "--secret-file", str(secret)]
        subprocess.run(cmd, check=True, timeout=60, capture_output=True)
        yield n, pids
    finally:
        doc = None
        try:
            doc = workers(n)
        except AssertionError:
            pass
        if doc:
            pids |= set(doc["pids"])
        n.kill(signal.SIGTERM)
        wait_for(lambda: not any(_alive(p) for p in pids), 15, "the workers to end with the node")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours? (not ours: the node reaps them)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def owner_of(session: poplib.POP3, pids: list[int]) -> int | None:
    """The worker process holding the server end of ``session``'s connection."""
    port = session.sock.getsockname()[1]
    inodes = set()
    with open("/proc/net/tcp") as f:
        for row in f.readlines()[1:]:
            cols = row.split()
            if int(cols[2].rsplit(":", 1)[1], 16) == port:  # remote end: our client
                inodes.add(cols[9])
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return pid
    return None


def send(n: int, first: int = 0) -> list[str]:
    ids = []
    with smtplib.SMTP(HOST, PORTS["smtp"], timeout=30) as s:
        for i in range(first, first + n):
            mid = f"<m{i}@test>"
            body = (
                f"From: x@y.net\r\nTo: {USER}\r\nMessage-ID: {mid}\r\nSubject: s{i}\r\n\r\nb{i}\r\n"
            )
            s.sendmail("x@y.net", [USER], body.encode())
            ids.append(mid)
    return ids


def pop3() -> poplib.POP3:
    p = poplib.POP3(HOST, PORTS["pop3"], timeout=30)
    p.user(USER)
    p.pass_(PW)
    return p


def imap() -> imaplib.IMAP4:
    i = imaplib.IMAP4(HOST, PORTS["imap"], timeout=30)
    i.login(USER, PW)
    return i


def message_ids() -> list[str]:
    """Message-IDs of INBOX as IMAP lists them (one per message, in order)."""
    i = imap()
    try:
        typ, data = i.select("INBOX", readonly=True)
        assert typ == "OK"
        if int(data[0] or 0) == 0:
            return []
        typ, rows = i.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        out = []
        for row in rows:
            if isinstance(row, tuple):
                out.append(row[1].decode().split(":", 1)[1].strip())
        return out
    finally:
        i.logout()


def test_sessions_in_workers_and_a_worker_killed(
    node_and_pids: tuple[NodeProc, set[int]],
) -> None:
    """SMTP in, POP3 and IMAP out through the workers (the main serves no session);
    an IDLE session hears of an arrival and of another session's EXPUNGE; SIGKILL of a
    worker mid-session: counted, replaced, the node keeps serving, no mail lost or
    duplicated; garbage on the unix socket is counted."""
    node, pids = node_and_pids
    ids = send(6)
    p = pop3()
    count, _ = p.stat()
    assert count == 6
    assert p.retr(1)[1][-1] == b"b0"
    p.quit()
    assert message_ids() == ids

    # IDLE in one session; an arrival, then another session's EXPUNGE, are told to it
    raw = socket.create_connection((HOST, PORTS["imap"]), timeout=30)
    f = raw.makefile("rb")
    f.readline()
    raw.sendall(f'a LOGIN {USER} "{PW}"\r\n'.encode())
    while not f.readline().startswith(b"a "):
        pass
    raw.sendall(b"b SELECT INBOX\r\n")
    while not f.readline().startswith(b"b "):
        pass
    raw.sendall(b"c IDLE\r\n")
    assert f.readline().startswith(b"+")
    ids += send(1, first=6)
    assert f.readline().strip() == b"* 7 EXISTS"
    other = imap()
    other.select("INBOX")
    other.store("1", "+FLAGS", "(\\Deleted)")
    other.expunge()
    other.logout()
    ids.pop(0)
    line = f.readline().strip()
    while line.startswith(b"* 1 FETCH") or line.endswith(b"RECENT"):
        line = f.readline().strip()
    assert line == b"* 1 EXPUNGE"
    raw.sendall(b"DONE\r\n")
    raw.close()
    # the workers served them (the main accepts none) and their counters reach the node
    st = wait_for(
        lambda: (
            (w := workers(node))
            and w["sessions"].get("pop3", {}).get("sessions", 0) >= 1
            and w["sessions"].get("imap", {}).get("sessions", 0) >= 3
            and w
        ),
        10,
        "the workers' session counters",
    )
    assert st["main_accepts"] is False
    doc = node.status()
    assert doc is not None
    assert doc["mail_sessions"]["imap"]["sessions"] >= 3

    # sessions open on both workers, a DELE pending in each; then one worker dies
    sessions = []
    for _ in range(6):
        s = pop3()
        s.stat()
        s.dele(1)
        sessions.append(s)
    before = workers(node)
    assert before is not None
    owners = [owner_of(s, before["pids"]) for s in sessions]
    victim = owners[0]
    assert victim in before["pids"]
    os.kill(victim, signal.SIGKILL)
    for s, owner in zip(sessions, owners, strict=True):
        try:  # those on the dead worker see their connection go
            s.rset()
            s.quit()  # QUIT with nothing deleted
            assert owner != victim
        except (OSError, poplib.error_proto, EOFError):
            assert owner == victim
    # the node keeps serving at once (the other worker, or the main)
    p = pop3()
    assert p.stat()[0] == 6
    p.quit()
    after = wait_for(
        lambda: (w := workers(node)) and w["restarts"] >= 1 and w["live"] == 2 and w,
        30,
        "the dead worker replaced",
    )
    assert after["deaths"] == 1 and victim not in after["pids"]
    pids |= set(after["pids"])
    assert message_ids() == ids  # nothing lost, nothing twice, nothing deleted

    # garbage on the workers' socket: counted, the workers stay
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(node.data_dir / "mail-workers.sock"))
    assert (os.stat(node.data_dir / "mail-workers.sock").st_mode & 0o777) == 0o600
    sock.sendall(b"HELO I am not your child\r\n" * 100)
    try:
        sock.recv(100)
    except OSError:
        pass
    sock.close()
    st = wait_for(
        lambda: (w := workers(node)) and any(k.startswith("dropped_") for k in w["channel"]) and w,
        10,
        "the garbage counted",
    )
    assert st["live"] == 2 and st["deaths"] == 1
    p = pop3()
    assert p.stat()[0] == 6
    p.quit()
    assert_lag_small([node])
