"""Issue 15 extensions and a mail app's first sync against every server target, checked
against Dovecot 2.3 (the reference) on the same scripts: MULTIAPPEND, SEARCHRES, and the
command sequence Thunderbird and K-9 send on a first sync and a resync (ID, ENABLE,
LIST-EXTENDED with SPECIAL-USE, STATUS per folder, SELECT, UID FETCH 1:* (FLAGS),
UID FETCH of BODY.PEEK[HEADER.FIELDS (...)], IDLE woken by another session).

Servers listen on 127.0.140.0/24 (this file's own range); every one is stopped by PID.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest

from yimaporc.testing.imap_targets import (
    Target,
    dovecot_target,
    memory_target,
    message,
    porcupine_target,
)

pytestmark = pytest.mark.integration

NET = "127.0.140"


@pytest.fixture(
    scope="module",
    params=[
        "memory",
        "porcupine1",
        pytest.param("porcupine3", marks=pytest.mark.slow),
        pytest.param("dovecot", marks=pytest.mark.slow),
    ],
)
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:  # fmt: skip
    """One running server per target for the whole module."""
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "memory":
        with memory_target(f"{NET}.1") as t:
            yield t
    elif request.param == "dovecot":
        from test_imap_real_clients import need

        need("dovecot")
        with dovecot_target(f"{NET}.2", 10143) as t:
            yield t
    else:
        with porcupine_target(tmp, int(request.param[-1]), NET) as t:
            yield t


class Raw:
    """A minimal IMAP client over a socket: sends commands as given, reads responses with
    their literals, so the test controls every byte (MULTIAPPEND, IDLE, pipelining)."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.buf = b""
        self.n = 0
        self.greeting = self.line()

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buf += data

    def line(self) -> bytes:
        """One response line with its literals inlined (CRLF stripped at the end)."""
        out = b""
        while True:
            while b"\r\n" not in self.buf:
                self._fill()
            head, self.buf = self.buf.split(b"\r\n", 1)
            out += head
            m = re.search(rb"\{(\d+)\}$", head)
            if m is None:
                return out
            size = int(m.group(1))
            while len(self.buf) < size:
                self._fill()
            out += b"\r\n" + self.buf[:size]
            self.buf = self.buf[size:]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def tag(self) -> bytes:
        self.n += 1
        return b"t%d" % self.n

    def until(self, tag: bytes) -> tuple[list[bytes], bytes]:
        """Untagged lines up to the tagged response of ``tag``, and that response."""
        lines = []
        while True:
            ln = self.line()
            if ln.startswith(tag + b" "):
                return lines, ln
            lines.append(ln)

    def cmd(self, text: bytes) -> tuple[list[bytes], bytes]:
        """Send one command (literals non-synchronising) and read its answer."""
        tag = self.tag()
        self.send(tag + b" " + text + b"\r\n")
        return self.until(tag)

    def ok(self, text: bytes) -> list[bytes]:
        lines, done = self.cmd(text)
        assert done.split()[1] == b"OK", (text, done)
        return lines


def login(t: Target) -> tuple[Raw, str, str]:
    user, password = t.new_user()
    c = Raw(t.host, t.port)
    c.ok(b'LOGIN "%s" "%s"' % (user.encode(), password.encode()))
    return c, user, password


def literal(raw: bytes, sync: bool = False) -> bytes:
    return b"{%d%s}\r\n" % (len(raw), b"" if sync else b"+") + raw


def capabilities(c: Raw) -> set[bytes]:
    [line] = [x for x in c.ok(b"CAPABILITY") if x.startswith(b"* CAPABILITY ")]
    return set(line.split()[2:])


