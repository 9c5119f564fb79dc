"""SIGKILL in the middle of concurrent deliveries (group commits in flight): after a
restart every message that got its 250 is there exactly once, whole."""

from __future__ import annotations

import imaplib
import re
import signal
import smtplib
import subprocess
import sys
import threading
from pathlib import Path

USERS = [f"g{i}@example.org" for i in range(4)]
SENDERS = 8
KILL_AFTER = 120  # acknowledged messages before the kill


def start(data: Path) -> tuple[subprocess.Popen[str], dict[str, int]]:
    """The in-process mail service of yimaporc.porcupine.testing on port 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "yimaporc.porcupine.testing", str(data), "example.org"]
        + [f"{u}:pw" for u in USERS],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("READY"), line
    return proc, {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}


def body_of(tag: str) -> bytes:
    """A message whose body can be checked whole from its subject."""
    return f"Subject: {tag}\r\nMessage-ID: <{tag}@x>\r\n\r\n{tag * 400}\r\n".encode()


def test_sigkill_during_group_commits_keeps_every_250_once(tmp_path: Path) -> None:
    """8 concurrent senders; SIGKILL after 120 acknowledgements, mid-stream: every
    acknowledged message is in its mailbox once, none is duplicated or cut short."""
    proc, ports = start(tmp_path / "data")
    acked: dict[str, str] = {}  # tag -> user
    sent: dict[str, str] = {}
    lock = threading.Lock()
    enough = threading.Event()
    stop = threading.Event()

    def sender(n: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30) as s:
                for i in range(100_000):
                    if stop.is_set():
                        return
                    tag = f"s{n}m{i}x"
                    user = USERS[(n + i) % len(USERS)]
                    with lock:
                        sent[tag] = user
                    s.sendmail("k@x.org", [user], body_of(tag))  # raises unless 250
                    with lock:
                        acked[tag] = user
                        if len(acked) >= KILL_AFTER:
                            enough.set()
        except (OSError, smtplib.SMTPException):
            return  # the server died under us: what was not acknowledged may be lost

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(SENDERS)]
    try:
        for t in threads:
            t.start()
        assert enough.wait(120), f"only {len(acked)} acknowledged"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for t in threads:
            t.join(60)
    with lock:
        acked_now, sent_now = dict(acked), dict(sent)
    assert len(acked_now) >= KILL_AFTER and len(sent_now) > len(acked_now)  # some in flight
    proc, ports = start(tmp_path / "data")
    try:
        found: dict[str, int] = {}
        for user in USERS:
            i = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=30)
            i.login(user, "pw")
            _, data = i.select("INBOX")
            if int(data[0]):
                _, got = i.fetch("1:*", "(BODY.PEEK[])")
                for part in got:
                    if not isinstance(part, tuple):
                        continue
                    m = re.search(rb"Subject: (s\d+m\d+x)", part[1])
                    assert m is not None, part[1][:200]
                    tag = m.group(1).decode()
                    # whole: the server's trace headers, then exactly what was sent
                    assert (
                        part[1]
                        .replace(b"\r\n", b"\n")
                        .endswith(body_of(tag).replace(b"\r\n", b"\n"))
                    )
                    assert sent_now[tag] == user
                    found[tag] = found.get(tag, 0) + 1
            i.logout()
        assert all(found.get(tag) == 1 for tag in acked_now), [
            (t, found.get(t)) for t in acked_now if found.get(t) != 1
        ][:5]
        assert all(n == 1 for n in found.values())
        assert set(found) <= set(sent_now)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
