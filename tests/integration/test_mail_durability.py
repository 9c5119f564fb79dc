"""SIGKILL right after 250: every acknowledged message is there after a restart."""

from __future__ import annotations

import imaplib
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

ALICE = "alice@example.org"


def start(data: Path) -> tuple[subprocess.Popen[str], dict[str, int]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "yimaporc.porcupine.testing",
            str(data),
            "example.org",
            f"{ALICE}:pw",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("READY"), line
    ports = {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
    return proc, ports


def test_sigkill_after_250_loses_nothing(tmp_path: Path) -> None:
    """Messages acknowledged with 250 survive SIGKILL; none half-stored appears."""
    proc, ports = start(tmp_path / "data")
    try:
        ids = []
        with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30) as s:
            for n in range(30):
                s.docmd("MAIL FROM:<k@x.org>")
                s.rcpt(ALICE)
                body = f"Subject: kill {n}\r\nMessage-ID: <k{n}@x>\r\n\r\n{'z' * 5000}\r\n".encode()
                assert s.data(body)[0] == 250
                ids.append(n)
            # a last one in flight when the process dies: never acknowledged
            s.docmd("MAIL FROM:<k@x.org>")
            s.rcpt(ALICE)
            s.docmd("DATA")
            s.send(b"Subject: half\r\n\r\n" + b"y" * 10000)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc, ports = start(tmp_path / "data")
    try:
        i = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=30)
        i.login(ALICE, "pw")
        _, data = i.select("INBOX")
        assert int(data[0]) == len(ids)
        _, got = i.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        subjects = sorted(p[1].strip().decode() for p in got if isinstance(p, tuple))
        assert subjects == sorted(f"Subject: kill {n}" for n in ids)
        i.logout()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
