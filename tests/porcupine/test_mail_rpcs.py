"""RPCs a POP3 or IMAP session makes in a cluster: none when the user's mail, home and
manager are on the serving node; one per remote fragment node per command otherwise."""

from __future__ import annotations

import errno
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from test_cluster_sim import DOMAIN, Net, add_user
from twisted.internet.testing import StringTransport

from yimaporc.porcupine.cluster import MbStore
from yimaporc.porcupine.fragments import FragmentStore, MailboxManager
from yimaporc.porcupine.usermap import bucket_of

MB = "porcupine.mb."


@pytest.fixture
def net(tmp_path: Path) -> Net:
    n = Net(tmp_path)
    for i in (1, 2, 3):
        n.add(f"n{i}")
    n.commit(["n1", "n2", "n3"])
    return n


def local_user(net: Net, node: str) -> str:
    """A user whose bucket manager and mailbox home are both ``node``."""
    cluster = net.nodes[node].cluster
    for i in range(10_000):
        user = f"rpc{i}@{DOMAIN}"
        if net.map.owners[bucket_of(user)] == node and cluster.home_of(user) == node:
            return user
    raise AssertionError("no such user")


def pop3(net: Net, node: str, user: str, *commands: bytes) -> list[list[bytes]]:
    """Run a POP3 session at ``node``; each command's reply lines."""
    p = net.nodes[node].mail._pop3_protocol()
    t = StringTransport()
    p.makeConnection(t)
    out = []
    for line in (b"USER " + user.encode(), b"PASS pw", *commands):
        t.clear()
        p.dataReceived(line + b"\r\n")
        net.flush()
        out.append([x for x in t.value().split(b"\r\n") if x])
    return out


class Imap:
    """An IMAP connection to one node, on a memory transport."""

    def __init__(self, net: Net, node: str) -> None:
        self.net = net
        self.p: Any = net.nodes[node].mail._imap_factory(False).buildProtocol(None)
        self.t = StringTransport()
        self.p.makeConnection(self.t)
        self.n = 0

    def __call__(self, line: bytes) -> bytes:
        """Send one command; its tagged reply."""
        self.n += 1
        tag = b"a%d " % self.n
        self.t.clear()
        self.p.dataReceived(tag + line + b"\r\n")
        self.net.flush()
        (done,) = [x for x in self.t.value().split(b"\r\n") if x.startswith(tag)]
        return done


def imap(net: Net, node: str, *commands: bytes) -> list[bytes]:
    """Run IMAP commands at ``node`` on one connection; the tagged reply of each."""
    session = Imap(net, node)
    return [session(c) for c in commands]


def mb_calls(net: Net) -> Counter[str]:
    return Counter({k: v for k, v in net.calls.items() if k.startswith(MB)})


def test_sessions_make_no_rpc_when_everything_is_local(net: Net) -> None:
    """POP3 (login, STAT, LIST, RETR, QUIT) and IMAP (LOGIN, LIST, STATUS, SELECT, FETCH,
    STORE, NOOP) at the node holding the user's mail, home and manager: no RPC at all."""
    user = local_user(net, "n1")
    add_user(net, "n1", user)
    for i in range(3):
        (d,) = net.nodes["n1"].deliver(user, b"Subject: %d\r\n\r\n.dot line %d\r\n" % (i, i))
        assert d.node == "n1"
    net.calls.clear()
    replies = pop3(net, "n1", user, b"STAT", b"LIST", b"RETR 2", b"QUIT")
    assert replies[1][0].startswith(b"+OK") and replies[2][0].startswith(b"+OK 3 ")
    assert replies[4][0].startswith(b"+OK") and b"..dot line 1" in replies[4]
    tagged = imap(
        net,
        "n1",
        b"LOGIN " + user.encode() + b" pw",
        b'LIST "" *',
        b"STATUS INBOX (MESSAGES UNSEEN)",
        b"SELECT INBOX",
        b"FETCH 1:3 (FLAGS BODY.PEEK[])",
        b"STORE 1 +FLAGS (\\Seen)",
        b"NOOP",
        b"LOGOUT",
    )
    assert all(b" OK " in x for x in tagged), tagged
    assert net.calls == Counter(), "no RPC of any kind"


