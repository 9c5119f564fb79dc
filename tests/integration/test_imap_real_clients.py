"""Real IMAP clients with their default settings (mbsync, offlineimap, mutt, imapclient,
imap-tools, curl) against each server target: the in-memory yimaporc.imap server, one
Porcupine node, a 3-node Porcupine cluster with the user's mail on every node, and Dovecot
(the reference).  One module-scoped server per target; the 3-node and Dovecot targets are
``slow`` (``make test-slow``).  Addresses in 127.0.130.0/24."""

from __future__ import annotations

import imaplib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from yimaporc.testing.certs import client_context, make_cert
from yimaporc.testing.imap_targets import (
    NET,
    SPECIAL,
    Target,
    dovecot_binary,
    dovecot_target,
    memory_target,
    message,
    porcupine_target,
)

pytestmark = pytest.mark.integration


def need(tool: str) -> str:
    """The tool's path; a skip when missing (a failure under CI=true)."""
    path = shutil.which(tool) or (dovecot_binary() if tool == "dovecot" else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} not installed (make install)")
        pytest.skip(f"{tool} not installed (make install)")
    return path


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
        with memory_target() as t:
            yield t
    elif request.param == "dovecot":
        need("dovecot")
        with dovecot_target() as t:
            yield t
    else:
        with porcupine_target(tmp, int(request.param[-1])) as t:
            yield t


# -- reading a server's state ----------------------------------------------------------


def server_state(t: Target, user: str, password: str) -> dict[str, list[tuple[str, set[str]]]]:
    """{mailbox: sorted [(subject, flags)]} over every mailbox, read with imaplib."""
    m = t.imap(user, password)
    out: dict[str, list[tuple[str, set[str]]]] = {}
    try:
        typ, boxes = m.list()
        assert typ == "OK", boxes
        for line in boxes:
            if isinstance(line, tuple):  # a name sent as a literal
                line = line[0].rsplit(b" ", 1)[0] + b' "' + line[1] + b'"'
            listed = re.fullmatch(rb'\(([^)]*)\) (?:NIL|"[^"]*") "?(.*?)"?', line)
            assert listed is not None, line
            if b"\\Noselect" in listed.group(1) or b"\\NonExistent" in listed.group(1):
                continue
            name = listed.group(2).replace(b'\\"', b'"').decode()
            quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
            typ, data = m.select(quoted, readonly=True)
            assert typ == "OK", (name, data)
            rows = []
            if int(data[0] or 0):  # type: ignore[arg-type]
                typ, data = m.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
                assert typ == "OK", data
                for item in data:
                    if not isinstance(item, tuple):
                        continue
                    flags = set(re.findall(r"\\?[A-Za-z$]+", _flags(item[0])))
                    flags.discard("\\Recent")
                    subject = item[1].decode().partition(":")[2].strip()
                    rows.append((subject, flags))
            out[name] = sorted(rows, key=lambda r: r[0])
    finally:
        m.logout()
    return out


def _flags(head: bytes) -> str:
    found = re.search(rb"FLAGS \(([^)]*)\)", head)
    return found.group(1).decode() if found else ""


def subjects(state: dict[str, list[tuple[str, set[str]]]], box: str) -> list[str]:
    """Subjects in ``box`` (sorted, duplicates kept)."""
    return [s for s, _ in state.get(box, [])]


def flags_of(state: dict[str, list[tuple[str, set[str]]]], box: str, subject: str) -> set[str]:
    """Flags of the message with ``subject`` in ``box``."""
    return next(f for s, f in state[box] if s == subject)


# -- maildir helpers -------------------------------------------------------------------


def maildir(root: Path, box: str) -> dict[str, str]:
    """{subject: maildir info flags} of one local maildir folder."""
    out: dict[str, str] = {}
    for sub in ("cur", "new"):
        d = root / box / sub
        if not d.is_dir():
            continue
        for f in d.iterdir():
            head = f.read_bytes().split(b"\r\n\r\n")[0].split(b"\n\n")[0]
            subj = re.search(rb"(?mi)^Subject: *(.*?)\r?$", head)
            assert subj is not None, f
            key = subj.group(1).decode()
            assert key not in out, f"duplicate {key} in {box}"
            out[key] = f.name.rpartition(":2,")[2] if ":2," in f.name else ""
    return out


def local_mark(root: Path, box: str, subject: str, flags: str) -> None:
    """Set the maildir flags of the message with ``subject`` (moving it to cur/)."""
    for sub in ("cur", "new"):
        for f in (root / box / sub).iterdir():
            if re.search(rb"(?m)^Subject: " + subject.encode() + rb"\r?$", f.read_bytes()):
                base = f.name.partition(":2,")[0]
                f.rename(root / box / "cur" / f"{base}:2,{flags}")
                return
    raise AssertionError(f"{subject} not in {box}")


