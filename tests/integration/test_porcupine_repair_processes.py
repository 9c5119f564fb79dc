"""Real ``twistd porcupine-node`` processes on 127.0.124.x: replication gaps closed (issue 14).

(a) a node whose data dir is wiped gets its copies back from the survivors
(re-replication; ``replication.under_replicated`` reaches 0 everywhere); (b) ``deluser``
while a node is down removes the user there too once it is back; (c) IMAP APPEND, COPY,
CREATE and RENAME at one node are durable on the replicas: that node is killed and
another serves them.
"""

from __future__ import annotations

import imaplib
import poplib
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from yimaporc.testing.procs import NodeProc, mail_node, mail_settled, three_nodes, wait_for

pytestmark = pytest.mark.integration

PORT, ADMIN, SMTP, POP3, IMAP = 17924, 18124, 12524, 11124, 11224
USER, PASSWORD = "wren@example.org", "pw-wren"
SUBJECT = re.compile(rb"Subject: w(\d+)\r\n")


def host(i: int) -> str:
    return f"127.0.124.{i}"


def make_node(tmp_path: Path, i: int, secret: Path) -> NodeProc:
    ports = {"cluster": PORT, "admin": ADMIN, "smtp": SMTP, "pop3": POP3, "imap": IMAP}
    join = [f"{host(j)}:{PORT}" for j in (1, 2, 3) if j != i]
    return mail_node(tmp_path, f"w{i}", host(i), ports, secret, join)


@pytest.fixture
def cluster(tmp_path: Path, request: Any) -> Iterator[tuple[list[NodeProc], Path]]:
    """Three nodes and the user with R = 2 (or the test's indirect parameter)."""
    replicas = getattr(request, "param", 2)
    with three_nodes(tmp_path, make_node) as got:
        nodes, secret = got
        wait_for(lambda: mail_settled(nodes), 30, "3 nodes with buckets")
        cli = [sys.executable, "-m", "yimaporc.cli", "mail", "adduser", USER, "--password",
               PASSWORD, "--replicas", str(replicas), "--admin", nodes[0].admin_url,
               "--secret-file", str(secret)]  # fmt: skip
        subprocess.run(cli, check=True, capture_output=True)
        wait_for(lambda: all((n.status() or {}).get("users") == 1 for n in nodes), 10, "profiles")
        yield got


def message(i: int) -> bytes:
    return f"From: a@x.org\r\nTo: {USER}\r\nSubject: w{i}\r\n\r\nbody {i}\r\n".encode()


def deliver(node: int, ids: range) -> set[int]:
    """Deliver ``w<i>`` for each i at ``node``; the ids that got 250."""
    acked = set()
    with smtplib.SMTP(host(node), SMTP, timeout=30) as s:
        for i in ids:
            s.sendmail("a@x.org", [USER], message(i))
            acked.add(i)
    return acked


def repl(node: NodeProc) -> dict[str, Any] | None:
    doc = node.status()
    return None if doc is None else doc.get("replication")


def drained(nodes: list[NodeProc]) -> bool:
    """Every replication log is empty and nothing awaits a peer."""
    for n in nodes:
        r = repl(n)
        if r is None or r.get("state") != "running" or r["log_length"] or r["awaiting"]:
            return False
    return True


def fully_replicated(nodes: list[NodeProc]) -> bool:
    """Every node synced with its peers since start and counts nothing below its R."""
    for n in nodes:
        r = repl(n)
        if r is None or not r.get("repair_synced") or r.get("under_replicated") != 0:
            return False
    return True


def held(tmp_path: Path, node: int) -> set[int]:
    """The messages ``w<i>`` in node ``node``'s fragment store files."""
    out = set()
    for f in (tmp_path / f"w{node}" / "data" / "mail" / "buckets").glob(f"*/{USER}/*.m"):
        m = SUBJECT.search(f.read_bytes())
        if m:
            out.add(int(m.group(1)))
    return out


def imap_subjects(node: int, mailbox: str = "INBOX") -> list[int]:
    m = imaplib.IMAP4(host(node), IMAP, timeout=30)
    m.login(USER, PASSWORD)
    typ, _ = m.select(mailbox, readonly=True)
    assert typ == "OK", f"SELECT {mailbox} at w{node}: {typ}"
    _, data = m.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    m.logout()
    return [
        int(SUBJECT.search(item[1]).group(1))  # type: ignore[union-attr]
        for item in data
        if isinstance(item, tuple)
    ]


def pop3_subjects(node: int) -> list[int]:
    p = poplib.POP3(host(node), POP3, timeout=30)
    p.user(USER)
    p.pass_(PASSWORD)
    count, _ = p.stat()
    seen = []
    for k in range(1, count + 1):
        _, lines, _ = p.retr(k)
        seen.append(int(SUBJECT.search(b"\r\n".join(lines) + b"\r\n").group(1)))  # type: ignore[union-attr]
    p.quit()
    return seen