def test_remote_fragment_is_asked_once_per_command(net: Net) -> None:
    """Mail on another node: a POP3 login asks it once (view, was mailboxes + digests),
    RETR 1 once (fetch, reading the next messages ahead) and RETR 2 not at all; an IMAP LOGIN once (mailboxes, special-use folders created
    without asking again per folder), SELECT once (view), STATUS once (view) besides the
    selected mailbox's refresh, a FETCH of several messages once besides that refresh."""
    user = local_user(net, "n1")
    add_user(net, "n1", user)
    net.refuse.add(("n1", MbStore.commandName))  # type: ignore[arg-type]
    for i in range(3):
        (d,) = net.nodes["n2"].deliver(user, b"Subject: %d\r\n\r\nbody\r\n" % i)
        assert d.node != "n1"
    remote = d.node
    net.refuse.clear()
    net.calls.clear()
    pop3(net, "n1", user)
    assert mb_calls(net) == Counter({MB + "view": 1}), "login: one view of the remote node"
    net.calls.clear()
    pop3(net, "n1", user, b"STAT", b"LIST", b"RETR 1", b"RETR 2", b"QUIT")
    assert mb_calls(net) == Counter({MB + "view": 1, MB + "fetch": 1}), "RETR 2 read ahead"
    session = Imap(net, "n1")
    for command, want in (
        (b"LOGIN " + user.encode() + b" pw", {MB + "mailboxes": 1}),
        (b"SELECT INBOX", {MB + "view": 1}),
        # With a mailbox selected, the session's refresh of it (before FETCH, after other
        # commands) asks the node once more (digests): not batched yet.
        (b"STATUS Sent (MESSAGES)", {MB + "view": 1, MB + "digests": 1}),
        (b"FETCH 1:3 (BODY.PEEK[])", {MB + "digests": 1, MB + "fetch": 1}),
        (b"NOOP", {MB + "digests": 1}),
    ):
        net.calls.clear()
        reply = session(command)
        assert b" OK " in reply, (command, reply)
        assert mb_calls(net) == Counter(want), (command, net.calls)
    assert {remote} <= set(net.nodes)


def test_warm_index_serves_listings_without_the_pool(net: Net) -> None:
    """With the user's index warm, IMAP UID FETCH FLAGS, NOOP, STATUS, LIST take no
    thread-pool job at all, and a POP3 session none either (bodies delivered here are in
    the body cache); with that cache cold, its RETRs read the files in one job."""
    user = local_user(net, "n1")
    add_user(net, "n1", user)
    for i in range(3):
        net.nodes["n1"].deliver(user, b"Subject: %d\r\n\r\nbody\r\n" % i)
    pool = net.nodes["n1"].mail.pool
    jobs: list[str] = []
    run = pool.callInThreadWithCallback

    def counted(on_result: Any, f: Any, *a: Any, **kw: Any) -> None:
        jobs.append(getattr(f, "__name__", repr(f)))
        run(on_result, f, *a, **kw)

    pool.callInThreadWithCallback = counted
    session = Imap(net, "n1")
    assert b" OK " in session(b"LOGIN " + user.encode() + b" pw")
    assert b" OK " in session(b"SELECT INBOX")
    jobs.clear()
    for command in (b"UID FETCH 1:* (FLAGS)", b"NOOP", b"STATUS Sent (MESSAGES)", b'LIST "" *'):
        assert b" OK " in session(command), command
    assert jobs == []
    replies = pop3(net, "n1", user, b"STAT", b"LIST")
    assert replies[2][0].startswith(b"+OK 3 ")
    jobs.clear()
    replies = pop3(net, "n1", user, b"STAT", b"LIST", b"RETR 1")
    # the login's own jobs (profile, password) aside: bodies delivered here are in the
    # body cache, so no mail-store job at all
    store_jobs = set(dir(FragmentStore)) | set(dir(MailboxManager))
    assert [j for j in jobs if j in store_jobs] == [], jobs
    net.nodes["n1"].mail.body_cache.forget_user(user)
    jobs.clear()
    replies = pop3(net, "n1", user, b"RETR 1", b"RETR 2", b"RETR 3")
    assert [r[0] for r in replies[2:5]] == [
        b"+OK " + b"%d octets" % (len(b"Subject: %d\r\n\r\nbody\r\n" % i)) for i in range(3)
    ], replies
    # cold: the three files are read in one job (RETR 1 reads ahead), then cached
    assert [j for j in jobs if j in store_jobs] == ["read_bodies"], jobs