def local_new(root: Path, box: str, raw: bytes, name: str) -> None:
    """Deliver ``raw`` into a local maildir folder (creating it)."""
    for sub in ("cur", "new", "tmp"):
        (root / box / sub).mkdir(parents=True, exist_ok=True)
    (root / box / "new" / f"{name}.local").write_bytes(raw)


def run(argv: list[str], cwd: Path, timeout: float = 120) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (argv, done.returncode, done.stdout[-3000:], done.stderr[-3000:])
    return done.stdout + done.stderr


def server_change(t: Target, user: str, password: str) -> None:
    """The server side of a two-way sync round: flag 'one', expunge 'three', add 'five'."""
    m = t.imap(user, password)
    try:
        m.select("INBOX")
        typ, data = m.search(None, "SUBJECT", '"one"')
        assert typ == "OK" and data[0], data
        m.store(data[0].decode(), "+FLAGS", "(\\Flagged)")
        typ, data = m.search(None, "SUBJECT", '"three"')
        assert typ == "OK" and data[0], data
        m.store(data[0].decode(), "+FLAGS", "(\\Deleted)")
        m.expunge()
        typ, data = m.append("INBOX", None, None, message("five"))
        assert typ == "OK", data
    finally:
        m.logout()


def seed_sync_user(t: Target) -> tuple[str, str]:
    """A fresh user with one, two, three in INBOX, four in a folder Work and eight in
    Entw&APw-rfe (a non-ASCII name)."""
    user, password = t.new_user()
    t.seed(user, password, [message("one"), message("two"), message("three")])
    m = t.imap(user, password)
    try:
        assert m.create("Work")[0] == "OK"
    finally:
        m.logout()
    t.seed(user, password, [message("four")], box="Work")
    m = t.imap(user, password)
    try:
        assert m.create('"Entw&APw-rfe"')[0] == "OK"  # "Entwürfe" in modified UTF-7
    finally:
        m.logout()
    t.seed(user, password, [message("eight")], box="Entw&APw-rfe")
    if t.name == "porcupine3":
        assert len(t.holders(user)) >= 2, t.holders(user)  # mail on several nodes
    return user, password


def check_two_way(
    state: dict[str, list[tuple[str, set[str]]]], local: Path, inbox: str, sep: str = "/"
) -> None:
    """After a round of changes on both sides, both sides agree, nothing lost or doubled."""
    assert subjects(state, "INBOX") == ["five", "one", "six", "sixb", "two"], state
    assert "\\Flagged" in flags_of(state, "INBOX", "one")
    assert "\\Seen" in flags_of(state, "INBOX", "two")
    assert "\\Flagged" in flags_of(state, "INBOX", "two")
    assert subjects(state, "Work") == [], state
    assert subjects(state, "Local") == ["seven"], state
    assert subjects(state, "Entw&APw-rfe") == ["eight"], state
    near = maildir(local, inbox)
    assert sorted(near) == ["five", "one", "six", "sixb", "two"], near
    assert "F" in near["one"] and "S" in near["two"] and "F" in near["two"]
    assert maildir(local, "Work") == {}
    assert list(maildir(local, "Local")) == ["seven"]
    assert list(maildir(local, "Entw&APw-rfe")) == ["eight"]


def local_change(local: Path, inbox: str) -> None:
    """The client side of a two-way sync round: flag+read 'two', delete 'four' from Work,
    write 'six' and 'sixb' (150 KB each) to INBOX and 'seven' to a new folder Local."""
    local_mark(local, inbox, "two", "FS")
    for sub in ("cur", "new"):
        for f in (local / "Work" / sub).iterdir():
            f.unlink()
    # Two pushes over 64 KiB: pipelined synchronising literals after a big one.
    local_new(local, inbox, message("six", "6" * 76 * 2000), "six")
    local_new(local, inbox, message("sixb", "b" * 76 * 2000), "sixb")
    local_new(local, "Local", message("seven"), "seven")


# -- mbsync ----------------------------------------------------------------------------

MBSYNC_RC = """\
IMAPAccount t
Host {host}
Port {port}
User {user}
Pass {password}
SSLType None

IMAPStore remote
Account t

MaildirStore local
Path {local}/
Inbox {local}/INBOX
SubFolders Verbatim

Channel c
Far :remote:
Near :local:
Patterns *
Create Both
Expunge Both
SyncState *
"""