def test_wiped_node_gets_its_copies_back(
    cluster: tuple[list[NodeProc], Path], tmp_path: Path
) -> None:
    """R=2: w3 is killed, its data dir wiped, and restarted: the status counter goes
    to 0 on every node and w3 holds again exactly what it held, read from w3."""
    nodes, _ = cluster
    acked = deliver(1, range(0, 6)) | deliver(2, range(6, 12)) | deliver(3, range(12, 18))
    wait_for(lambda: drained(nodes), 30, "replication logs to drain")
    before = held(tmp_path, 3)
    assert before, "w3 holds no copy: the test would prove nothing"
    copies = Counter(i for n in (1, 2, 3) for i in held(tmp_path, n))
    assert all(copies[i] == 2 for i in acked), copies

    nodes[2].kill(signal.SIGKILL)
    wait_for(lambda: mail_settled(nodes[:2]), 30, "the survivors to drop w3")
    under = sum((repl(n) or {}).get("under_replicated", 0) for n in nodes[:2])
    wait_for(
        lambda: sum((repl(n) or {}).get("under_replicated", 0) for n in nodes[:2]) >= len(before),
        10,
        "the survivors to count the copies w3 had",
    )
    shutil.rmtree(tmp_path / "w3" / "data")
    t0 = time.monotonic()
    nodes[2].start()
    wait_for(lambda: mail_settled(nodes), 30, "w3 back")
    wait_for(lambda: fully_replicated(nodes), 60, "every message back to 2 copies")
    took = time.monotonic() - t0
    # Once (CI of 2026-12-07, a loaded machine) every node's status said so 2 s after
    # w3's start while w3's disk did not hold its copy yet: the copy must still come,
    # within bounded time (a copy that never comes fails here).
    wait_for(
        lambda: held(tmp_path, 3) == before,
        30,
        f"w3 to hold {sorted(before)} again (repair: {(repl(nodes[2]) or {}).get('repair')})",
    )
    copies = Counter(i for n in (1, 2, 3) for i in held(tmp_path, n))
    assert all(copies[i] == 2 for i in acked), copies
    seen = imap_subjects(3)
    assert sorted(seen) == sorted(acked)
    assert sorted(pop3_subjects(3)) == sorted(acked)
    rep = (repl(nodes[2]) or {})["repair"]
    assert rep["repaired"] >= len(before)
    print(f"\nre-replication: {len(before)} copies back on the wiped w3 ({rep}), counted "
          f"below R by the survivors before ({under}), 0 everywhere {took:.1f} s after start")  # fmt: skip


@pytest.mark.parametrize("cluster", [3], indirect=True)
def test_deluser_while_a_node_is_down(cluster: tuple[list[NodeProc], Path], tmp_path: Path) -> None:
    """R=3: ``deluser`` while w3 is down (with deliveries for it still pending in the
    logs): back, w3 drops the user's profile and mail too; no login as the user there."""
    nodes, secret = cluster
    deliver(1, range(0, 6))
    wait_for(lambda: drained(nodes), 30, "replication logs to drain")
    assert held(tmp_path, 3) == set(range(0, 6))
    nodes[2].kill(signal.SIGTERM)
    wait_for(lambda: mail_settled(nodes[:2]), 30, "the survivors to drop w3")
    deliver(2, range(6, 9))  # w3 fills up their replica sets: pending for it
    assert any((repl(n) or {}).get("awaiting", {}).get("w3") for n in nodes[:2])
    cli = [sys.executable, "-m", "yimaporc.cli", "mail", "deluser", USER,
           "--admin", nodes[0].admin_url, "--secret-file", str(secret)]  # fmt: skip
    subprocess.run(cli, check=True, capture_output=True)
    wait_for(lambda: not held(tmp_path, 1) and not held(tmp_path, 2), 10, "mail gone on w1, w2")
    nodes[2].start()
    wait_for(lambda: mail_settled(nodes), 30, "w3 back")
    wait_for(lambda: drained(nodes), 30, "replication logs to drain")
    wait_for(lambda: (nodes[2].status() or {}).get("users") == 0, 10, "the profile gone on w3")
    assert held(tmp_path, 3) == set()
    assert not list((tmp_path / "w3" / "data" / "mail" / "buckets").glob(f"*/{USER}/*.m"))
    m = imaplib.IMAP4(host(3), IMAP, timeout=30)
    with pytest.raises(imaplib.IMAP4.error):
        m.login(USER, PASSWORD)
    m.logout()


def test_imap_changes_are_durable_on_the_replicas(
    cluster: tuple[list[NodeProc], Path], tmp_path: Path
) -> None:
    """CREATE, APPEND (2), COPY and RENAME at w1, then w1 is SIGKILLed: w2 serves the
    renamed mailbox with both messages and INBOX with its own, same UIDs."""
    nodes, _ = cluster
    m = imaplib.IMAP4(host(1), IMAP, timeout=30)
    m.login(USER, PASSWORD)
    assert m.create("Work")[0] == "OK"
    assert m.append("Work", "", None, message(1))[0] == "OK"
    assert m.append("INBOX", "(\\Seen)", None, message(2))[0] == "OK"
    m.select("INBOX")
    assert m.copy("1", "Work")[0] == "OK"
    m.close()
    assert m.rename("Work", "Done")[0] == "OK"
    assert m.create("Empty")[0] == "OK"
    m.select("Done", readonly=True)
    _, uids = m.uid("SEARCH", "ALL")
    m.logout()
    done_uids = uids[0].split()
    assert len(done_uids) == 2
    nodes[0].kill(signal.SIGKILL)
    wait_for(lambda: mail_settled(nodes[1:]), 30, "the survivors to drop w1")
    r = imaplib.IMAP4(host(2), IMAP, timeout=30)
    r.login(USER, PASSWORD)
    _, boxes = r.list()
    names = {b.decode().rsplit(" ", 1)[-1].strip('"') for b in boxes}  # type: ignore[union-attr]
    assert {"INBOX", "Done", "Empty"} <= names and "Work" not in names, names
    r.select("Done", readonly=True)
    _, got = r.uid("SEARCH", "ALL")
    assert got[0].split() == done_uids
    r.logout()
    assert sorted(imap_subjects(2, "Done")) == [1, 2]
    assert imap_subjects(3, "INBOX") == [2]
