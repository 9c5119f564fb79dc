"""Real ``twistd porcupine-node`` processes on 127.0.41.x as one mail service (issue 6).

Three nodes; a user added through one node's admin API; mail delivered with
smtplib at random nodes; read with imaplib and poplib at random nodes, complete
and exactly once; a fourth node joins with ``--join`` only, gets buckets, and
reads and new deliveries still work.
"""

from __future__ import annotations

import imaplib
import json
import poplib
import random
import re
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from yimaporc.testing.procs import (
    NodeProc,
    mail_node,
    mail_settled,
    three_nodes,
    views_agree,
    wait_for,
)

PORT, ADMIN, SMTP, POP3, IMAP = 17946, 18080, 12525, 11110, 11143
USER, PASSWORD = "carol@example.org", "pw-carol"
SUBJECT = re.compile(rb"Subject: m(\d+)\r\n")


def host(i: int) -> str:
    return f"127.0.41.{i}"


def make_node(tmp_path: Path, i: int, secret: Path) -> NodeProc:
    ports = {"cluster": PORT, "admin": ADMIN, "smtp": SMTP, "pop3": POP3, "imap": IMAP}
    join = [] if i == 1 else [f"{host(1)}:{PORT}"]
    return mail_node(tmp_path, f"p{i}", host(i), ports, secret, join)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[list[NodeProc], Path]]:
    with three_nodes(tmp_path, make_node) as got:
        yield got


def message(i: int) -> bytes:
    body = (f"message {i} line " * 8 + "\r\n") * 40
    return f"From: a@x.org\r\nTo: {USER}\r\nSubject: m{i}\r\n\r\n{body}".encode()


def send(node: int, i: int) -> None:
    with smtplib.SMTP(host(node), SMTP, timeout=30) as s:
        s.sendmail("a@x.org", [USER], message(i))


def imap_read(node: int) -> tuple[int, list[int], list[int]]:
    """(UIDVALIDITY, UIDs in order, message numbers) of the INBOX read at ``node``."""
    m = imaplib.IMAP4(host(node), IMAP, timeout=30)
    m.login(USER, PASSWORD)
    m.select("INBOX", readonly=True)
    validity = int(re.search(rb"UIDVALIDITY (\d+)", m.status("INBOX", "(UIDVALIDITY)")[1][0]).group(1))  # type: ignore[union-attr]  # fmt: skip
    _, data = m.uid("FETCH", "1:*", "(UID BODY.PEEK[])")
    m.logout()
    uids, seen = [], []
    for item in data:
        if isinstance(item, tuple):
            uids.append(int(re.search(rb"UID (\d+)", item[0]).group(1)))  # type: ignore[union-attr]
            seen.append(int(SUBJECT.search(item[1]).group(1)))  # type: ignore[union-attr]
    return validity, uids, seen


def pop3_read(node: int) -> list[int]:
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


def rpc_total(nodes: list[NodeProc]) -> int:
    total = 0
    for n in nodes:
        doc: Any = n.status()
        calls = doc["mail_cluster"]["rpc_calls"]
        total += sum(v for k, v in calls.items() if k != "porcupine.load")
    return total


def bodies_on_disk(tmp_path: Path, i: int) -> int:
    return len(list((tmp_path / f"p{i}" / "data" / "mail" / "buckets").glob(f"*/{USER}/*.m")))


def check_complete(readers: list[int], want: set[int], n: int) -> int:
    validity = None
    for node in readers:
        v, uids, seen = imap_read(node)
        assert sorted(seen) == sorted(want) and len(seen) == n, f"IMAP at node {node}"
        assert uids == sorted(uids) and len(set(uids)) == len(uids), "UIDs ascend, no repeats"
        assert validity in (None, v), "UIDVALIDITY is the same at every node"
        validity = v
    pop = pop3_read(random.choice(readers))
    assert sorted(pop) == sorted(want) and len(pop) == n
    assert validity is not None
    return validity