def test_mbsync_two_way(target: Target, tmp_path: Path) -> None:
    """mbsync (default pipelining): pull, then flags, deletions, new messages and a new
    folder both ways, then a third run changes nothing; nothing lost or duplicated."""
    mbsync = need("mbsync")
    user, password = seed_sync_user(target)
    local = tmp_path / "mail"
    local.mkdir()
    rc = tmp_path / "mbsyncrc"
    rc.write_text(MBSYNC_RC.format(host=target.host, port=target.port, user=user,
                                   password=password, local=local))  # fmt: skip
    run([mbsync, "-c", str(rc), "-a"], tmp_path)
    assert sorted(maildir(local, "INBOX")) == ["one", "three", "two"]
    assert list(maildir(local, "Work")) == ["four"]
    assert all((local / box).is_dir() for box in SPECIAL)
    server_change(target, user, password)
    local_change(local, "INBOX")
    run([mbsync, "-c", str(rc), "-a"], tmp_path)
    state = server_state(target, user, password)
    check_two_way(state, local, "INBOX")
    run([mbsync, "-c", str(rc), "-a"], tmp_path)
    assert server_state(target, user, password) == state
    check_two_way(state, local, "INBOX")


def test_mbsync_default_starttls(tmp_path: Path) -> None:
    """mbsync with no SSLType (its default: STARTTLS, certificate checked) against the
    shell with a certificate: it upgrades, logs in under TLS and pulls; a plaintext
    LOGIN first is NO [PRIVACYREQUIRED]."""
    mbsync = need("mbsync")
    cert, key = make_cert(tmp_path)
    with memory_target(f"{NET}.4", tls=(cert, key)) as t:
        user, password = t.new_user()
        m = imaplib.IMAP4(t.host, t.port, timeout=30)
        assert "LOGINDISABLED" in m.capabilities
        with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
            m.login(user, password)
        m.starttls(ssl_context=client_context())
        m.login(user, password)
        assert m.append("INBOX", None, None, message("over tls"))[0] == "OK"
        m.logout()
        local = tmp_path / "mail"
        local.mkdir()
        rc = tmp_path / "mbsyncrc"
        config = MBSYNC_RC.format(host=t.host, port=t.port, user=user, password=password,
                                  local=local)  # fmt: skip
        rc.write_text(config.replace("SSLType None\n", f"CertificateFile {cert}\n"))
        out = run([mbsync, "-V", "-c", str(rc), "-a"], tmp_path)
        assert list(maildir(local, "INBOX")) == ["over tls"], out


# -- offlineimap -----------------------------------------------------------------------

OFFLINEIMAP_RC = """\
[general]
accounts = t
metadata = {meta}

[Account t]
localrepository = local
remoterepository = remote

[Repository local]
type = Maildir
localfolders = {local}

[Repository remote]
type = IMAP
remotehost = {host}
remoteport = {port}
remoteuser = {user}
remotepass = {password}
ssl = no
starttls = no
"""


def test_offlineimap_two_way(target: Target, tmp_path: Path) -> None:
    """offlineimap: pull, then flags, deletions, new messages and a new folder both ways
    (pushed messages found again by UIDPLUS), then a third run changes nothing."""
    offlineimap = need("offlineimap")
    user, password = seed_sync_user(target)
    local = tmp_path / "mail"
    local.mkdir()
    rc = tmp_path / "offlineimaprc"
    rc.write_text(OFFLINEIMAP_RC.format(host=target.host, port=target.port, user=user,
                                        password=password, local=local, meta=tmp_path / "meta"))  # fmt: skip
    argv = [offlineimap, "-c", str(rc), "-o", "-u", "basic"]
    run(argv, tmp_path)
    assert sorted(maildir(local, "INBOX")) == ["one", "three", "two"]
    assert list(maildir(local, "Work")) == ["four"]
    server_change(target, user, password)
    local_change(local, "INBOX")
    run(argv, tmp_path)
    state = server_state(target, user, password)
    check_two_way(state, local, "INBOX")
    run(argv, tmp_path)
    assert server_state(target, user, password) == state
    check_two_way(state, local, "INBOX")


# -- mutt ------------------------------------------------------------------------------

MUTTRC = """\
set folder="imap://{host}:{port}/"
set spoolfile="+INBOX"
set imap_user="{user}"
set imap_pass="{password}"
set ssl_starttls=no
set ssl_force_tls=no
set record=""
"""


