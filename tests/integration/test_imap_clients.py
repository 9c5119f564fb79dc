"""Real IMAP clients (Python's imaplib, imapclient, imap-tools, curl) against the yimaporc.imap
shell over the in-memory backend, in a child process on 127.0.121.0/24."""

from __future__ import annotations

import imaplib
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

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


def test_imapclient_session(server: int) -> None:
    """imapclient: capabilities, folders with special use, fetch of envelope and body,
    append, move, IDLE woken by another session's append, ENABLE/ID/NAMESPACE, status."""
    imapclient = pytest.importorskip("imapclient")
    c = imapclient.IMAPClient(HOST, port=server, ssl=False, timeout=30)
    c.login("alice", "pw")
    assert c.has_capability("UIDPLUS") and c.has_capability("MOVE")
    folders = {name: flags for flags, _delim, name in c.list_folders()}
    assert b"\\Trash" in folders["Trash"] and "INBOX" in folders
    assert c.find_special_folder(imapclient.imapclient.SENT) == "Sent"
    c.id_({"name": "test"})
    assert c.namespace().personal == (("", "/"),)
    assert c.enable("CONDSTORE") == [b"CONDSTORE"]
    info = c.select_folder("INBOX")
    assert info[b"EXISTS"] == 1 and info[b"UIDNEXT"] == 2
    data = c.fetch([1], ["ENVELOPE", "FLAGS", "BODY.PEEK[]", "RFC822.SIZE"])
    assert data[1][b"ENVELOPE"].subject == b"hello"
    assert data[1][b"BODY[]"].endswith(b"hello world\r\n")
    assert c.search(["NOT", "SEEN"]) == [1]
    c.append("INBOX", b"Subject: second\r\n\r\nx\r\n", flags=[b"$Label"])
    assert c.folder_status("INBOX", ["MESSAGES", "UIDNEXT"]) == {b"MESSAGES": 2, b"UIDNEXT": 3}
    c.move([2], "Archive")
    assert c.search("ALL") == [1]
    other = imapclient.IMAPClient(HOST, port=server, ssl=False, timeout=30)
    other.login("alice", "pw")
    c.idle()
    other.append("INBOX", b"Subject: third\r\n\r\nx\r\n")
    responses = c.idle_check(timeout=20)
    c.idle_done()
    assert (2, b"EXISTS") in responses
    other.logout()
    c.logout()


def test_imap_tools_session(server: int) -> None:
    """imap-tools: login, fetch messages, flag, folders (create, list, status), move."""
    imap_tools = pytest.importorskip("imap_tools")
    with imap_tools.MailBoxUnencrypted(HOST, port=server).login("alice", "pw") as mb:
        msgs = list(mb.fetch(mark_seen=False))
        assert [m.subject for m in msgs] == ["hello"]
        assert msgs[0].from_ == "bob@example.org" and msgs[0].text.strip() == "hello world"
        mb.flag(msgs[0].uid, imap_tools.MailMessageFlags.FLAGGED, True)
        assert "\\Flagged" in next(iter(mb.fetch(headers_only=True))).flags
        mb.folder.create("Projects/2026")
        assert "Projects/2026" in [f.name for f in mb.folder.list()]
        assert mb.folder.status("INBOX")["MESSAGES"] == 1
        mb.move(msgs[0].uid, "Projects/2026")
        mb.folder.set("Projects/2026")
        assert [m.subject for m in mb.fetch()] == ["hello"]


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


def test_curl_session(server: int, tmp_path: Any) -> None:
    """curl: list mailboxes, fetch a message by UID, search, and upload (APPEND)."""
    if shutil.which("curl") is None:
        pytest.skip("curl not installed (make tools)")
    url = f"imap://{HOST}:{server}"

    def curl(*args: str) -> str:
        done = subprocess.run(
            ["curl", "-sS", "--max-time", "30", "-u", "alice:pw", *args],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        return done.stdout

    listing = curl(f"{url}/")
    assert '"INBOX"' in listing and "\\Sent" in listing
    assert curl(f"{url}/INBOX;UID=1").endswith("hello world\n")
    assert curl(f"{url}/INBOX", "-X", "SEARCH SUBJECT hello").strip() == "* SEARCH 1"
    upload = tmp_path / "m.eml"
    upload.write_bytes(b"Subject: via curl\r\n\r\nuploaded\r\n")
    curl("-T", str(upload), f"{url}/Drafts")
    assert curl(f"{url}/Drafts;UID=1").endswith("uploaded\n")
