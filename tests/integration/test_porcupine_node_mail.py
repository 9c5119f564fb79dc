"""A real `twistd porcupine-node` serving SMTP, POP3 and IMAP to real clients."""

from __future__ import annotations

import imaplib
import poplib
import re
import signal
import smtplib
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from yimaporc.testing.procs import NodeProc, wait_for

HOST = "127.0.15.1"
SMTP, POP3, IMAP = 12525, 11110, 11143
USER, PASSWORD = "demo@example.org", "s3cret"


def start_node(tmp_path: Path, max_size: int = 1 << 20) -> NodeProc:
    node = NodeProc(
        "porcupine", "m1", HOST, tmp_path / "m1" / "data", 17946, 18080,
        extra=["--domain", "example.org", "--smtp", f"tcp:{SMTP}:interface={HOST}",
               "--pop3", f"tcp:{POP3}:interface={HOST}", "--imap", f"tcp:{IMAP}:interface={HOST}",
               "--max-message-size", str(max_size)],
    )  # fmt: skip
    node.start()
    wait_for(lambda: (node.status() or {}).get("services", {}).get("imap"), 20, "mail services")
    return node


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProc]:
    """One mail node with the user demo@example.org."""
    n = start_node(tmp_path)
    try:
        cli = [sys.executable, "-m", "yimaporc.cli", "mail", "adduser", USER, "--password", PASSWORD,
               "--admin", n.admin_url, "--secret-file", str(n.data_dir / "cluster.secret")]  # fmt: skip
        subprocess.run(cli, check=True, capture_output=True)
        yield n
    finally:
        n.kill(signal.SIGTERM)