def test_three_nodes_one_mail_service_then_a_fourth_joins(
    cluster: tuple[list[NodeProc], Path], tmp_path: Path
) -> None:
    nodes, secret = cluster
    rng = random.Random(6)
    wait_for(lambda: views_agree(nodes), 30, "3 nodes to agree")
    wait_for(lambda: mail_settled(nodes), 20, "buckets on 3 nodes")
    cli = [sys.executable, "-m", "yimaporc.cli", "mail", "adduser", USER, "--password", PASSWORD,
           "--admin", nodes[1].admin_url, "--secret-file", str(secret)]  # fmt: skip
    subprocess.run(cli, check=True, capture_output=True)
    assert all((n.status() or {}).get("users") == 1 for n in nodes), "profile on every node"

    n_msgs = 24
    before = rpc_total(nodes)
    for i in range(n_msgs):
        send(rng.randint(1, 3), i)
    per_delivery = (rpc_total(nodes) - before) / n_msgs
    spread = {i: bodies_on_disk(tmp_path, i) for i in (1, 2, 3)}
    assert sum(spread.values()) == n_msgs
    assert sum(1 for v in spread.values() if v) >= 2, "the balancer spreads the mailbox"
    before = rpc_total(nodes)
    v, _, seen = imap_read(rng.randint(1, 3))
    per_imap = rpc_total(nodes) - before
    before = rpc_total(nodes)
    assert sorted(pop3_read(rng.randint(1, 3))) == list(range(n_msgs))
    per_pop3 = rpc_total(nodes) - before
    validity = check_complete([rng.randint(1, 3) for _ in range(3)], set(range(n_msgs)), n_msgs)
    assert v == validity and sorted(seen) == list(range(n_msgs))

    # A fourth node: --join and nothing else.
    p4 = make_node(tmp_path, 4, secret)
    t0 = time.monotonic()
    p4.start()
    try:
        everyone = [*nodes, p4]
        wait_for(lambda: views_agree(everyone), 30, "4 nodes to agree")
        wait_for(lambda: mail_settled(everyone), 20, "buckets on 4 nodes")
        joined = time.monotonic() - t0
        out = subprocess.run(
            [sys.executable, "-m", "yimaporc.cli", "status", "--json", "--admin", p4.admin_url,
             "--secret-file", str(secret)],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        doc: Any = json.loads(out)
        assert set(doc["buckets"]) == {"p1", "p2", "p3", "p4"} and doc["buckets"]["p4"] > 0
        assert sum(doc["buckets"].values()) == 256 and doc["users"] == 1
        assert check_complete([4, rng.randint(1, 3)], set(range(n_msgs)), n_msgs) == validity
        for i in range(n_msgs, n_msgs + 12):
            send(rng.randint(1, 4), i)
        stored_on_p4 = (p4.status() or {})["mail_cluster"]["rpc_calls"]
        check_complete([4, 1, 2, 3], set(range(n_msgs + 12)), n_msgs + 12)
        # A node holding mail is SIGKILLed and restarted on its data dir: once it is
        # back, the managers have its fragments again (its hints) and reads are complete.
        holder = max((1, 2, 3), key=lambda i: bodies_on_disk(tmp_path, i))
        victim = everyone[holder - 1]
        victim.kill(signal.SIGKILL)
        rest = [n for n in everyone if n is not victim]
        wait_for(lambda: views_agree(rest), 30, "3 nodes without the killed one")
        victim.start()
        t1 = time.monotonic()
        wait_for(lambda: views_agree(everyone), 30, "the restarted node back")
        wait_for(lambda: mail_settled(everyone), 20, "buckets settled again")
        back = time.monotonic() - t1
        check_complete([holder, 4], set(range(n_msgs + 12)), n_msgs + 12)
    finally:
        p4.kill(signal.SIGTERM)
    print(
        f"\nporcupine cluster: {per_delivery:.2f} RPCs per delivery; "
        f"IMAP login+SELECT+UID FETCH 1:* of {n_msgs}: {per_imap} RPCs; POP3 login+STAT+"
        f"{n_msgs} RETR: {per_pop3} RPCs; bodies per node {spread}; 4th node had buckets "
        f"{joined:.2f} s after start; a restarted node settled {back:.2f} s after start; "
        f"p4's calls {stored_on_p4}"
    )
