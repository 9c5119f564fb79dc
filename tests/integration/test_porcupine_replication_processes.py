"""Real ``twistd porcupine-node`` processes on 127.0.51.x: no acknowledged mail lost (issue 8).

Three nodes, a user with ``--replicas 2``; smtplib deliveries run while one node
is SIGKILLed; every message that got 250 is then read (IMAP and POP3) from the
survivors; the node restarts and catches up (every replication log drains);
another node is killed and still nothing is missing.
"""

from __future__ import annotations

import imaplib
import poplib
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from yimaporc.porcupine.reconstruct import NODE_READ_LEASE, REPLICATED_ALLOCATION_TTL
from yimaporc.testing.procs import NodeProc, mail_node, mail_settled, three_nodes, wait_for

pytestmark = pytest.mark.integration

PORT, ADMIN, SMTP, POP3, IMAP = 17951, 18151, 12551, 11151, 11251
USER, PASSWORD = "dora@example.org", "pw-dora"
SUBJECT = re.compile(rb"Subject: r(\d+)\r\n")


def host(i: int) -> str:
    return f"127.0.51.{i}"


def make_node(tmp_path: Path, i: int, secret: Path) -> NodeProc:
    ports = {"cluster": PORT, "admin": ADMIN, "smtp": SMTP, "pop3": POP3, "imap": IMAP}
    join = [f"{host(j)}:{PORT}" for j in (1, 2, 3) if j != i]
    return mail_node(tmp_path, f"r{i}", host(i), ports, secret, join)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[list[NodeProc], Path]]:
    with three_nodes(tmp_path, make_node) as got:
        yield got


def drained(nodes: list[NodeProc]) -> bool:
    """Every replication log is empty and nothing awaits a peer."""
    for n in nodes:
        doc = n.status()
        if doc is None:
            return False
        r = doc["replication"]
        if r.get("state") != "running" or r["log_length"] or r["awaiting"]:
            return False
    return True


def message(i: int) -> bytes:
    body = (f"replicated message {i} " * 6 + "\r\n") * 30
    return f"From: a@x.org\r\nTo: {USER}\r\nSubject: r{i}\r\n\r\n{body}".encode()


class Sender(threading.Thread):
    """Delivers r0, r1, ... round robin over the nodes in ``targets``; records 250s."""

    def __init__(self, targets: list[int]) -> None:
        super().__init__(daemon=True)
        self.targets = targets
        self.acked: set[int] = set()
        self.failed = 0
        self.errors: Counter[str] = Counter()
        self.stop = threading.Event()
        self.next = 0

    def run(self) -> None:
        k = 0
        while not self.stop.is_set():
            i, self.next = self.next, self.next + 1
            node = self.targets[k % len(self.targets)]
            k += 1
            try:
                with smtplib.SMTP(host(node), SMTP, timeout=20) as s:
                    s.sendmail("a@x.org", [USER], message(i))
                self.acked.add(i)
            except (OSError, smtplib.SMTPException) as e:
                self.failed += 1
                self.errors[f"r{node}: {str(e)[:60]}"] += 1
                self.stop.wait(0.05)  # as a client would, before trying again


def imap_read(node: int) -> list[int]:
    m = imaplib.IMAP4(host(node), IMAP, timeout=30)
    m.login(USER, PASSWORD)
    m.select("INBOX", readonly=True)
    _, data = m.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    m.logout()
    return [
        int(SUBJECT.search(item[1]).group(1))  # type: ignore[union-attr]
        for item in data
        if isinstance(item, tuple)
    ]


def pop3_read(node: int) -> list[int]:
    p = poplib.POP3(host(node), POP3, timeout=30)
    p.user(USER)
    p.pass_(PASSWORD)
    count, _ = p.stat()
    seen = []
    for k in range(1, count + 1):
        _, lines, _ = p.top(k, 0)
        seen.append(int(SUBJECT.search(b"\r\n".join(lines) + b"\r\n").group(1)))  # type: ignore[union-attr]
    p.quit()
    return seen


def copies_on_disk(tmp_path: Path) -> Counter[int]:
    """How many nodes hold each message ``r<i>`` in their fragment store files."""
    held: Counter[int] = Counter()
    for i in (1, 2, 3):
        found = set()
        for f in (tmp_path / f"r{i}" / "data" / "mail" / "buckets").glob(f"*/{USER}/*.m"):
            m = SUBJECT.search(f.read_bytes())
            if m:
                found.add(int(m.group(1)))
        held.update(found)
    return held


