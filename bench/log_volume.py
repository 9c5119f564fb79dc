"""Log volume of a porcupine node under load, scaled to bytes per hour.

One node on 127.0.127.1 (SMTP, IMAP, admin) logging to a file with the default
``--log-rate``; S threads send mail over SMTP in a loop and I threads run IMAP sessions
(LOGIN, SELECT, FETCH of the newest message, LOGOUT) in a loop, for D seconds. The
figure is the log file's growth over the run, times 3600 / D; the most frequent kinds of
line are printed so a change in logging shows where the bytes come from.

    .venv/bin/python bench/log_volume.py [--seconds 60] [--senders 6] [--imap 2]
"""

from __future__ import annotations

import argparse
import collections
import imaplib
import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from yimaporc.testing.procs import mail_node, wait_for

HOST = "127.0.127.1"
PORTS = {"cluster": 7946, "admin": 8080, "smtp": 2525, "imap": 1143}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--senders", type=int, default=6)
    ap.add_argument("--imap", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="logvol-"))
    secret = tmp / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    node = mail_node(tmp, "p1", HOST, PORTS, secret, [])
    node.start()
    stop = threading.Event()
    counts = collections.Counter[str]()
    try:
        wait_for(lambda: node.status(), 60, "the node")
        subprocess.run(
            [sys.executable, "-m", "yimaporc.cli", "mail", "adduser", "load@example.org",
             "--password", "pw", "--admin", node.admin_url, "--secret-file", str(secret)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        start_size = node.log_path.stat().st_size

        def send() -> None:
            while not stop.is_set():
                with smtplib.SMTP(HOST, PORTS["smtp"], timeout=30) as s:
                    for i in range(20):
                        s.sendmail("a@remote.test", ["load@example.org"],
                                   f"Subject: {i}\r\n\r\n" + "x" * 2000 + "\r\n")  # fmt: skip
                        counts["messages"] += 1

        def read() -> None:
            while not stop.is_set():
                c = imaplib.IMAP4(HOST, PORTS["imap"], timeout=30)
                c.login("load@example.org", "pw")
                _, data = c.select("INBOX")
                n = int(data[0] or 0)
                if n:
                    c.fetch(str(n), "(RFC822)")
                c.logout()
                counts["imap_sessions"] += 1

        threads = [threading.Thread(target=send) for _ in range(args.senders)]
        threads += [threading.Thread(target=read) for _ in range(args.imap)]
        began = time.monotonic()
        for t in threads:
            t.start()
        stop.wait(args.seconds)
        stop.set()
        for t in threads:
            t.join(60)
        elapsed = time.monotonic() - began
        grown = node.log_path.stat().st_size - start_size
        text = node.log_path.read_text(errors="replace").splitlines()
        kinds = collections.Counter(
            re.sub(r"\d+", "N", line.split("] ", 1)[-1])[:90] for line in text
        )
        print(json.dumps({
            "seconds": round(elapsed, 1), "senders": args.senders, "imap_loops": args.imap,
            **counts, "log_bytes": grown, "log_bytes_per_hour": round(grown * 3600 / elapsed),
            "log_lines": len(text),
        }))  # fmt: skip
        for kind, n in kinds.most_common(8):
            print(f"{n:6d}  {kind}")
    finally:
        node.kill(signal.SIGTERM)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