def dated(subject: str, body: str, hour: int) -> bytes:
    """A message with its own Date (mutt sorts its index by date)."""
    return (
        f"From: Sender <sender@example.net>\r\nTo: someone@example.org\r\nSubject: {subject}\r\n"
        f"Date: Sat, 05 Dec 2026 {hour:02d}:00:00 +0000\r\n"
        f"Message-ID: <{subject.replace(' ', '')}.{os.getpid()}@example.net>\r\n\r\n{body}\r\n"
    ).encode()


def test_mutt_read_flag_copy_delete(target: Target, tmp_path: Path) -> None:
    """mutt (through a pty): open INBOX, read a message (marks it seen), copy it to
    Archive, flag it, delete another and sync ($), quit; the server shows all of it."""
    mutt = need("mutt")
    pexpect = pytest.importorskip("pexpect")
    user, password = target.new_user()
    target.seed(user, password, [dated("Mutt alpha", "alpha-body-text", 10),
                                 dated("Mutt beta", "beta-body-text", 11)])  # fmt: skip
    rc = tmp_path / "muttrc"
    rc.write_text(MUTTRC.format(host=target.host, port=target.port, user=user, password=password))
    env = {**os.environ, "HOME": str(tmp_path), "TERM": "vt100"}
    c = pexpect.spawn(mutt, ["-n", "-F", str(rc)], env=env, dimensions=(30, 160), timeout=30,
                      encoding="utf-8", codec_errors="replace")  # fmt: skip
    try:
        c.expect("Mutt beta")
        c.send("1\r\r")  # jump to message 1, open it
        c.expect("alpha-body-text")
        c.send("q")  # back to the index
        c.send("C")
        c.expect("Copy to mailbox")
        c.send("\x15=Archive\r")  # ^U clears the suggested name
        c.expect("Append")
        c.send("y")
        c.send("1\rF")  # flag message 1
        c.send("2\rd$")  # delete message 2, sync
        c.expect("Purge")
        c.send("y")
        c.send("q")
        c.expect(pexpect.EOF)
    finally:
        c.close(force=True)
    state = server_state(target, user, password)
    assert state["INBOX"] == [("Mutt alpha", {"\\Seen", "\\Flagged"})], state
    assert subjects(state, "Archive") == ["Mutt alpha"], state
    assert "\\Seen" in flags_of(state, "Archive", "Mutt alpha")


# -- two sessions watching each other --------------------------------------------------


def fetched_flags(response: tuple[Any, ...]) -> tuple[bytes, ...]:
    """FLAGS of an untagged FETCH as imapclient's noop()/idle_check() return it."""
    items = response[2]
    pairs = dict(zip(items[::2], items[1::2], strict=True))
    return tuple(pairs[b"FLAGS"])


def test_two_sessions_see_each_others_changes(target: Target) -> None:
    """imapclient: a selected session sees another session's (on another node of a
    cluster) flag change, expunge and append on NOOP (FETCH FLAGS, EXPUNGE, EXISTS),
    then a flag change while in IDLE."""
    imapclient = pytest.importorskip("imapclient")
    user, password = target.new_user()
    target.seed(user, password, [message("w1"), message("w2"), message("w3")])

    def connect(host: str) -> Any:
        c = imapclient.IMAPClient(host, port=target.port, ssl=False, timeout=30)
        c.login(user, password)
        return c

    a, b = connect(target.host), connect(target.second_host)  # two nodes of a cluster
    try:
        assert a.select_folder("INBOX")[b"EXISTS"] == 3
        b.select_folder("INBOX")
        uids = b.search(["ALL"])
        b.add_flags(uids[0], [imapclient.FLAGGED])
        b.delete_messages(uids[1])
        b.expunge()
        b.append("INBOX", message("w4"))
        responses = a.noop()[1]
        assert (2, b"EXPUNGE") in responses, responses
        assert (3, b"EXISTS") in responses, responses
        flagged = [fetched_flags(r) for r in responses if r[1] == b"FETCH" and r[0] == 1]
        assert flagged and b"\\Flagged" in flagged[-1], responses
        a.idle()
        b.add_flags(uids[2], [b"$Work"])
        seen = a.idle_check(timeout=20)
        deadline = 5
        while not any(r[1] == b"FETCH" for r in seen) and deadline:
            seen += a.idle_check(timeout=5)
            deadline -= 1
        a.idle_done()
        fetched = [r for r in seen if r[1] == b"FETCH"]
        assert fetched and fetched[-1][0] == 2, seen
        assert b"$Work" in fetched_flags(fetched[-1]), seen
    finally:
        a.logout()
        b.logout()


# -- imapclient, imap-tools, curl ------------------------------------------------------


