"""Porcupine replication figures on this machine (issue 8).

``python bench/porcupine_replication.py [--duration S] [--senders K] [--catch-up N]
[--acks A] [--keep]``

Starts three ``twistd porcupine-node`` processes on 127.0.52.x and measures:

1. SMTP deliveries/s with users of ``--replicas`` 1, 2 and 3: K smtplib
   threads, each one connection per message, round robin over the three SMTP
   ports, for S seconds; meanwhile every node's ``replication.log_length`` is
   sampled every 0.1 s (update-log size under steady load);
2. catch-up: N messages to a user with 3 replicas, one node SIGKILLed, ``\\Seen``
   set on all N at another node (N total-object updates, each carrying its
   message, waiting for the dead node), the node restarted: seconds from its
   restart until every node's log is empty.

Prints one line per figure.  Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import imaplib
import os
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from yimaporc.testing.procs import NodeProc, mail_node, mail_settled, wait_for

PORT, ADMIN, SMTP, IMAP = 17952, 18152, 12552, 11252
DOMAIN = "example.org"


def host(i: int) -> str:
    return f"127.0.52.{i}"


def node(tmp: Path, i: int, secret: Path, acks: int) -> NodeProc:
    ports = {"cluster": PORT, "admin": ADMIN, "smtp": SMTP, "imap": IMAP}
    join = [f"{host(j)}:{PORT}" for j in (1, 2, 3) if j != i]
    return mail_node(tmp, f"b{i}", host(i), ports, secret, join, ["--acks-before-reply", str(acks)])


def drained(nodes: list[NodeProc]) -> bool:
    for n in nodes:
        doc = n.status()
        if doc is None or doc["replication"]["log_length"] or doc["replication"]["awaiting"]:
            return False
    return True


def adduser(nodes: list[NodeProc], secret: Path, user: str, replicas: int) -> None:
    cli = [sys.executable, "-m", "yimaporc.cli", "mail", "adduser", user, "--password", "pw",
           "--replicas", str(replicas), "--admin", nodes[0].admin_url,
           "--secret-file", str(secret)]  # fmt: skip
    subprocess.run(cli, check=True, capture_output=True)


def body(i: int, size: int = 4000) -> bytes:
    return f"From: a@x.org\r\nSubject: b{i}\r\n\r\n".encode() + b"x" * size + b"\r\n"


def throughput(
    nodes: list[NodeProc], users: list[str], duration: float, senders: int
) -> tuple[float, list[int]]:
    """Deliveries/s and the sampled log lengths (all nodes)."""
    stop = threading.Event()
    counts = [0] * senders
    samples: list[int] = []

    def send(k: int) -> None:
        i = 0
        while not stop.is_set():
            n = (k + i) % 3 + 1
            try:
                with smtplib.SMTP(host(n), SMTP, timeout=30) as s:
                    s.sendmail("a@x.org", [users[(k + i) % len(users)]], body(i))
                counts[k] += 1
            except (OSError, smtplib.SMTPException):
                pass
            i += 1

    def sample() -> None:
        while not stop.is_set():
            for n in nodes:
                doc: Any = n.status()
                if doc is not None:
                    samples.append(int(doc["replication"]["log_length"]))
            stop.wait(0.1)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(senders)]
    threads.append(threading.Thread(target=sample))
    t0 = time.monotonic()
    for t in threads:
        t.start()
    stop.wait(duration)
    stop.set()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - t0), samples


def catch_up(nodes: list[NodeProc], secret: Path, n_msgs: int) -> float:
    user = "catchup@example.org"
    adduser(nodes, secret, user, 3)
    wait_for(lambda: all((x.status() or {}).get("users", 0) >= 1 for x in nodes), 10, "users")
    with smtplib.SMTP(host(1), SMTP, timeout=30) as s:
        for i in range(n_msgs):
            s.sendmail("a@x.org", [user], body(i, 2000))
    wait_for(lambda: drained(nodes), 60, "logs drained before the kill")
    nodes[2].kill(signal.SIGKILL)
    wait_for(lambda: mail_settled(nodes[:2]), 20, "two nodes")
    m = imaplib.IMAP4(host(1), IMAP, timeout=60)
    m.login(user, "pw")
    m.select("INBOX")
    m.store("1:*", "+FLAGS", "(\\Seen)")
    m.logout()
    wait_for(
        lambda: (nodes[0].status() or {})["replication"]["awaiting"].get("b3", 0) >= n_msgs,
        60,
        "updates waiting for b3",
    )
    t0 = time.monotonic()
    nodes[2].start()
    try:
        wait_for(lambda: drained(nodes), 120, "catch-up", interval=0.02)
    except AssertionError:
        for x in nodes:
            print(x.node_id, (x.status() or {}).get("replication"), flush=True)
        raise
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--senders", type=int, default=8)
    ap.add_argument("--catch-up", type=int, default=500)
    ap.add_argument("--keep", action="store_true", help="keep the data and logs")
    ap.add_argument("--acks", type=int, default=2, help="--acks-before-reply of the nodes")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="porc-repl-")
    print(f"data and logs in {d}", flush=True)
    try:
        tmp = Path(d)
        secret = tmp / "secret"
        secret.write_text(os.urandom(16).hex())
        nodes = [node(tmp, i, secret, args.acks) for i in (1, 2, 3)]
        try:
            for n in nodes:
                n.start()
            wait_for(lambda: mail_settled(nodes), 30, "3 nodes")
            for r in (1, 2, 3):
                users = [f"r{r}u{k}@{DOMAIN}" for k in range(4)]
                for u in users:
                    adduser(nodes, secret, u, r)
                rate, samples = throughput(nodes, users, args.duration, args.senders)
                print(
                    f"R={r} acks={args.acks}: {rate:.1f} deliveries/s ({args.senders} smtplib senders, "
                    f"{args.duration:.0f} s, 3 nodes); log entries per node under this load: "
                    f"mean {statistics.fmean(samples or [0]):.1f}, max {max(samples or [0])}",
                    flush=True,
                )
                wait_for(lambda: drained(nodes), 60, "logs drained")
            t = catch_up(nodes, secret, args.catch_up)
            print(f"catch-up: a node restarted after missing {args.catch_up} updates "
                  f"drained every log in {t:.2f} s", flush=True)  # fmt: skip
        finally:
            for n in nodes:
                n.kill(signal.SIGTERM)
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
