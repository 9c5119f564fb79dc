"""Real IMAP clients with their default settings (mbsync, offlineimap, mutt, imapclient,
imap-tools, curl) against each server target: the in-memory yimaporc.imap server, one
Porcupine node, a 3-node Porcupine cluster with the user's mail on every node, and Dovecot
(the reference).  One module-scoped server per target; the 3-node and Dovecot targets are
``slow`` (``make test-slow``).  Addresses in 127.0.130.0/24."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from yimaporc.testing.imap_targets import (
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
            assert isinstance(line, bytes)
            name = line.rsplit(b" ", 1)[1].strip(b'"').decode()
            typ, data = m.select(f'"{name}"', readonly=True)
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
    return [s for s, _ in state.get(box, [])]


def flags_of(state: dict[str, list[tuple[str, set[str]]]], box: str, subject: str) -> set[str]:
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
    """A fresh user with one, two, three in INBOX and four in a folder Work."""
    user, password = t.new_user()
    t.seed(user, password, [message("one"), message("two"), message("three")])
    m = t.imap(user, password)
    try:
        assert m.create("Work")[0] == "OK"
    finally:
        m.logout()
    t.seed(user, password, [message("four")], box="Work")
    return user, password


def check_two_way(
    state: dict[str, list[tuple[str, set[str]]]], local: Path, inbox: str, sep: str = "/"
) -> None:
    """After a round of changes on both sides, both sides agree, nothing lost or doubled."""
    assert subjects(state, "INBOX") == ["five", "one", "six", "two"], state
    assert "\\Flagged" in flags_of(state, "INBOX", "one")
    assert "\\Seen" in flags_of(state, "INBOX", "two")
    assert "\\Flagged" in flags_of(state, "INBOX", "two")
    assert subjects(state, "Work") == [], state
    assert subjects(state, "Local") == ["seven"], state
    near = maildir(local, inbox)
    assert sorted(near) == ["five", "one", "six", "two"], near
    assert "F" in near["one"] and "S" in near["two"] and "F" in near["two"]
    assert maildir(local, "Work") == {}
    assert list(maildir(local, "Local")) == ["seven"]


def local_change(local: Path, inbox: str) -> None:
    """The client side of a two-way sync round: flag+read 'two', delete 'four' from Work,
    write 'six' to INBOX and 'seven' to a new folder Local."""
    local_mark(local, inbox, "two", "FS")
    for sub in ("cur", "new"):
        for f in (local / "Work" / sub).iterdir():
            f.unlink()
    local_new(local, inbox, message("six"), "six")
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
