"""Python's imaplib and raw pipelined lines against the yimaporc.imap shell over the in-memory
backend, in a child process on 127.0.121.0/24 (imapclient, imap-tools, curl, mbsync, offlineimap
and mutt against every server target: test_imap_real_clients.py)."""

from __future__ import annotations

import imaplib
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.integration

HOST = "127.0.121.1"


@pytest.fixture
def server() -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "yimaporc.testing.imap_memory", HOST, "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY "), line
        yield int(line.split()[1])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_imaplib_session(server: int) -> None:
    """imaplib: login, select, search, fetch, store, append (synchronising literal),
    copy with COPYUID, expunge, list, logout."""
    m = imaplib.IMAP4(HOST, server, timeout=30)
    assert m.login("alice", "pw")[0] == "OK"
    typ, data = m.select("INBOX")
    assert (typ, data) == ("OK", [b"1"])
    assert m.search(None, "OR", "SEEN", "SUBJECT", '"hello"') == ("OK", [b"1"])
    typ, data = m.fetch("1", "(RFC822 FLAGS)")
    assert typ == "OK" and data[0][1].endswith(b"hello world\r\n")  # type: ignore[index]
    typ, data = m.store("1", "+FLAGS", "(\\Flagged)")
    assert typ == "OK" and b"\\Flagged" in data[0]  # type: ignore[operator]
    typ, data = m.append("INBOX", "(\\Seen)", None, b"Subject: appended\r\n\r\nbody \xc3\xa9\r\n")
    assert typ == "OK" and b"APPENDUID" in data[0]  # type: ignore[operator]
    typ, data = m.copy("1:2", "Archive")
    assert typ == "OK" and b"COPYUID" in data[0]  # type: ignore[operator]
    m.store("1", "+FLAGS", "(\\Deleted)")
    typ, data = m.expunge()
    assert (typ, data) == ("OK", [b"1"])
    typ, boxes = m.list()
    assert typ == "OK" and any(b'"Sent"' in b and b"\\Sent" in b for b in boxes)  # type: ignore[operator]
    assert m.logout()[0] == "BYE"


def test_raw_pipelining_and_hostile_lines(server: int) -> None:
    """One packet with LOGIN, SELECT, FETCH, junk and NOOP is answered in order over TCP."""
    s = socket.create_connection((HOST, server), timeout=30)
    f = s.makefile("rb")
    assert f.readline().startswith(b"* OK")
    s.sendall(
        b"a LOGIN alice pw\r\nb SELECT INBOX\r\nc UID FETCH 1:* (FLAGS)\r\n\xff junk\r\nd NOOP\r\n"
    )
    tags = []
    while len(tags) < 5:
        line = f.readline()
        assert line, tags
        if not line.startswith(b"* ") or line.startswith(b"* BAD"):
            tags.append(line.split(b" ")[0 if not line.startswith(b"*") else 1][:3])
    assert tags == [b"a", b"b", b"c", b"BAD", b"d"]
    s.close()
