"""A rolling restart (docs/deploy.md, "Upgrading") of three real mail nodes on
127.0.113.6x while mail keeps arriving: every message acknowledged with 250 is in the
INBOX afterwards, exactly once, and the cluster is whole again after each step."""

from __future__ import annotations

import imaplib
import random
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from yimaporc.testing.procs import NodeProc, mail_node, mail_settled, three_nodes, wait_for

PORT, ADMIN, SMTP, IMAP = 7946, 8080, 2525, 1143
USER, PASSWORD = "roll@example.org", "pw-roll"
SUBJECT = re.compile(rb"Subject: r(\d+)\r\n")


def host(i: int) -> str:
    return f"127.0.113.{60 + i}"


def make_node(tmp_path: Path, i: int, secret: Path) -> NodeProc:
    # every node names the two others, as docs/deploy.md recommends
    join = [f"{host(j)}:{PORT}" for j in (1, 2, 3) if j != i]
    ports = {"cluster": PORT, "admin": ADMIN, "smtp": SMTP, "imap": IMAP}
    return mail_node(tmp_path, f"p{i}", host(i), ports, secret, join)


def rejoined(nodes: list[NodeProc], old: dict[str, Any]) -> bool:
    """The node that answered ``old`` runs again as a new incarnation, and every node
    has committed a view after the one of ``old`` (the new incarnation is admitted)."""
    docs = [n.status() for n in nodes]
    if any(d is None for d in docs):
        return False
    me = next(d for d in docs if d is not None and d["node_id"] == old["node_id"])
    return me["incarnation"] != old["incarnation"] and all(
        d is not None and d["epoch"] > old["epoch"] for d in docs
    )


class Sender:
    """Sends one message at a time to a random node until stopped; remembers which
    were acknowledged (250) and which were attempted at all."""

    def __init__(self) -> None:
        self.acked: list[int] = []
        self.attempted: list[int] = []
        self.failures = 0
        self.stop = threading.Event()
        self.rng = random.Random(21)
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            self.attempted.append(n)
            try:
                with smtplib.SMTP(host(self.rng.choice((1, 2, 3))), SMTP, timeout=20) as s:
                    s.sendmail("a@x.org", [USER], f"Subject: r{n}\r\n\r\nrolling {n}\r\n".encode())
                self.acked.append(n)
            except (OSError, smtplib.SMTPException):
                self.failures += 1  # refused or cut off: maybe stored, never acknowledged
            n += 1
            self.stop.wait(0.02)


def test_rolling_restart_under_mail_load_loses_nothing(tmp_path: Path) -> None:
    """SIGTERM and restart p1, p2, p3 in turn, waiting for the cluster to settle each
    time, while a client keeps sending: no acknowledged message is lost or doubled."""
    with three_nodes(tmp_path, make_node) as (nodes, secret):
        wait_for(lambda: mail_settled(nodes), 60, "three settled nodes")
        subprocess.run(
            [sys.executable, "-m", "yimaporc.cli", "mail", "adduser", USER, "--password",
             PASSWORD, "--replicas", "2", "--admin", nodes[0].admin_url,
             "--secret-file", str(secret)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        sender = Sender()
        sender.thread.start()
        steps = []
        try:
            wait_for(lambda: len(sender.acked) >= 20, 60, "mail flowing")
            for node in nodes:
                before = len(sender.acked)
                old = node.status()
                assert old is not None
                started = time.monotonic()
                node.kill(signal.SIGTERM)
                node.start()
                wait_for(lambda o=old: rejoined(nodes, o), 90, f"{node.node_id} readmitted")
                wait_for(lambda: mail_settled(nodes), 90, f"{node.node_id} back and settled")
                steps.append((node.node_id, round(time.monotonic() - started, 1)))
                # mail kept being accepted through this step
                wait_for(lambda b=before: len(sender.acked) > b + 5, 60, "mail after restart")
        finally:
            sender.stop.set()
            sender.thread.join(timeout=30)
        m = imaplib.IMAP4(host(2), IMAP, timeout=30)
        m.login(USER, PASSWORD)
        m.select("INBOX", readonly=True)
        _, data = m.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        m.logout()
        got = [
            int(SUBJECT.search(item[1]).group(1))  # type: ignore[union-attr]
            for item in data
            if isinstance(item, tuple)
        ]
        assert len(got) == len(set(got)), "a message was stored twice"
        assert set(sender.acked) <= set(got), sorted(set(sender.acked) - set(got))
        assert set(got) <= set(sender.attempted)
        assert [s[0] for s in steps] == ["p1", "p2", "p3"]
        print(f"steps {steps}; acknowledged {len(sender.acked)}, refused {sender.failures}")