def message(i: int, size: int = 4000) -> bytes:
    body = (f"line {i} " * 20 + "\r\n") * (size // 160)
    return f"From: a@x.org\r\nTo: {USER}\r\nSubject: test {i}\r\n\r\n{body}".encode()


def send(data: bytes, to: str = USER) -> None:
    with smtplib.SMTP(HOST, SMTP, timeout=30) as s:
        s.sendmail("a@x.org", [to], data)


def imap_bodies() -> dict[int, bytes]:
    m = imaplib.IMAP4(HOST, IMAP)
    m.login(USER, PASSWORD)
    m.select("INBOX", readonly=True)
    _, data = m.uid("FETCH", "1:*", "(UID BODY.PEEK[])")
    m.logout()
    out = {}
    for item in data:
        if isinstance(item, tuple):
            uid = int(re.search(rb"UID (\d+)", item[0]).group(1))  # type: ignore[union-attr]
            out[uid] = item[1]
    return out


def test_smtp_then_imap_pop3_curl_read_back_identical(node: NodeProc) -> None:
    """smtplib and swaks deliver; imaplib, poplib and curl read the exact bytes back."""
    original = message(1)
    send(original)
    subprocess.run(
        ["swaks", "--server", f"{HOST}:{SMTP}", "--to", USER, "--from", "b@y.org",
         "--header", "Subject: via swaks", "--body", "swaks body"],
        check=True, capture_output=True,
    )  # fmt: skip
    bodies = imap_bodies()
    assert len(bodies) == 2
    first = bodies[min(bodies)]
    assert first.endswith(original), "stored = Received header + the exact message"
    assert b"swaks body" in bodies[max(bodies)]
    p = poplib.POP3(HOST, POP3)
    p.user(USER)
    p.pass_(PASSWORD)
    _, lines, _ = p.retr(1)
    p.quit()
    assert b"\r\n".join(lines) + b"\r\n" == first
    curl_imap = subprocess.run(
        ["curl", "-s", f"imap://{HOST}:{IMAP}/INBOX;UID={min(bodies)}", "-u", f"{USER}:{PASSWORD}"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    curl_pop = subprocess.run(
        ["curl", "-s", f"pop3://{HOST}:{POP3}/1", "-u", f"{USER}:{PASSWORD}"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    assert curl_imap == first and curl_pop == first


def test_flags_persist_across_sessions_and_uidvalidity_across_restart(
    node: NodeProc, tmp_path: Path
) -> None:
    """A flag set in one IMAP session is seen by the next; UIDVALIDITY survives a restart."""
    send(message(2))
    m = imaplib.IMAP4(HOST, IMAP)
    m.login(USER, PASSWORD)
    m.select("INBOX")
    m.store("1", "+FLAGS", "(\\Flagged \\Seen)")
    validity = m.status("INBOX", "(UIDVALIDITY)")[1][0]
    m.logout()
    node.kill(signal.SIGKILL)
    node.start()
    wait_for(lambda: (node.status() or {}).get("services", {}).get("imap"), 20, "restart")
    m = imaplib.IMAP4(HOST, IMAP)
    m.login(USER, PASSWORD)
    m.select("INBOX")
    flags = m.fetch("1", "(FLAGS)")[1][0]
    assert b"\\Flagged" in flags and b"\\Seen" in flags  # type: ignore[operator]
    assert m.status("INBOX", "(UIDVALIDITY)")[1][0] == validity
    m.logout()


def test_mail_acknowledged_survives_sigkill(node: NodeProc) -> None:
    """SIGKILL right after a 250: the message is there after restart."""
    data = message(3)
    send(data)
    node.kill(signal.SIGKILL)
    node.start()
    wait_for(lambda: (node.status() or {}).get("services", {}).get("imap"), 20, "restart")
    assert any(b.endswith(data) for b in imap_bodies().values())


def test_bad_input_gets_protocol_errors_and_node_keeps_serving(node: NodeProc) -> None:
    """Oversize, unknown user, relay, bad passwords, junk and a vanished client: errors, no damage."""
    with smtplib.SMTP(HOST, SMTP) as s:
        s.ehlo()
        assert s.has_extn("size") and s.has_extn("8bitmime") and s.has_extn("pipelining")
        assert s.mail("a@x.org", ["SIZE=999999999"])[0] == 552
        s.rset()
        s.mail("a@x.org")
        assert s.rcpt("nobody@example.org")[0] == 550
        assert s.rcpt("someone@elsewhere.net")[0] == 550, "no open relay"
        assert s.rcpt(USER)[0] == 250
        code, _ = s.data(
            b"Subject: big\r\n\r\n" + b"x" * 80 + b"\r\n" * 1 + (b"y" * 998 + b"\r\n") * 1100
        )
        assert code == 552
        assert s.docmd("FOOBAR")[0] == 500
    with socket.create_connection((HOST, SMTP)) as raw:
        raw.recv(1000)
        raw.sendall(
            b"EHLO x\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<" + USER.encode() + b">\r\nDATA\r\n"
        )
        raw.sendall(b"Subject: half\r\n\r\nthis message never ends")
    with socket.create_connection((HOST, SMTP)) as raw:
        raw.recv(1000)
        raw.sendall(b"X" * 10000 + b"\r\n")
        assert raw.recv(1000).startswith(b"500")
    with pytest.raises(poplib.error_proto):
        p = poplib.POP3(HOST, POP3)
        p.user(USER)
        p.pass_("wrong")
    m = imaplib.IMAP4(HOST, IMAP)
    with pytest.raises(imaplib.IMAP4.error):
        m.login(USER, "wrong")
    send(message(4))
    bodies = imap_bodies()
    assert len(bodies) == 1, "nothing half-stored is visible"
    assert all(b"Subject: half" not in b for b in bodies.values())


def test_fifty_sessions_thousand_messages_all_once(node: NodeProc) -> None:
    """50 concurrent SMTP sessions deliver 1,000 messages: all retrievable, none twice."""

    def session(k: int) -> None:
        with smtplib.SMTP(HOST, SMTP, timeout=60) as s:
            for j in range(20):
                s.sendmail("a@x.org", [USER], message(k * 1000 + j, 1000))

    with ThreadPoolExecutor(50) as pool:
        list(pool.map(session, range(50)))
    bodies = imap_bodies()
    subjects = [re.search(rb"Subject: test (\d+)", b).group(1) for b in bodies.values()]  # type: ignore[union-attr]
    assert len(subjects) == 1000 and len(set(subjects)) == 1000
    uids = sorted(bodies)
    assert uids == list(range(1, 1001)), "UIDs strictly ascending, no gaps"
