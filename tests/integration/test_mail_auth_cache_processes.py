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
import json
import os
import poplib
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from yimaporc.porcupine.usermap import bucket_of
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


def manager_of_user(nodes: list[NodeProc]) -> int:
    """Index of the node managing USER's bucket (it checks the passwords, from its cache)."""

    def owners() -> list[str] | None:
        try:
            with urllib.request.urlopen(nodes[1].admin_url + "/api/buckets", timeout=2) as r:
                doc: dict[str, Any] = json.load(r)
        except OSError:
            return None
        return list(doc["owners"])

    owner = wait_for(owners, 10, "the bucket owners")[bucket_of(USER)]
    return [n.node_id for n in nodes].index(owner)


def test_passwd_and_deluser_on_one_node_flush_the_cache_of_the_other(
    two: tuple[list[NodeProc], Path],
) -> None:
    """After passwd/deluser through one node, a password cached at the user's manager
    (the other node, which checks the logins) stops working within seconds (not the
    one-hour TTL); the new one works."""
    nodes, secret = two
    wait_for(lambda: mail_settled(nodes), 60, "two settled nodes")
    cli(nodes[0], secret, "adduser", USER, "--password", "old")
    checker = manager_of_user(nodes)
    at = checker + 1  # log in at the manager, so its cache answers (a proxy node
    # would answer repeated logins from its own short login memory instead)
    away = 2 - checker  # the other node's host number
    other = nodes[1 - checker]  # the change is made there and travels to the checker
    wait_for(lambda: pop3_login(at, "old"), 30, "the user to log in at the manager")
    before = hits(nodes)
    assert imap_login(at, "old") and pop3_login(at, "old")
    after = hits(nodes)
    gained = [b - a for a, b in zip(before, after, strict=True)]
    assert gained[checker] == 2 and gained[1 - checker] == 0, f"{before} -> {after}"

    cli(other, secret, "passwd", USER, "--password", "new")
    wait_for(lambda: not pop3_login(at, "old"), 10, "the old password to fail")
    assert not imap_login(at, "old")
    assert imap_login(at, "new") and pop3_login(at, "new") and pop3_login(away, "new")
    cached = hits(nodes)[checker]
    assert pop3_login(at, "new") and hits(nodes)[checker] == cached + 1  # cached anew

    cli(other, secret, "deluser", USER)
    wait_for(lambda: not pop3_login(at, "new"), 10, "the deleted user to fail")
    assert not imap_login(at, "new") and not imap_login(away, "new")