def test_imapclient_session(target: Target) -> None:
    """imapclient: capabilities, folders with special use, ENVELOPE and body, SEARCH
    with a UTF-8 literal term, append, move, ID/NAMESPACE/ENABLE, STATUS."""
    imapclient = pytest.importorskip("imapclient")
    user, password = target.new_user()
    target.seed(user, password, [message("hello", "hello wörld")])
    c = imapclient.IMAPClient(target.host, port=target.port, ssl=False, timeout=30)
    c.login(user, password)
    try:
        assert c.has_capability("UIDPLUS") and c.has_capability("MOVE")
        folders = {name: flags for flags, _delim, name in c.list_folders()}
        assert b"\\Trash" in folders["Trash"] and "INBOX" in folders
        assert c.find_special_folder(imapclient.imapclient.SENT) == "Sent"
        c.id_({"name": "test"})
        assert c.namespace().personal[0][0] == ""
        enabled = c.enable("CONDSTORE")
        assert enabled == ([b"CONDSTORE"] if c.has_capability("CONDSTORE") else []), enabled
        info = c.select_folder("INBOX")
        assert info[b"EXISTS"] == 1
        [uid] = c.search(["ALL"])
        data = c.fetch([uid], ["ENVELOPE", "FLAGS", "BODY.PEEK[]", "RFC822.SIZE"])
        assert data[uid][b"ENVELOPE"].subject == b"hello"
        assert data[uid][b"BODY[]"].endswith("hello wörld\r\n".encode())
        assert data[uid][b"RFC822.SIZE"] == len(data[uid][b"BODY[]"])
        assert c.search(["NOT", "SEEN"]) == [uid]
        # A non-ASCII search term goes as a literal after CHARSET UTF-8.
        assert c.search(["OR", "SUBJECT", "grüße", "BODY", "wörld"], charset="UTF-8") == [uid]
        assert c.search(["BODY", "wörlds"], charset="UTF-8") == []
        c.append("INBOX", message("second"), flags=[b"$Label"])
        status = c.folder_status("INBOX", ["MESSAGES", "UIDNEXT"])
        assert status[b"MESSAGES"] == 2 and status[b"UIDNEXT"] > uid + 1
        second = max(c.search(["ALL"]))
        c.move([second], "Archive")
        assert c.search(["ALL"]) == [uid]
        assert c.folder_status("Archive", ["MESSAGES"])[b"MESSAGES"] == 1
    finally:
        c.logout()


def test_imap_tools_session(target: Target) -> None:
    """imap-tools: fetch messages, flag, create and list folders, status, move."""
    imap_tools = pytest.importorskip("imap_tools")
    user, password = target.new_user()
    target.seed(user, password, [message("hello", "hello world")])
    with imap_tools.MailBoxUnencrypted(target.host, port=target.port).login(user, password) as mb:
        msgs = list(mb.fetch(mark_seen=False))
        assert [m.subject for m in msgs] == ["hello"]
        assert msgs[0].from_ == "sender@example.net" and msgs[0].text.strip() == "hello world"
        mb.flag(msgs[0].uid, imap_tools.MailMessageFlags.FLAGGED, True)
        assert "\\Flagged" in next(iter(mb.fetch(headers_only=True))).flags
        mb.folder.create("Projects/2026")
        assert "Projects/2026" in [f.name for f in mb.folder.list()]
        assert mb.folder.status("INBOX")["MESSAGES"] == 1
        mb.move(msgs[0].uid, "Projects/2026")
        mb.folder.set("Projects/2026")
        assert [m.subject for m in mb.fetch()] == ["hello"]


def test_curl_session(target: Target, tmp_path: Path) -> None:
    """curl: list mailboxes, fetch a message by UID, search, and upload (APPEND)."""
    curl_bin = need("curl")
    user, password = target.new_user()
    target.seed(user, password, [message("hello", "hello world")])
    url = f"imap://{target.host}:{target.port}"

    def curl(*args: str) -> str:
        done = subprocess.run(
            [curl_bin, "-sS", "--max-time", "30", "--user", f"{user}:{password}", *args],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        return done.stdout

    listing = curl(f"{url}/")
    assert "INBOX" in listing and "\\Sent" in listing
    found = curl(f"{url}/INBOX", "-X", "SEARCH SUBJECT hello").split()
    assert found[:2] == ["*", "SEARCH"] and len(found) == 3, found
    assert curl(f"{url}/INBOX;UID={found[2]}").endswith("hello world\n")
    upload = tmp_path / "m.eml"
    upload.write_bytes(message("via curl", "uploaded"))
    curl("-T", str(upload), f"{url}/Drafts")
    assert subjects(server_state(target, user, password), "Drafts") == ["via curl"]
