"""CONDSTORE and QRESYNC (RFC 7162) against every server target, checked against Dovecot
2.3 (the reference) on the same scripts: a raw-socket QRESYNC resync (VANISHED (EARLIER),
changed FETCHes with MODSEQ, UNCHANGEDSINCE with [MODIFIED], UID FETCH (CHANGEDSINCE
VANISHED), untagged VANISHED, [CLOSED]) and imapclient's CHANGEDSINCE fetch.  On three
Porcupine nodes the mail is spread over the nodes and the second session talks to
another node than the first.

Servers listen on 127.0.143.0/24 (this file's own range); every one is stopped by PID.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from test_imap_extension_targets import Raw

from yimaporc.testing.imap_targets import (
    Target,
    dovecot_target,
    memory_target,
    message,
    porcupine_target,
)

pytestmark = pytest.mark.integration

NET = "127.0.143"


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


def uid_set(text: bytes) -> set[int]:
    out: set[int] = set()
    for item in text.split(b","):
        lo, _, hi = item.partition(b":")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def vanished(lines: list[bytes], earlier: bool) -> set[int]:
    """The UIDs of the VANISHED responses (``earlier``: the (EARLIER) ones) in ``lines``."""
    head = rb"\* VANISHED \(EARLIER\) " if earlier else rb"\* VANISHED (?!\()"
    out: set[int] = set()
    for x in lines:
        m = re.match(head + rb"([\d:,]+)$", x)
        if m:
            out |= uid_set(m.group(1))
    return out


def fetched(lines: list[bytes]) -> dict[int, tuple[list[bytes], int]]:
    """UID -> (sorted flags, MODSEQ) of the FETCH responses in ``lines`` (without
    ``\\Recent``, which Dovecot keeps and we do not: docs/imap.md)."""
    out = {}
    for x in lines:
        if b" FETCH (" not in x:
            continue
        uid = re.search(rb"UID (\d+)", x)
        flags = re.search(rb"FLAGS \(([^)]*)\)", x)
        modseq = re.search(rb"MODSEQ \((\d+)\)", x)
        assert uid and flags and modseq, x
        names = sorted(f for f in flags.group(1).split() if f != b"\\Recent")
        out[int(uid.group(1))] = (names, int(modseq.group(1)))
    return out


def code(lines: list[bytes], name: bytes) -> int:
    [n] = [int(m.group(1)) for x in lines for m in [re.search(rb"\[%s (\d+)\]" % name, x)] if m]
    return n


def login(target: Target, host: str, user: str, password: str) -> Raw:
    c = Raw(host, target.port)
    c.ok(b'LOGIN "%s" "%s"' % (user.encode(), password.encode()))
    return c


def test_qresync_resync(target: Target) -> None:
    """A mobile client comes back with QRESYNC after another session (on another node for
    a cluster) flagged, expunged and stored conditionally: it learns exactly what went
    (not what went before its modseq) and what changed, each with a higher MODSEQ; a
    second session sees the client's expunge as VANISHED; reselecting sends [CLOSED].
    The same outcome as Dovecot's."""
    user, password = target.new_user()
    target.seed(user, password, [message(f"q {i}") for i in range(5)])
    if target.name == "porcupine3":
        assert len(target.holders(user)) > 1  # the mail is on several nodes
    other = login(target, target.second_host, user, password)
    c = login(target, target.host, user, password)
    try:
        other.ok(b"ENABLE QRESYNC")
        other.ok(b"SELECT INBOX")
        u = [int(x) for x in re.findall(rb"UID (\d+)", b" ".join(other.ok(b"UID FETCH 1:* (UID)")))]
        assert len(u) == 5
        other.ok(b"UID STORE %d +FLAGS.SILENT (\\Deleted)" % u[0])
        other.ok(b"UID EXPUNGE %d" % u[0])  # gone before the client's modseq

        assert b"QRESYNC" in b" ".join(c.ok(b"ENABLE QRESYNC"))
        lines = c.ok(b"SELECT INBOX")
        h1, validity = code(lines, b"HIGHESTMODSEQ"), code(lines, b"UIDVALIDITY")
        c.ok(b"UNSELECT")

        other.ok(b"UID STORE %d +FLAGS (\\Flagged)" % u[2])
        other.ok(b"UID STORE %d +FLAGS.SILENT (\\Deleted)" % u[3])
        other.ok(b"UID EXPUNGE %d" % u[3])
        lines, done = other.cmd(
            b"UID STORE %d,%d (UNCHANGEDSINCE %d) +FLAGS (\\Answered)" % (u[2], u[4], h1)
        )
        assert re.search(rb"OK \[MODIFIED %d\]" % u[2], done), done
        assert {k: v[0] for k, v in fetched(lines).items()} == {u[4]: [b"\\Answered"]}

        known = b"%d:%d" % (u[0], u[4])
        lines = c.ok(b"SELECT INBOX (QRESYNC (%d %d %s))" % (validity, h1, known))
        h2 = code(lines, b"HIGHESTMODSEQ")
        assert vanished(lines, True) == {u[3]}
        changed = fetched(lines)
        assert {k: v[0] for k, v in changed.items()} == {
            u[2]: [b"\\Flagged"],
            u[4]: [b"\\Answered"],
        }
        assert h2 > h1 and all(m > h1 for _, m in changed.values())

        [found] = c.ok(b"UID SEARCH MODSEQ %d" % (h1 + 1))
        m = re.match(rb"\* SEARCH ([\d ]*?)(?: \(MODSEQ (\d+)\))?$", found)
        assert m and {int(x) for x in m.group(1).split()} == set(changed), found
        assert int(m.group(2)) == max(v for _, v in changed.values()), found
        lines = c.ok(b"UID FETCH %s (FLAGS) (CHANGEDSINCE %d VANISHED)" % (known, h1))
        assert vanished(lines, True) == {u[3]}
        assert fetched(lines) == changed
        top = max(m for _, m in changed.values())
        assert c.ok(b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % top) == []

        c.ok(b"UID STORE %d +FLAGS.SILENT (\\Deleted)" % u[4])
        assert vanished(c.ok(b"UID EXPUNGE %d" % u[4]), False) == {u[4]}
        lines = other.ok(b"NOOP")
        assert vanished(lines, False) == {u[4]} and not any(b"EXPUNGE" in x for x in lines)
        assert any(b"[CLOSED]" in x for x in c.ok(b"EXAMINE INBOX"))
    finally:
        c.close()
        other.close()


