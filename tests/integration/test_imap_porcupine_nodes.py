"""IMAP of real ``twistd porcupine-node`` processes (yimaporc.imap over Porcupine's
UserMail, issue 15) on 127.0.129.x: one node with a certificate (pipelining, raw
UTF-8 ENVELOPE, STARTTLS injection) and a 3-node cluster (sessions on two nodes
see each other's flags and expunges, APPEND on any node then SEARCH)."""

from __future__ import annotations

import imaplib
import re
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from yimaporc.testing.certs import client_context, make_cert
from yimaporc.testing.procs import (
    NodeProc,
    mail_node,
    mail_settled,
    three_nodes,
    views_agree,
    wait_for,
)

PORT, ADMIN, SMTP, IMAP = 17946, 18080, 12525, 11143
USER, PASSWORD = "dora@example.org", "pw-dora"
UTF8 = (
    "From: Jörg Müller <jorg@example.org>\r\nTo: dora@example.org\r\n"
    "Subject: Grüße aus Köln\r\n\r\nhallo\r\n"
).encode()


def host(i: int) -> str:
    return f"127.0.129.{i}"


def add_user(node: NodeProc, secret: Path) -> None:
    cli = [sys.executable, "-m", "yimaporc.cli", "mail", "adduser", USER, "--password", PASSWORD,
           "--admin", node.admin_url, "--secret-file", str(secret)]  # fmt: skip
    subprocess.run(cli, check=True, capture_output=True, timeout=60)


def send(node: int, raw: bytes) -> None:
    with smtplib.SMTP(host(node), SMTP, timeout=30) as s:
        s.sendmail("a@x.org", [USER], raw)