def test_multiappend_all_or_nothing(target: Target) -> None:
    """MULTIAPPEND of three messages (synchronising literals) answers one APPENDUID with
    three consecutive UIDs and stores them in order with their flags; one with \\Recent
    among them, or a missing mailbox, stores none (as Dovecot)."""
    c, _, _ = login(target)
    try:
        assert b"MULTIAPPEND" in capabilities(c)
        msgs = [message(f"multi {i}") for i in range(3)]
        tag = c.tag()
        c.send(tag + b" APPEND Archive (\\Seen) " + b"{%d}\r\n" % len(msgs[0]))
        for i, raw in enumerate(msgs):
            assert c.line().startswith(b"+")
            nxt = b"" if i == 2 else b" {%d}\r\n" % len(msgs[i + 1])
            c.send(raw + (nxt or b"\r\n"))
        _, done = c.until(tag)
        m = re.match(rb"\S+ OK \[APPENDUID \d+ (\d+):(\d+)\]", done)
        assert m and int(m.group(2)) - int(m.group(1)) == 2, done
        bad = b" ".join(literal(r) for r in msgs[:2]) + b" (\\Recent) " + literal(msgs[2])
        _, done = c.cmd(b"APPEND Archive " + bad)
        assert done.split()[1] in (b"NO", b"BAD")
        _, done = c.cmd(b"APPEND Nowhere " + b" ".join(literal(r) for r in msgs))
        assert done.split()[1] == b"NO" and b"[TRYCREATE]" in done
        c.ok(b"SELECT Archive")
        lines = c.ok(b"FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        subjects = [re.search(rb"Subject: (.*)\r\n", x).group(1) for x in lines if b" FETCH " in x]  # type: ignore[union-attr]
        assert subjects == [b"multi 0", b"multi 1", b"multi 2"]
        assert [b"\\Seen" in x for x in lines if b" FETCH " in x] == [True, False, False]
    finally:
        c.close()


def test_searchres(target: Target) -> None:
    """SEARCH RETURN (SAVE) says nothing untagged; FETCH $, SEARCH $, SEARCH NOT $ and
    MIN/MAX saving give the same answers as Dovecot's."""
    user, password = target.new_user()
    target.seed(user, password, [message(f"res {s}") for s in ("hit", "miss", "hit", "miss")])
    c = Raw(target.host, target.port)
    try:
        c.ok(b'LOGIN "%s" "%s"' % (user.encode(), password.encode()))
        assert b"SEARCHRES" in capabilities(c)
        c.ok(b"SELECT INBOX")
        assert c.ok(b"SEARCH RETURN (SAVE) SUBJECT hit") == []
        assert c.ok(b"SEARCH $") == [b"* SEARCH 1 3"]
        assert c.ok(b"SEARCH NOT $") == [b"* SEARCH 2 4"]
        fetched = c.ok(b"FETCH $ (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert [x.split()[1] for x in fetched] == [b"1", b"3"]
        lines = c.ok(b"SEARCH RETURN (SAVE MAX) SUBJECT hit")
        assert lines and re.search(rb"\bMAX 3\b", lines[0])
        assert c.ok(b"SEARCH $") == [b"* SEARCH 3"]
        c.ok(b"SELECT INBOX")
        assert c.ok(b"SEARCH $") == [b"* SEARCH"]
    finally:
        c.close()


HEADERS = b"From To Cc Subject Date Message-ID References In-Reply-To Content-Type Reply-To"


def first_sync(c: Raw, idle_wake: Raw | None = None) -> dict[str, object]:
    """The commands a mail app sends on a first sync (Thunderbird 115 and K-9 6 in their
    logs, normalised to what both send); what a user would see of the answers."""
    seen: dict[str, object] = {}
    caps = capabilities(c)
    c.ok(b'ID ("name" "Thunderbird" "version" "115.0")')
    enable = [e for e in (b"CONDSTORE", b"QRESYNC") if e in caps]
    if enable:
        c.ok(b"ENABLE " + b" ".join(enable))
    lines = c.ok(b'LIST "" "*" RETURN (SPECIAL-USE SUBSCRIBED)')
    folders = {}
    for x in lines:
        m = re.match(rb'\* LIST \(([^)]*)\) "/" "?([^"]*)"?$', x)
        assert m, x
        attrs = {a for a in m.group(1).split() if a in (b"\\Sent", b"\\Drafts", b"\\Trash",
                                                          b"\\Junk", b"\\Archive")}  # fmt: skip
        folders[m.group(2).decode()] = (attrs, b"\\Subscribed" in m.group(1).split())
    seen["folders"] = folders
    counts = {}
    for name in sorted(folders):
        [st] = c.ok(b'STATUS "%s" (MESSAGES UIDNEXT UNSEEN)' % name.encode())
        m = re.search(rb"MESSAGES (\d+) UIDNEXT \d+ UNSEEN (\d+)", st)
        assert m, st
        counts[name] = (int(m.group(1)), int(m.group(2)))
    seen["status"] = counts
    lines = c.ok(b"SELECT INBOX")
    seen["exists"] = [int(x.split()[1]) for x in lines if x.endswith(b" EXISTS")]
    lines = c.ok(b"UID FETCH 1:* (FLAGS)")
    flags = [re.search(rb"FLAGS \(([^)]*)\)", x).group(1) for x in lines]  # type: ignore[union-attr]
    seen["flags"] = [sorted(f.split()) for f in flags]
    lines = c.ok(b"UID FETCH 1:* (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS (%s)])" % HEADERS)
    seen["headers"] = [
        sorted(h.split(b": ", 1)[0].lower() for h in re.findall(rb"\r\n([A-Za-z-]+: [^\r]*)", x))
        for x in lines
    ]
    seen["subjects"] = [re.search(rb"Subject: ([^\r]*)", x).group(1) for x in lines]  # type: ignore[union-attr]
    if idle_wake is not None:
        tag = c.tag()
        c.send(tag + b" IDLE\r\n")
        assert c.line().startswith(b"+")
        idle_wake.ok(b"APPEND INBOX " + literal(message("arrived while idle")))
        # Bounded: each line() waits at most the socket's 30 s timeout.
        assert any(c.line().endswith(b" EXISTS") for _ in range(20))
        c.send(b"DONE\r\n")
        lines, done = c.until(tag)
        assert done.split()[1] == b"OK"
        seen["idle"] = True
    return seen


def test_mail_app_first_sync_and_resync(target: Target) -> None:
    """A Thunderbird/K-9 style first sync sees the special-use folders, per-folder counts,
    INBOX's messages with flags and the asked header fields; IDLE is woken by another
    session's APPEND; a resync (new connection) gets the new message and a flag change
    made elsewhere. The same outcome as Dovecot's."""
    user, password = target.new_user()
    target.seed(user, password, [message(f"sync {i}") for i in range(3)])
    c = Raw(target.host, target.port)
    other = Raw(target.second_host, target.port)
    try:
        for x in (c, other):
            x.ok(b'LOGIN "%s" "%s"' % (user.encode(), password.encode()))
        other.ok(b"SELECT INBOX")
        other.ok(b"STORE 2 +FLAGS (\\Seen \\Flagged)")
        seen = first_sync(c, idle_wake=other)
        specials = {n: a for n, (a, _) in seen["folders"].items() if a}  # type: ignore[attr-defined]
        assert specials == {"Sent": {b"\\Sent"}, "Drafts": {b"\\Drafts"}, "Trash": {b"\\Trash"},
                            "Junk": {b"\\Junk"}, "Archive": {b"\\Archive"}}  # fmt: skip
        # The special-use folders are subscribed (Dovecot's auto = subscribe; INBOX is
        # not subscribed there, which a client does not rely on).
        assert all(seen["folders"][n][1] for n in specials)  # type: ignore[index]
        assert seen["status"]["INBOX"] == (3, 2)  # type: ignore[index]
        assert all(seen["status"][n] == (0, 0) for n in specials)  # type: ignore[index]
        assert seen["exists"] == [3]
        assert seen["flags"] == [[], [b"\\Flagged", b"\\Seen"], []]
        assert seen["subjects"] == [b"sync 0", b"sync 1", b"sync 2"]
        assert all(
            h == [b"date", b"from", b"message-id", b"subject", b"to"] for h in seen["headers"]
        )  # type: ignore[attr-defined]
        assert seen["idle"]
        other.ok(b"STORE 1 +FLAGS (\\Answered)")
        c.cmd(b"LOGOUT")
        # Resync: the app knows UIDs up to its last; it asks what is new, then old flags.
        r = Raw(target.host, target.port)
        try:
            r.ok(b'LOGIN "%s" "%s"' % (user.encode(), password.encode()))
            lines = r.ok(b"SELECT INBOX")
            assert [int(x.split()[1]) for x in lines if x.endswith(b" EXISTS")] == [4]
            uids = [
                int(u) for u in re.findall(rb"UID (\d+)", b" ".join(r.ok(b"UID FETCH 1:* (UID)")))
            ]
            new = r.ok(b"UID FETCH %d:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])" % uids[3])
            assert len(new) == 1 and b"arrived while idle" in new[0]
            old = r.ok(b"UID FETCH 1:%d (UID FLAGS)" % uids[2])
            assert [sorted(re.search(rb"FLAGS \(([^)]*)\)", x).group(1).split()) for x in old] == [  # type: ignore[union-attr]
                [b"\\Answered"],
                [b"\\Flagged", b"\\Seen"],
                [],
            ]
        finally:
            r.close()
    finally:
        c.close()
        other.close()


BLOB = bytes(range(256))


def binary_message() -> bytes:
    import base64

    return (
        b"MIME-Version: 1.0\r\nSubject: bin\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe =3D ok\r\n"
        b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(BLOB).replace(b"\n", b"\r\n")
        + b"--b--\r\n"
    )


def test_binary(target: Target) -> None:
    """BINARY (every target advertises it): BINARY[1] undoes quoted-printable, BINARY[2]
    base64, BINARY.SIZE and partials count decoded octets, every value a literal8, as
    Dovecot answers."""
    c, _, _ = login(target)
    try:
        raw = binary_message()
        c.ok(b"APPEND INBOX " + literal(raw))
        c.ok(b"SELECT INBOX")
        assert b"BINARY" in capabilities(c)
        [line] = c.ok(b"FETCH 1 (BINARY.PEEK[1] BINARY.SIZE[2] BINARY.PEEK[2]<1.3>)")
        assert "BINARY[1] ~{12}\r\nGrüße = ok".encode() in line
        assert b"BINARY.SIZE[2] 256" in line
        assert b"BINARY[2]<1> ~{3}\r\n\x01\x02\x03" in line
        [line] = c.ok(b"FETCH 1 (BINARY.PEEK[2])")
        assert b"BINARY[2] ~{256}\r\n" + BLOB in line
    finally:
        c.close()
