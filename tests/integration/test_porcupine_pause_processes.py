"""Real ``twistd porcupine-node`` processes on 127.0.112.x (issue 14): the manager of
a user's bucket is SIGSTOPped for 3.5 s while mail for that user keeps arriving
through the other nodes, then SIGCONTed.  Afterwards every acknowledged (250)
message is listed exactly once by IMAP and by POP3 at every node, under unique
UIDs/UIDLs, and a UID shown before the pause names the same message after it.
"""

from __future__ import annotations

import imaplib
import poplib
import random
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from yimaporc.cluster.buckets import BucketMap
from yimaporc.porcupine.softstate import bucket_of as raw_bucket_of
from yimaporc.porcupine.usermap import bucket_of
from yimaporc.testing.procs import (
    NodeProc,
    mail_node,
    mail_settled,
    three_nodes,
    views_agree,
    wait_for,
)

PORT, ADMIN, SMTP, POP3, IMAP = 17946, 18080, 12525, 11110, 11143
USER, PASSWORD = "paula@example.org", "pw-paula"
SUBJECT = re.compile(rb"Subject: m(\d+)\r\n")


def host(i: int) -> str:
    return f"127.0.112.{i}"


def make_node(tmp_path: Path, i: int, secret: Path) -> NodeProc:
    ports = {"cluster": PORT, "admin": ADMIN, "smtp": SMTP, "pop3": POP3, "imap": IMAP}
    join = [] if i == 1 else [f"{host(1)}:{PORT}"]
    return mail_node(tmp_path, f"p{i}", host(i), ports, secret, join)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[list[NodeProc], Path]]:
    with three_nodes(tmp_path, make_node) as got:
        yield got


def send(node: int, i: int) -> bool:
    """One SMTP delivery; True if it was acknowledged (250)."""
    msg = f"From: a@x.org\r\nTo: {USER}\r\nSubject: m{i}\r\n\r\nbody {i}\r\n".encode()
    try:
        with smtplib.SMTP(host(node), SMTP, timeout=30) as s:
            s.sendmail("a@x.org", [USER], msg)
        return True
    except (smtplib.SMTPException, OSError):
        return False


