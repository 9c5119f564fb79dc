"""Real ``twistd porcupine-node`` processes on 127.0.133.x: the verified-credential cache
(issue 20) is flushed cluster-wide by ``passwd`` and ``deluser``.

Two nodes with a one-hour ``--auth-cache-ttl``; a user logs in on node B until the
node that checks its password (its bucket's manager) answers from the cache; then
``mail passwd`` (and later ``mail deluser``) runs through the *other* node's admin
API, so the change reaches the checking node from elsewhere: the old password must
fail on B as soon as the change has travelled (seconds, far inside the TTL), and the
new one must work.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from yimaporc.testing.procs import NodeProc, mail_node, mail_settled, wait_for

pytestmark = pytest.mark.integration

PORT, ADMIN, POP3, IMAP = 17933, 18133, 11133, 11233
USER = "cached@example.org"


def host(i: int) -> str:
    return f"127.0.133.{i}"


def make_node(tmp_path: Path, i: int, secret: Path) -> NodeProc:
    ports = {"cluster": PORT, "admin": ADMIN, "pop3": POP3, "imap": IMAP}
    join = [f"{host(j)}:{PORT}" for j in (1, 2) if j != i]
    extra = ["--auth-cache-ttl", "3600"]
    return mail_node(tmp_path, f"c{i}", host(i), ports, secret, join, extra)


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[list[NodeProc], Path]]:
    """Nodes c1 and c2, started, and stopped (SIGTERM, by PID) at the end."""
    secret = tmp_path / "cluster.secret"
    secret.write_text(os.urandom(16).hex())
    nodes = [make_node(tmp_path, i, secret) for i in (1, 2)]
    try:
        for n in nodes:
            n.start()
        yield nodes, secret
    finally:
        for n in nodes:
            n.kill(signal.SIGTERM)


def cli(node: NodeProc, secret: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "yimaporc.cli", "mail", *args]
    cmd += ["--admin", node.admin_url, "--secret-file", str(secret)]
    subprocess.run(cmd, check=True, timeout=60, capture_output=True)


def pop3_login(node: int, password: str) -> bool:
    p = poplib.POP3(host(node), POP3, timeout=30)
    try:
        p.user(USER)
        p.pass_(password)
    except poplib.error_proto:
        return False
    finally:
        try:
            p.quit()
        except (poplib.error_proto, OSError):
            pass
    return True


def imap_login(node: int, password: str) -> bool:
    m = imaplib.IMAP4(host(node), IMAP, timeout=30)
    try:
        m.login(USER, password)
    except imaplib.IMAP4.error:
        return False
    finally:
        try:
            m.logout()
        except (imaplib.IMAP4.error, OSError):
            pass
    return True


def hits(nodes: list[NodeProc]) -> list[int]:
    docs = [wait_for(n.status, 10, f"{n.node_id} status") for n in nodes]
    return [int(d["auth"]["cache_hits"]) for d in docs]


def test_passwd_and_deluser_on_one_node_flush_the_cache_of_the_other(
    two: tuple[list[NodeProc], Path],
) -> None:
    """After passwd/deluser through node A, a password cached where node B's logins are
    checked stops working within seconds (not the one-hour TTL); the new one works."""
    nodes, secret = two
    wait_for(lambda: mail_settled(nodes), 60, "two settled nodes")
    cli(nodes[0], secret, "adduser", USER, "--password", "old")
    wait_for(lambda: pop3_login(2, "old"), 30, "the user to log in on node B")
    # Which node checks this user's passwords (answers from its cache)?
    before = hits(nodes)
    assert imap_login(2, "old") and pop3_login(2, "old")
    after = hits(nodes)
    gained = [b - a for a, b in zip(before, after, strict=True)]
    assert sorted(gained) == [0, 2], f"cache hits per node: {before} -> {after}"
    checker = gained.index(2)
    other = nodes[1 - checker]  # the change is made there and travels to the checker

    cli(other, secret, "passwd", USER, "--password", "new")
    wait_for(lambda: not pop3_login(2, "old"), 10, "the old password to fail on node B")
    assert not imap_login(2, "old")
    assert imap_login(2, "new") and pop3_login(2, "new") and pop3_login(1, "new")
    cached = hits(nodes)[checker]
    assert pop3_login(2, "new") and hits(nodes)[checker] == cached + 1  # cached anew

    cli(other, secret, "deluser", USER)
    wait_for(lambda: not pop3_login(2, "new"), 10, "the deleted user to fail on node B")
    assert not imap_login(2, "new") and not imap_login(1, "new")
