"""Real ``twistd porcupine-node`` processes on 127.0.43.x: a user manager that is
SIGKILLed and restarted before the others notice gets its users' fragment lists
back (the commit names the coordinator's previous view; the restarted node, away,
pulls hints with ``porcupine.hints-request``), so reads stay complete.
"""

from __future__ import annotations

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

from yimaporc.cluster.buckets import BucketMap
from yimaporc.porcupine.usermap import bucket_of
from yimaporc.testing.procs import (
    NodeProc,
    mail_node,
    mail_settled,
    three_nodes,
    views_agree,
    wait_for,
)

PORT, ADMIN, SMTP, POP3 = 17946, 18080, 12525, 11110
USER, PASSWORD = "dave@example.org", "pw-dave"
SUBJECT = re.compile(rb"Subject: m(\d+)\r\n")


def host(i: int) -> str:
    return f"127.0.43.{i}"


def make_node(tmp_path: Path, i: int, secret: Path) -> NodeProc:
    ports = {"cluster": PORT, "admin": ADMIN, "smtp": SMTP, "pop3": POP3}
    join = [] if i == 1 else [f"{host(1)}:{PORT}"]
    return mail_node(tmp_path, f"q{i}", host(i), ports, secret, join)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[list[NodeProc], Path]]:
    with three_nodes(tmp_path, make_node) as got:
        yield got


def send(node: int, i: int) -> None:
    msg = f"From: a@x.org\r\nTo: {USER}\r\nSubject: m{i}\r\n\r\nbody {i}\r\n".encode()
    with smtplib.SMTP(host(node), SMTP, timeout=30) as s:
        s.sendmail("a@x.org", [USER], msg)


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
    return sorted(seen)


def holders(tmp_path: Path) -> dict[int, int]:
    return {
        i: len(list((tmp_path / f"q{i}" / "data" / "mail" / "buckets").glob(f"*/{USER}/*.m")))
        for i in (1, 2, 3)
    }


def manager(tmp_path: Path) -> int:
    """The node managing USER's bucket, from node 1's cached user map."""
    bmap = BucketMap.parse((tmp_path / "q1" / "data" / "bucketmap.bin").read_bytes())
    return int(bmap.owners[bucket_of(USER)][1:])


def test_manager_killed_and_back_before_failure_detection_keeps_reads_complete(
    cluster: tuple[list[NodeProc], Path], tmp_path: Path
) -> None:
    nodes, secret = cluster
    rng = random.Random(43)
    wait_for(lambda: views_agree(nodes), 30, "3 nodes to agree")
    wait_for(lambda: mail_settled(nodes), 20, "buckets on 3 nodes")
    cli = [sys.executable, "-m", "yimaporc.cli", "mail", "adduser", USER, "--password", PASSWORD,
           "--admin", nodes[0].admin_url, "--secret-file", str(secret)]  # fmt: skip
    subprocess.run(cli, check=True, capture_output=True)
    n_msgs = 16
    for i in range(n_msgs):
        send(rng.randint(1, 3), i)
    want = list(range(n_msgs))
    m = manager(tmp_path)
    spread = holders(tmp_path)
    assert sum(spread.values()) == n_msgs
    assert any(v for i, v in spread.items() if i != m), "some mail is not on the manager"
    assert pop3_read(rng.randint(1, 3)) == want
    victim = nodes[m - 1]
    others = [i for i in (1, 2, 3) if i != m]
    pulled = 0
    for attempt in range(3):
        epoch: Any = (nodes[others[0] - 1].status() or {})["epoch"]
        t0 = time.monotonic()
        victim.kill(signal.SIGKILL)
        victim.start()
        wait_for(lambda: views_agree(nodes), 30, "the restarted manager back")
        wait_for(lambda: mail_settled(nodes), 20, "buckets settled again")
        back = time.monotonic() - t0
        doc: Any = victim.status()
        pulled = doc["mail_cluster"]["rpc_calls"].get("porcupine.hints-request", 0)
        advanced = (nodes[others[0] - 1].status() or {})["epoch"] - epoch
        print(
            f"\nattempt {attempt}: manager q{m} back and settled {back:.2f} s after SIGKILL; "
            f"the others' epoch +{advanced}; hints-requests sent {pulled}; mail {spread}"
        )
        for node in (others[0], m, others[1]):
            assert pop3_read(node) == want, f"complete at q{node} after the restart"
        if pulled:
            break
    if not pulled:
        print("the restart was never quicker than failure detection here: pull path not run")