def imap_read(node: int) -> dict[int, int]:
    """UID -> message number (from its Subject) as IMAP lists INBOX at ``node``."""
    m = imaplib.IMAP4(host(node), IMAP, timeout=30)
    try:
        m.login(USER, PASSWORD)
        typ, _ = m.select("INBOX", readonly=True)
        assert typ == "OK", f"SELECT at p{node}: {typ}"
        typ, data = m.uid("FETCH", "1:*", "(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        out: dict[int, int] = {}
        for item in data:
            if not isinstance(item, tuple):
                continue
            uid = int(re.search(rb"UID (\d+)", item[0]).group(1))  # type: ignore[union-attr]
            n = int(SUBJECT.search(item[1] + b"\r\n").group(1))  # type: ignore[union-attr]
            assert uid not in out, f"p{node}: two messages under UID {uid}"
            out[uid] = n
        return out
    finally:
        m.logout()


def imap_read_answered(node: int) -> dict[int, int]:
    """:func:`imap_read`, again while the node refuses (a transient NO [UNAVAILABLE]: a
    read lease renewal running late on a loaded machine), for up to 20 s."""
    got: list[dict[int, int]] = []

    def answered() -> bool:
        try:
            got.append(imap_read(node))
        except (imaplib.IMAP4.error, AssertionError, OSError):
            return False
        return True

    wait_for(answered, 20, f"IMAP at p{node} to answer", interval=0.5)
    return got[-1]


def pop3_read(node: int) -> list[tuple[bytes, int]]:
    """(UIDL, message number) as POP3 lists the mailbox at ``node``."""
    p = poplib.POP3(host(node), POP3, timeout=30)
    p.user(USER)
    p.pass_(PASSWORD)
    _, listing, _ = p.uidl()
    out = []
    for line in listing:
        k, uidl = line.split()
        _, lines, _ = p.top(int(k), 0)
        n = int(SUBJECT.search(b"\r\n".join(lines) + b"\r\n").group(1))  # type: ignore[union-attr]
        out.append((uidl, n))
    p.quit()
    return out


def manager(tmp_path: Path) -> int:
    """The node managing USER's bucket, from node 1's cached user map."""
    bmap = BucketMap.parse((tmp_path / "p1" / "data" / "bucketmap.bin").read_bytes())
    return int(bmap.owners[bucket_of(USER)][1:])


def test_manager_paused_while_mail_arrives_every_acknowledged_message_once_everywhere(
    cluster: tuple[list[NodeProc], Path], tmp_path: Path
) -> None:
    """SIGSTOP the manager of the user's bucket 3.5 s while 4 clients deliver through
    the other nodes, SIGCONT: every 250 is listed exactly once by IMAP and by POP3 at
    every node, UIDs and UIDLs unique, UIDs shown before unchanged."""
    nodes, secret = cluster
    wait_for(lambda: views_agree(nodes), 30, "3 nodes to agree")
    wait_for(lambda: mail_settled(nodes), 20, "buckets on 3 nodes")
    cli = [sys.executable, "-m", "yimaporc.cli", "mail", "adduser", USER, "--password", PASSWORD,
           "--admin", nodes[0].admin_url, "--secret-file", str(secret)]  # fmt: skip
    subprocess.run(cli, check=True, capture_output=True)
    rng = random.Random(112)
    acked: set[int] = set()
    lock = threading.Lock()
    counter = iter(range(10_000))

    def deliver(node: int) -> None:
        with lock:
            i = next(counter)
        if send(node, i):
            with lock:
                acked.add(i)

    for _ in range(12):
        deliver(rng.randint(1, 3))
    before = imap_read_answered(1)
    assert sorted(before.values()) == sorted(acked)
    m = manager(tmp_path)
    others = [i for i in (1, 2, 3) if i != m]
    victim = nodes[m - 1]
    assert victim.process is not None
    stop = threading.Event()
    shown: dict[int, int] = dict(before)  # UID -> message, as clients saw them
    refused = [0]
    views: list[int] = []

    def reader() -> None:
        """A syncing client at another node, reading all the time."""
        while not stop.is_set():
            try:
                got = imap_read(others[0])
            except (imaplib.IMAP4.error, AssertionError, OSError):
                refused[0] += 1  # NO [UNAVAILABLE]: mail out of reach, said so
                continue
            with lock:
                shown.update(got)

    def watch() -> None:
        views.append(len(nodes[others[0] - 1].members() or ()))

    def client() -> None:
        while not stop.is_set():
            deliver(rng.choice(others))

    victim.process.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(5) as pool:
            for _ in range(4):
                pool.submit(client)
            pool.submit(reader)
            # While the clients deliver: a reader at another node, until 3.5 s passed.
            wait_for(lambda: watch() or time.monotonic() >= t0 + 3.5, 10, "3.5 s of pause")
            victim.process.send_signal(signal.SIGCONT)
            paused = time.monotonic() - t0
            wait_for(lambda: len(acked) >= 12 + 8, 30, "deliveries around the pause")
            stop.set()
    finally:
        stop.set()
        victim.process.send_signal(signal.SIGCONT)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(deliver, [rng.randint(1, 3) for _ in range(8)]))
    wait_for(lambda: views_agree(nodes), 30, "one view again")
    wait_for(lambda: mail_settled(nodes), 20, "settled again")

    def complete() -> bool:
        try:
            return all(sorted(imap_read(n).values()) == sorted(acked) for n in (1, 2, 3))
        except (imaplib.IMAP4.error, OSError, AssertionError):
            return False

    top = max(shown)
    t1 = time.monotonic()
    wait_for(complete, 30, "every acknowledged message listed at every node", interval=0.5)
    numbered_in = time.monotonic() - t1
    for n in (1, 2, 3):
        got = imap_read_answered(n)
        assert sorted(got.values()) == sorted(acked), f"IMAP at p{n}"
        for uid, msg in shown.items():
            assert got.get(uid) == msg, f"p{n}: UID {uid} changed"
        late = [u for u, x in got.items() if x not in shown.values() and u < top]
        assert not late, f"p{n}: newly visible below UID {top} already shown: {late}"
        listing = pop3_read(n)
        uidls = [u for u, _ in listing]
        assert len(uidls) == len(set(uidls)), f"POP3 at p{n}: a UIDL twice"
        assert sorted(x for _, x in listing) == sorted(acked), f"POP3 at p{n}"
    docs = [nd.status() or {} for nd in nodes]
    unnumbered = sum(d["mail_cluster"]["numbered"] for d in docs)
    print(
        f"\nmanager p{m} paused {paused:.1f} s; {len(acked)} acknowledged; "
        f"numbered after storing unnumbered: {unnumbered}; all listed {numbered_in:.1f} s "
        f"after the view settled; pauses seen: {docs[m - 1]['mail_cluster']['pauses']}; "
        f"members seen by p{others[0]} during the pause: min {min(views)}; reads refused "
        f"{refused[0]}, highest UID shown {top}"
    )