def test_view_falls_back_to_two_calls_on_an_older_peer(net: Net) -> None:
    """A peer without porcupine.mb.view (rolling upgrade) answers UnhandledCommand: the
    proxy asks mailboxes and digests instead and gets the same answer (missing mailbox:
    None)."""
    from twisted.internet.defer import fail
    from twisted.protocols import amp

    from yimaporc.porcupine.cluster import MbView, RemoteMailboxManager

    user = local_user(net, "n2")
    add_user(net, "n1", user)
    net.nodes["n2"].deliver(user, b"Subject: x\r\n\r\nbody\r\n")
    asked: list[str] = []

    def call(node: str, command: Any, **kw: Any) -> Any:
        asked.append(command.commandName.decode())
        if command is MbView:
            return fail(amp.UnhandledCommand("porcupine.mb.view"))
        return net.dispatch("n1", node, command, kw)

    old = RemoteMailboxManager("n2", call)
    new = net.nodes["n1"].cluster.mailboxes_for("n2")
    for box in ("INBOX", "Nope"):
        want = net.result_of(new.view(user, box))
        assert net.result_of(old.view(user, box)) == want
    assert want[1] is None and want[0]
    assert asked == [MB + "view", MB + "mailboxes", MB + "digests"] * 2


def test_logins_through_a_proxy_are_remembered_briefly(net: Net) -> None:
    """POP3 logins at a node that is not the user's manager: the first asks the manager
    (authenticate RPC), the next ones within profile_ttl do not; a wrong password, a
    passwd (the new profile reaches the proxy) or the TTL running out ask again, and the
    old password then fails."""
    user = next(
        u
        for u in (f"px{i}@{DOMAIN}" for i in range(10_000))
        if net.map.owners[bucket_of(u)] == "n1"
    )
    add_user(net, "n1", user)
    auth = "porcupine.um.authenticate"
    net.calls.clear()
    for _ in range(3):
        assert pop3(net, "n2", user, b"QUIT")[1][0].startswith(b"+OK")
    assert net.calls[auth] == 1
    p = net.nodes["n2"].mail._pop3_protocol()
    t = StringTransport()
    p.makeConnection(t)
    p.dataReceived(b"USER " + user.encode() + b"\r\nPASS wrong\r\n")
    net.flush()
    assert b"-ERR" in t.value() and net.calls[auth] == 2
    net.clock.advance(10)  # past profile_ttl
    assert pop3(net, "n2", user, b"QUIT")[1][0].startswith(b"+OK")
    assert net.calls[auth] == 3
    net.result_of(net.nodes["n1"].mail.replicator.set_password(user, "new"))
    t = StringTransport()
    p = net.nodes["n2"].mail._pop3_protocol()
    p.makeConnection(t)
    p.dataReceived(b"USER " + user.encode() + b"\r\nPASS pw\r\n")
    net.clock.advance(1)  # the failure throttle answers a second failure late
    assert b"-ERR" in t.value() and net.calls[auth] == 4


@pytest.mark.parametrize(
    "error",
    [
        sqlite3.OperationalError("database or disk is full"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
)
def test_a_full_disk_at_the_users_home_is_unavailable_not_a_server_bug(
    net: Net, error: Exception
) -> None:
    """The user's home node has a full data disk and cannot open the user's index:
    sessions on other nodes get NO [UNAVAILABLE] (the home is out of reach for that
    call) and POP3 -ERR [SYS/TEMP], never NO [SERVERBUG] with an unknown-error
    traceback on both nodes; once there is room again the same session reads the mail."""
    user = local_user(net, "n1")  # its home (where new mail goes) is n1
    add_user(net, "n1", user)
    (d,) = net.nodes["n1"].deliver(user, b"Subject: home\r\n\r\nbody\r\n")
    assert d.node == "n1"
    store = net.nodes["n1"].cluster.storage.fragment_store
    store.index = None  # nothing cached: every listing opens the bucket's index
    full = [True]
    real = store.load_user

    def load_user(u: str) -> Any:
        if full[0]:
            raise error
        return real(u)

    store.load_user = load_user
    session = Imap(net, "n2")
    assert b" OK " in session(b"LOGIN " + user.encode() + b" pw")
    for command in (b'LIST "" *', b"SELECT INBOX", b"STATUS INBOX (MESSAGES)"):
        reply = session(command)
        assert b"NO [UNAVAILABLE]" in reply, (command, reply)
    replies = pop3(net, "n2", user)
    assert replies[-1][0].startswith(b"-ERR [SYS/TEMP]"), replies
    counts = net.nodes["n2"].mail.client_errors.counts
    assert counts["pop3.peer_unavailable"] == 1 and counts["imap.command_refused"] == 3, counts
    full[0] = False
    assert b" OK " in session(b"SELECT INBOX")
    assert b"* 1 EXISTS" in session.t.value()