#: The visibility horizon (docs/mail.md) may hold mail back after a node died holding
#: an unconfirmed allocation: a replicated user's for REPLICATED_ALLOCATION_TTL (6 s;
#: it used to stay held until the dead node came back, up to 300 s); a bucket that
#: moved gets no UID mark for up to NODE_READ_LEASE (2 s) while an old read lease may
#: run; plus a numbering round and slack for a loaded machine.
HORIZON_GRACE = REPLICATED_ALLOCATION_TTL + NODE_READ_LEASE + 4.0

#: The longest a reader waited for acknowledged mail to show (printed by the test).
WAITED: list[float] = []


def check(readers: list[int], acked: set[int]) -> None:
    """Every acknowledged message is listed, once, at every reader (within the
    horizon's bound after a kill)."""
    for node in readers:
        started = time.monotonic()
        deadline = started + HORIZON_GRACE
        seen = imap_read(node)
        while not acked <= set(seen) and time.monotonic() < deadline:
            threading.Event().wait(0.25)  # bounded poll: hidden mail appears by the expiry
            seen = imap_read(node)
        WAITED.append(time.monotonic() - started)
        print(f"r{node}: all acknowledged mail listed after {WAITED[-1]:.2f}s")
        assert acked <= set(seen), f"IMAP at r{node} misses {sorted(acked - set(seen))}"
        assert len(seen) == len(set(seen)), f"IMAP at r{node} lists duplicates"
    pop = pop3_read(readers[-1])
    assert acked <= set(pop) and len(pop) == len(set(pop)), "POP3"


def test_sigkill_during_deliveries_loses_no_acknowledged_mail(
    cluster: tuple[list[NodeProc], Path], tmp_path: Path
) -> None:
    """R=2: kill one node mid-run, read from survivors, restart, catch up, kill another."""
    nodes, secret = cluster
    t_start = time.monotonic()
    wait_for(lambda: mail_settled(nodes), 30, "3 nodes with buckets")
    cli = [sys.executable, "-m", "yimaporc.cli", "mail", "adduser", USER, "--password", PASSWORD,
           "--replicas", "2", "--admin", nodes[0].admin_url, "--secret-file", str(secret)]  # fmt: skip
    subprocess.run(cli, check=True, capture_output=True)
    wait_for(lambda: all((n.status() or {}).get("users") == 1 for n in nodes), 10, "profiles")

    # 1. deliveries at r1 and r2 while r3 (a replica of many of them) is SIGKILLed
    sender = Sender([1, 2, 3])
    sender.start()
    wait_for(lambda: len(sender.acked) >= 15, 20, "15 deliveries")
    nodes[2].kill(signal.SIGKILL)
    sender.targets = [1, 2]
    wait_for(lambda: len(sender.acked) >= 35, 30, "deliveries after the kill")
    sender.stop.set()
    sender.join(30)
    acked = set(sender.acked)
    survivors = nodes[:2]
    wait_for(lambda: mail_settled(survivors), 20, "the survivors to drop r3")
    check([1, 2], acked)

    # 2. r3 restarts and catches up: every log drains
    nodes[2].start()
    t0 = time.monotonic()
    wait_for(lambda: mail_settled(nodes), 30, "r3 back")
    wait_for(lambda: drained(nodes), 30, "replication logs to drain")
    catch_up = time.monotonic() - t0
    copies = copies_on_disk(tmp_path)
    short = {i: copies.get(i, 0) for i in acked if copies.get(i, 0) < 2}
    assert not short, f"acknowledged messages with fewer than 2 copies on disk: {short}"
    check([3, 1], acked)

    # 3. another node dies: still nothing missing
    nodes[0].kill(signal.SIGKILL)
    wait_for(lambda: mail_settled(nodes[1:]), 20, "the survivors to drop r1")
    check([2, 3], acked)
    docs: list[Any] = [n.status() for n in nodes[1:]]
    print(
        f"\nporcupine replication: {len(acked)} acknowledged ({sender.failed} refused/failed "
        f"while a node died: {dict(sender.errors)}), r3 caught up in {catch_up:.2f} s; whole test "
        f"{time.monotonic() - t_start:.1f} s; statuses "
        f"{[d['replication'] for d in docs]}"
    )