def test_imapclient_changedsince(target: Target) -> None:
    """imapclient: ENABLE CONDSTORE, select_folder(readonly) gives HIGHESTMODSEQ, a fetch
    with CHANGEDSINCE returns just the message another session flagged, with its MODSEQ;
    STATUS HIGHESTMODSEQ has moved past the old value. The same as Dovecot."""
    imapclient = pytest.importorskip("imapclient")
    user, password = target.new_user()
    target.seed(user, password, [message(f"ic {i}") for i in range(3)])
    client = imapclient.IMAPClient(target.host, port=target.port, ssl=False, timeout=30)
    try:
        client.login(user, password)
        assert client.has_capability("CONDSTORE")
        client.enable("CONDSTORE")
        info = client.select_folder("INBOX", readonly=True)
        h1 = info[b"HIGHESTMODSEQ"]
        assert info[b"EXISTS"] == 3 and h1 >= 1
        o = login(target, target.second_host, user, password)
        try:
            o.ok(b"SELECT INBOX")
            o.ok(b"STORE 2 +FLAGS (\\Flagged)")
        finally:
            o.close()
        got = client.fetch([1, 2, 3], ["FLAGS"], modifiers=[f"CHANGEDSINCE {h1}"])
        assert list(got) == [2] and b"\\Flagged" in got[2][b"FLAGS"]
        assert got[2][b"MODSEQ"][0] > h1
        client.unselect_folder()
        assert client.folder_status("INBOX", ["HIGHESTMODSEQ"])[b"HIGHESTMODSEQ"] > h1
    finally:
        client.logout()