def read_until(sock: socket.socket | ssl.SSLSocket, pattern: bytes, timeout: float = 30) -> bytes:
    """Read until ``pattern`` (a regex) matches what arrived (bounded wait)."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, data, re.M):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} in {data[-500:]!r}")
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed; got {data[-500:]!r}")
        data += chunk
    return data


# --- one node with a certificate ---------------------------------------------------------


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProc]:
    """One porcupine node on 127.0.129.10 with a certificate, plaintext LOGIN allowed."""
    cert, key = make_cert(tmp_path)
    secret = tmp_path / "cluster.secret"
    secret.write_text("ab" * 16)
    ports = {"cluster": PORT, "admin": ADMIN, "smtp": SMTP, "imap": IMAP}
    extra = ["--tls-cert", str(cert), "--tls-key", str(key), "--allow-plaintext-auth"]
    n = mail_node(tmp_path, "solo", host(10), ports, secret, [], extra)
    n.start()
    try:
        wait_for(lambda: mail_settled([n]), 30, "the node to serve mail")
        add_user(n, secret)
        yield n
    finally:
        n.kill()


def test_pipelined_select_fetch_noop_and_raw_utf8_envelope(node: NodeProc) -> None:
    """LOGIN + SELECT + FETCH (ENVELOPE of a raw UTF-8 header) + NOOP in one packet are
    answered in order, the UTF-8 text sent as a literal, the session still usable."""
    with smtplib.SMTP(host(10), SMTP, timeout=30) as s:
        s.sendmail("a@x.org", [USER], UTF8)
    with socket.create_connection((host(10), IMAP), timeout=30) as sock:
        read_until(sock, rb"^\* OK")
        sock.sendall(
            f"a LOGIN {USER} {PASSWORD}\r\nb SELECT INBOX\r\n".encode()
            + b"c FETCH 1 (UID ENVELOPE BODYSTRUCTURE)\r\nd NOOP\r\n"
        )
        out = read_until(sock, rb"^d (OK|NO|BAD)")
        tags = re.findall(rb"^([a-d]) (OK|NO|BAD)", out, re.M)
        assert tags == [(b"a", b"OK"), (b"b", b"OK"), (b"c", b"OK"), (b"d", b"OK")], out
        assert b"[UIDNEXT 2]" in out and b"[PERMANENTFLAGS (" in out
        assert re.search(rb"\{\d+\}\r\n" + re.escape("Grüße aus Köln".encode()), out), out
        sock.sendall(b"e LOGOUT\r\n")
        read_until(sock, rb"^e OK")


def test_starttls_injection_discarded(node: NodeProc) -> None:
    """Commands sent in the same packet as STARTTLS are never run (inside TLS or out);
    after the handshake the session works (CVE-2011-0411 class)."""
    with socket.create_connection((host(10), IMAP), timeout=30) as sock:
        greeting = read_until(sock, rb"^\* OK")
        assert b"STARTTLS" in greeting
        sock.sendall(b"a STARTTLS\r\nb LOGIN " + USER.encode() + b" " + PASSWORD.encode() + b"\r\n")
        out = read_until(sock, rb"^a OK")
        assert b"b OK" not in out and b"b NO" not in out
        tls = client_context().wrap_socket(sock, server_hostname=host(10))
        tls.sendall(b"c CAPABILITY\r\n")
        out = read_until(tls, rb"^c OK")
        assert b"b OK" not in out and b"b NO" not in out and b"b BAD" not in out
        assert b"AUTH=PLAIN" in out  # not logged in: the injected LOGIN never ran
        tls.sendall(b"d SELECT INBOX\r\n")
        assert b"d BAD" in read_until(tls, rb"^d (OK|NO|BAD)")
        tls.sendall(b"e LOGOUT\r\n")
        read_until(tls, rb"^e OK")


# --- a 3-node cluster ---------------------------------------------------------------------


def make_node(tmp_path: Path, i: int, secret: Path) -> NodeProc:
    ports = {"cluster": PORT, "admin": ADMIN, "smtp": SMTP, "imap": IMAP}
    join = [] if i == 1 else [f"{host(1)}:{PORT}"]
    return mail_node(tmp_path, f"p{i}", host(i), ports, secret, join)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[NodeProc]]:
    """Three porcupine nodes on 127.0.129.1-3 with the user, mail on several nodes."""
    with three_nodes(tmp_path, make_node) as (nodes, secret):
        wait_for(lambda: views_agree(nodes), 30, "3 nodes to agree")
        wait_for(lambda: mail_settled(nodes), 30, "buckets on 3 nodes")
        add_user(nodes[0], secret)
        wait_for(lambda: all((n.status() or {}).get("users") == 1 for n in nodes), 20, "profile")
        for i in range(6):
            send(i % 3 + 1, b"From: a@x.org\r\nSubject: m%d\r\n\r\nbody %d\r\n" % (i, i))
        yield nodes


def login(i: int) -> imaplib.IMAP4:
    m = imaplib.IMAP4(host(i), IMAP, timeout=30)
    m.login(USER, PASSWORD)
    return m


def untagged(m: imaplib.IMAP4) -> bytes:
    """NOOP, then the untagged responses it brought, as one text."""
    m.noop()
    out = []
    for key in ("FETCH", "EXPUNGE", "EXISTS"):
        for item in m.untagged_responses.pop(key, []):
            out.append(key.encode() + b" " + (item if isinstance(item, bytes) else b"%r" % (item,)))
    return b"\n".join(out)


def test_two_nodes_see_each_others_flags_and_expunges(cluster: list[NodeProc]) -> None:
    """A session on node 1 and one on node 2 of a 3-node cluster: flags set and messages
    expunged by either reach the other on NOOP; new mail delivered anywhere shows as
    EXISTS."""
    one, two = login(1), login(2)
    _, c1 = one.select("INBOX")
    _, c2 = two.select("INBOX")
    assert c1 == c2 == [b"6"]
    one.store("1", "+FLAGS", "(\\Flagged)")
    seen = wait_for_text(two, rb"FETCH 1 \(FLAGS \(\\Flagged\)")
    assert b"UID" in seen
    two.store("2", "+FLAGS", "(\\Deleted)")
    two.expunge()
    wait_for_text(one, rb"EXPUNGE 2")
    send(3, b"From: a@x.org\r\nSubject: late\r\n\r\nx\r\n")
    wait_for_text(one, rb"EXISTS 6")
    wait_for_text(two, rb"EXISTS 6")
    for m in (one, two):
        m.logout()


def wait_for_text(m: imaplib.IMAP4, pattern: bytes, timeout: float = 30) -> bytes:
    """NOOP until the untagged responses match ``pattern`` (a bounded poll)."""
    got = [b""]

    def arrived() -> bool:
        got[0] += untagged(m) + b"\n"
        return re.search(pattern, got[0]) is not None

    wait_for(arrived, timeout, f"{pattern!r} after NOOP")
    return got[0]


def test_append_on_every_node_then_search(cluster: list[NodeProc]) -> None:
    """APPEND on each node (two of them not the user's home) is visible to the
    session's very next command: EXISTS, SEARCH and UID FETCH find it."""
    for i in (1, 2, 3):
        m = login(i)
        m.select("INBOX")
        subject = f"appended-{i}"
        msg = f"From: a@x.org\r\nSubject: {subject}\r\n\r\nneedle{i}\r\n".encode()
        typ, data = m.append("INBOX", None, None, msg)
        assert typ == "OK"
        uid = re.search(rb"APPENDUID \d+ (\d+)", data[0])
        assert uid, data
        typ, found = m.uid("SEARCH", None, "SUBJECT", subject)
        assert found[0].split() == [uid.group(1)], (i, found)
        typ, found = m.search(None, "BODY", f"needle{i}")
        assert len(found[0].split()) == 1
        typ, body = m.uid("FETCH", uid.group(1), "(BODY.PEEK[TEXT])")
        assert f"needle{i}".encode() in body[0][1]  # type: ignore[index]
        m.logout()


def test_idle_on_one_node_sees_changes_made_on_another(cluster: list[NodeProc]) -> None:
    """A session in IDLE on node 3 is told of a flag change and an expunge made on node
    1 (by the cluster's poll, within its 5 s interval) without sending anything."""
    with socket.create_connection((host(3), IMAP), timeout=30) as sock:
        read_until(sock, rb"^\* OK")
        sock.sendall(f"a LOGIN {USER} {PASSWORD}\r\nb SELECT INBOX\r\nc IDLE\r\n".encode())
        read_until(sock, rb"^\+ ")
        one = login(1)
        one.select("INBOX")
        one.store("3", "+FLAGS", "(\\Flagged \\Deleted)")
        got = read_until(sock, rb"^\* 3 FETCH \(.*\\Flagged", timeout=30)
        assert b"\\Deleted" in got
        one.expunge()
        read_until(sock, rb"^\* 3 EXPUNGE", timeout=30)
        one.logout()
        sock.sendall(b"DONE\r\nd LOGOUT\r\n")
        read_until(sock, rb"^d OK")