def home(user: str, live: list[int]) -> int:
    """The node holding ``user``'s mailbox tree (``MailCluster.home_of``)."""
    return max(live, key=lambda n: raw_bucket_of(f"{user.lower()}|p{n}", 1 << 31))


def test_append_while_the_manager_is_paused_waits_and_succeeds(
    cluster: tuple[list[NodeProc], Path], tmp_path: Path
) -> None:
    """An IMAP client logged in at a third node APPENDs while the user's manager is
    SIGSTOPped (mbsync takes a NO to APPEND as final and never uploads that message
    again): the command waits for the failure detector to replace the manager and
    answers OK within mbsync's 20 s command timeout; after SIGCONT the message is
    listed exactly once at every node.  (The home node, where APPEND stores, is
    another node: a paused home may have the store and still answers NO.)"""
    nodes, secret = cluster
    wait_for(lambda: views_agree(nodes), 30, "3 nodes to agree")
    wait_for(lambda: mail_settled(nodes), 20, "buckets on 3 nodes")
    bmap = BucketMap.parse((tmp_path / "p1" / "data" / "bucketmap.bin").read_bytes())
    user = next(
        u
        for u in (f"apu{i}@example.org" for i in range(500))
        if home(u, [1, 2, 3]) != int(bmap.owners[bucket_of(u)][1:])
    )
    boss, keeper = int(bmap.owners[bucket_of(user)][1:]), home(user, [1, 2, 3])
    (served,) = {1, 2, 3} - {boss, keeper}
    cli = [sys.executable, "-m", "yimaporc.cli", "mail", "adduser", user, "--password", PASSWORD,
           "--admin", nodes[0].admin_url, "--secret-file", str(secret)]  # fmt: skip
    subprocess.run(cli, check=True, capture_output=True)
    wait_for(lambda: all((n.status() or {}).get("users") == 1 for n in nodes), 10, "profiles")
    m = imaplib.IMAP4(host(served), IMAP, timeout=25)
    m.login(user, PASSWORD)
    body = f"From: a@x.org\r\nTo: {user}\r\nSubject: m1\r\n\r\nappended while paused\r\n"
    victim = nodes[boss - 1].process
    assert victim is not None
    victim.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        typ, data = m.append("INBOX", None, None, body.encode())
        took = time.monotonic() - started
    finally:
        victim.send_signal(signal.SIGCONT)
    m.logout()
    print(f"APPEND with p{boss} (manager) paused: {typ} {data} after {took:.1f} s")
    assert typ == "OK", f"APPEND answered {typ} {data} after {took:.1f} s"
    assert took < 20.0, "within mbsync's command timeout"
    refusals = (nodes[served - 1].status() or {}).get("mail_refusals", {})
    assert refusals.get("append_waits", 0) + refusals.get("reserve_waits", 0) > 0, refusals
    wait_for(lambda: mail_settled(nodes), 30, f"p{boss} back")

    def listed(node: int) -> list[int]:
        c = imaplib.IMAP4(host(node), IMAP, timeout=30)
        try:
            c.login(user, PASSWORD)
            if c.select("INBOX", readonly=True)[0] != "OK":
                return []
            _, got = c.uid("FETCH", "1:*", "(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            return [int(x.group(1)) for it in got if isinstance(it, tuple)
                    for x in [SUBJECT.search(it[1])] if x]  # fmt: skip
        finally:
            c.logout()

    for node in (1, 2, 3):
        wait_for(lambda node=node: listed(node) == [1], 30, f"the message once at p{node}")  # type: ignore[misc]
