"""The mail workers' channel (``--mail-workers``) over memory transports: the token
handshake, garbage on the socket, the main's answers (routed by user and by node),
change notices both ways, and the main's watch over its children."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient

from yimaporc.cluster.rpc import AuthFailed, PeerUnavailable
from yimaporc.porcupine._mailworker_proc import MailWorker, WorkerChannel
from yimaporc.porcupine._mailworkers import MailWorkers, _ChannelFactory
from yimaporc.porcupine.throttle import ThrottlePolicy
from yimaporc.porcupine.values import (
    INBOX,
    BadCredentials,
    Digest,
    MailboxInfo,
    NoSuchMailbox,
    Profile,
)

TOKEN = b"t" * 32


def result_of(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def failure_of(d: Deferred[Any]) -> Failure:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out and isinstance(out[0], Failure), out
    return out[0]


class FakeUsers:
    """A user manager: one password, calls recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def authenticate(self, address: str, password: str) -> Deferred[Profile]:
        self.calls.append(("authenticate", address))
        if password != "pw":
            return fail(BadCredentials("bad user name or password"))
        return succeed(Profile(address, "hash", 1, 0.0))

    def profile(self, address: str) -> Deferred[Profile]:
        return succeed(Profile(address, "hash", 1, 0.0))

    def fragments(self, address: str) -> Deferred[tuple[str, ...]]:
        self.calls.append(("fragments", address))
        return succeed(("n1",))

    def away_of(self, address: str) -> tuple[str, ...]:
        return ()

    def certain(self, address: str) -> bool:
        return True

    def horizon_of(self, address: str) -> None:
        return None


class FakeBoxes:
    """A mailbox manager with INBOX holding one message."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.calls: list[str] = []

    def view(self, user: str, mailbox: str) -> Deferred[Any]:
        self.calls.append(f"view {user} {mailbox}")
        if mailbox != INBOX:
            return fail(NoSuchMailbox(f"no mailbox {mailbox}"))
        infos = [MailboxInfo(INBOX, 7, 2, 1, 1)]
        return succeed((infos, [Digest(1, "k1", 4, (), 0.0, self.node)]))

    def fetch(self, user: str, mailbox: str, uids: list[int]) -> Deferred[dict[int, bytes]]:
        return succeed({u: b"body" for u in uids})


class DownBoxes:
    """Another node's manager, out of reach."""

    def view(self, user: str, mailbox: str) -> Deferred[Any]:
        return fail(PeerUnavailable("n2: connection refused"))


class FakeTopology:
    def __init__(self) -> None:
        self.users = FakeUsers()
        self.boxes: dict[str, Any] = {"n1": FakeBoxes("n1"), "n2": DownBoxes()}

    def users_for(self, address: str) -> FakeUsers:
        return self.users

    def mailboxes_for(self, node: str) -> Any:
        return self.boxes[node]

    def live(self) -> list[str]:
        return ["n1", "n2"]

    def known_nodes(self) -> set[str]:
        return {"n1", "n2"}


class Recorder:
    """The main's mailbox registry: records the notices."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, str]] = []

    def changed(self, user: str, mailbox: str) -> None:
        self.changes.append((user, mailbox))


class FakeLocal:
    def shown(self, user: str, marks: dict[str, tuple[int, int]]) -> Deferred[dict[str, int]]:
        return succeed({k: v[1] for k, v in marks.items()})


def make_hub(tmp_path: Path, clock: Clock, count: int = 2) -> MailWorkers:
    mail = SimpleNamespace(
        node_id="n1",
        data_dir=tmp_path,
        retrieval=SimpleNamespace(local=FakeLocal()),
        registry=Recorder(),
    )
    return MailWorkers(clock, mail, FakeTopology(), count, token=TOKEN)  # type: ignore[arg-type]


def worker_config(index: int = 0) -> dict[str, Any]:
    return {
        "index": index,
        "node_id": "n1",
        "socket": "",
        "listeners": {},
        "domain": "example.org",
        "other_domains": [],
        "hostname": "n1.example.org",
        "max_message_size": 1 << 20,
        "tls": None,
        "allow_plaintext_auth": False,
        "auth_throttle": attrs.asdict(ThrottlePolicy()),
        "replication": False,
    }


def connect(hub: MailWorkers, clock: Clock, token: bytes = TOKEN, index: int = 0) -> Any:
    """A worker joined to ``hub`` over a memory transport: (worker, server, pump, d)."""
    worker = MailWorker(clock, worker_config(index), token)
    worker.exits = 0  # type: ignore[attr-defined]

    def exit_() -> None:
        worker.exits += 1  # type: ignore[attr-defined]

    worker.on_exit = exit_
    server_factory = _ChannelFactory(hub)
    client, server, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: WorkerChannel(worker)
    )
    worker.proto = client
    d = client.authenticate()

    def proven(p: Any) -> Any:
        p.authenticated = True
        return p

    d.addCallback(proven)
    pump.flush()
    clock.advance(0)
    pump.flush()
    return worker, server, pump, d


def test_the_token_admits_a_worker_and_it_gets_the_live_members(tmp_path: Path) -> None:
    """A worker proving the main's token joins (live 1) and is sent the live members,
    on which it starts serving."""
    clock = Clock()
    hub = make_hub(tmp_path, clock)
    worker, _server, _pump, d = connect(hub, clock)
    result_of(d)
    assert hub.live() == 1
    assert worker.front.live == ["n1", "n2"]
    assert worker.front.home_of("alice@example.org") in ("n1", "n2")


def test_a_wrong_token_is_refused_and_counted(tmp_path: Path) -> None:
    """A process without the token gets no answer: the handshake fails, nothing joins,
    ``refused_bad_proof`` counts it."""
    clock = Clock()
    hub = make_hub(tmp_path, clock)
    _worker, _server, _pump, d = connect(hub, clock, token=b"x" * 32)
    failure_of(d).trap(AuthFailed)  # the main's proof does not match its token either
    assert hub.live() == 0
    clock.advance(hub.guard.limits.handshake_timeout + 1)
    assert hub.guard.stats["dropped_handshake_timeout"] == 1
    assert hub.live() == 0


def test_garbage_on_the_socket_is_a_counter_not_a_crash(tmp_path: Path) -> None:
    """A text line on the channel before the handshake drops that connection and is
    counted; the hub is unharmed (the next worker still joins)."""
    clock = Clock()
    hub = make_hub(tmp_path, clock)
    proto = _ChannelFactory(hub).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n" * 50)
    assert any(k.startswith("dropped_") for k in hub.guard.stats), hub.guard.stats
    assert hub.live() == 0
    _worker, _server, _pump, d = connect(hub, clock)
    result_of(d)
    assert hub.live() == 1


def test_a_worker_login_and_listing_go_to_the_managers(tmp_path: Path) -> None:
    """authenticate reaches the user's manager through the main (a wrong password is
    BadCredentials at the worker); a mailbox command reaches the node it names: the
    main's own manager, another node's failure as PeerUnavailable (the channel stays);
    an unknown node is refused and counted."""
    clock = Clock()
    hub = make_hub(tmp_path, clock)
    worker, _server, pump, _d = connect(hub, clock)
    front = worker.front

    got = front.retrieval.authenticate("alice@example.org", "pw")
    pump.flush()
    assert result_of(got).address == "alice@example.org"
    bad = front.retrieval.authenticate("alice@example.org", "nope")
    pump.flush()
    failure_of(bad).trap(BadCredentials)
    assert [c for c in hub.topology.users.calls if c[0] == "authenticate"] == [  # type: ignore[attr-defined]
        ("authenticate", "alice@example.org"),
        ("authenticate", "alice@example.org"),
    ]

    view = front.mailboxes_for("n1").view("alice@example.org", INBOX)
    pump.flush()
    infos, digests = result_of(view)
    assert infos[0].uidvalidity == 7 and [x.uid for x in digests] == [1]
    missing = front.mailboxes_for("n1").view("alice@example.org", "Nope")
    pump.flush()
    failure_of(missing).trap(NoSuchMailbox)
    body = front.mailboxes_for("n1").fetch("alice@example.org", INBOX, [1])
    pump.flush()
    assert result_of(body) == {1: b"body"}

    down = front.mailboxes_for("n2").view("alice@example.org", INBOX)
    pump.flush()
    failure_of(down).trap(PeerUnavailable)
    unknown = front.mailboxes_for("n9").view("alice@example.org", INBOX)
    pump.flush()
    failure_of(unknown).trap(amp.UnhandledCommand, amp.UnknownRemoteError)
    assert hub.guard.stats["refused_unknown_node"] >= 1  # view, then its older pair
    assert hub.live() == 1  # still connected after all of these
    again = front.mailboxes_for("n1").view("alice@example.org", INBOX)
    pump.flush()
    assert result_of(again)[0][0].name == INBOX


def test_a_pop3_login_opens_the_inbox_through_the_main(tmp_path: Path) -> None:
    """The worker's portal (POP3 avatar) opens INBOX with the main's listing."""
    from twisted.cred.credentials import UsernamePassword
    from twisted.mail import pop3

    clock = Clock()
    hub = make_hub(tmp_path, clock)
    worker, _server, pump, _d = connect(hub, clock)
    login = worker.front.portal.login(UsernamePassword(b"alice", b"pw"), None, pop3.IMailbox)
    for _ in range(5):
        pump.flush()
        clock.advance(0)
    iface, box, _ = result_of(login)
    assert iface is pop3.IMailbox
    assert box.listMessages() == [4]


class FakeBox:
    def __init__(self) -> None:
        self.woken = 0
        self.mail = SimpleNamespace(address="alice@example.org")
        self.name = INBOX

    def changed(self) -> None:
        self.woken += 1


def test_change_notices_reach_the_other_workers(tmp_path: Path) -> None:
    """A change a worker's session makes wakes the main's sessions and the other
    workers' (not via itself twice); an arrival at the main wakes every worker's."""
    clock = Clock()
    hub = make_hub(tmp_path, clock)
    a, _, pump_a, _ = connect(hub, clock, index=0)
    b, _, pump_b, _ = connect(hub, clock, index=1)
    box_a, box_b = FakeBox(), FakeBox()
    a.front.registry.open(box_a)  # type: ignore[arg-type]
    b.front.registry.open(box_b)  # type: ignore[arg-type]

    a.front.registry.changed("alice@example.org", INBOX)
    for _ in range(3):
        pump_a.flush()
        pump_b.flush()
    assert hub.mail.registry.changes == [("alice@example.org", INBOX)]  # type: ignore[attr-defined]
    assert box_b.woken == 1
    assert box_a.woken >= 1

    hub._arrived("alice@example.org", INBOX)
    for _ in range(3):
        pump_a.flush()
        pump_b.flush()
    assert box_b.woken == 2


class FakePort:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.reading = True
        self.addressFamily = 2

    def fileno(self) -> int:
        return self.fd

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class SpawningClock(Clock):
    """A clock that records spawnProcess and listenUNIX."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, dict[str, str], dict[int, Any]]] = []
        self.listening: list[str] = []

    def spawnProcess(self, proto: Any, exe: str, argv: list[str], env: Any, childFDs: Any) -> Any:
        proto.transport = SimpleNamespace(pid=1000 + len(self.spawned))
        proto.connectionMade()
        self.spawned.append((proto, env, childFDs))
        return proto.transport

    def listenUNIX(self, path: str, factory: Any, mode: int) -> Any:
        Path(path).touch()
        self.listening.append(path)
        return SimpleNamespace(stopListening=lambda: None)


def test_the_main_watches_its_workers(tmp_path: Path) -> None:
    """Workers are spawned with the listening sockets and the token; while one is live
    the main does not accept; a death is counted, the main accepts again with none
    live, and a replacement starts after the backoff (restarts counted)."""
    from yimaporc.porcupine._mailworkers import BACKOFF, CONFIG_ENV, SOCKET_NAME
    from yimaporc.porcupine._mailworkers_wire import TOKEN_ENV

    clock = SpawningClock()
    hub = make_hub(tmp_path, clock, count=2)
    ports = {"pop3": FakePort(11), "imap": FakePort(12)}
    hub.mail.ports = ports  # type: ignore[attr-defined]
    hub.mail.when_ready = lambda: succeed(None)  # type: ignore[attr-defined]
    hub.mail.domain = "example.org"  # type: ignore[attr-defined]
    hub.mail.policy = SimpleNamespace(other_domains=(), hostname="n1.example.org")  # type: ignore[attr-defined]
    hub.mail.max_message_size = 1 << 20  # type: ignore[attr-defined]
    hub.mail.tls = None  # type: ignore[attr-defined]
    hub.mail.allow_plaintext_auth = False  # type: ignore[attr-defined]
    hub.mail.throttle = SimpleNamespace(policy=ThrottlePolicy())  # type: ignore[attr-defined]
    hub.mail.storage = SimpleNamespace(  # type: ignore[attr-defined]
        mailbox_manager=SimpleNamespace(on_change=lambda f: None)
    )
    hub.startService()
    assert clock.listening == [str(tmp_path / SOCKET_NAME)]
    assert len(clock.spawned) == 2
    child, env, fds = clock.spawned[0]
    assert env[TOKEN_ENV] == TOKEN.hex()
    assert fds[3] == 11 and fds[4] == 12
    import json

    assert json.loads(env[CONFIG_ENV])["listeners"] == {"pop3": [3, 2], "imap": [4, 2]}

    _worker, server, pump, d = connect(hub, clock)
    result_of(d)
    assert hub.live() == 1 and not ports["pop3"].reading and not ports["imap"].reading
    assert hub.status()["mail_workers"]["main_accepts"] is False

    server.transport.loseConnection()  # the worker died: its channel closes...
    pump.flush()
    child.processEnded(Failure(Exception("killed by signal 9")))  # ...and it ends
    st = hub.status()["mail_workers"]
    assert (st["live"], st["deaths"], st["restarts"]) == (0, 1, 0)
    assert ports["pop3"].reading and ports["imap"].reading  # the main serves meanwhile
    clock.advance(BACKOFF[1] + 0.01)
    assert len(clock.spawned) == 3
    assert hub.status()["mail_workers"]["restarts"] == 1
    from yimaporc.admin.metrics import families

    samples = {
        s.name: s.value for f in families({"kind": "porcupine", **hub.status()}) for s in f.samples
    }
    assert samples["yimaporc_mail_workers_live"] == 0
    assert samples["yimaporc_mail_worker_deaths_total"] == 1
    assert samples["yimaporc_mail_worker_restarts_total"] == 1
    hub.stopService()


def test_mail_workers_option_fails_fast(tmp_path: Path) -> None:
    """--mail-workers takes 0..64 (default 0) and needs --pop3 or --imap."""
    from twisted.python import usage

    from yimaporc.tap.porcupine import Options

    base = ["--node-id", "n", "--data-dir", str(tmp_path), "--domain", "example.org",
            "--cluster", "tcp:7946:interface=127.0.181.1"]  # fmt: skip
    o = Options()
    o.parseOptions(base)
    assert o.mail_workers == 0
    o = Options()
    o.parseOptions([*base, "--pop3", "tcp:0", "--mail-workers", "3"])
    assert o.mail_workers == 3
    for bad in ("-1", "two", "65", ""):
        with pytest.raises(usage.UsageError, match="--mail-workers"):
            Options().parseOptions([*base, "--pop3", "tcp:0", "--mail-workers", bad])
    with pytest.raises(usage.UsageError, match="--mail-workers needs"):
        Options().parseOptions([*base, "--mail-workers", "2"])


def test_bodies_held_here_are_read_from_their_files(tmp_path: Path) -> None:
    """A worker reads a body the main's listing says this node holds from its file
    (no call); a file gone is left out; a UID without a listed key, a key of another
    node or a malformed key is asked of the main."""
    from yimaporc.porcupine._mailworker_bodies import LocalBodies
    from yimaporc.porcupine.usermap import bucket_dir, bucket_of

    user = "alice@example.org"
    udir = tmp_path / "mail" / "buckets" / bucket_dir(bucket_of(user)) / user
    udir.mkdir(parents=True)
    k1, k2, k3 = "a" * 32 + ".m", "b" * 32 + ".m", "c" * 32 + ".m"
    (udir / k1).write_bytes(b"one")
    (udir / k3).write_bytes(b"three")

    class Remote:
        def __init__(self) -> None:
            self.fetched: list[list[int]] = []

        def view(self, user: str, mailbox: str) -> Deferred[Any]:
            digests = [
                Digest(1, k1, 3, (), 0.0, "n1"),
                Digest(2, k2, 3, (), 0.0, "n1"),  # expunged meanwhile: no file
                Digest(3, k3, 5, (), 0.0, "n2"),  # another node's copy
                Digest(4, "../../etc/passwd", 5, (), 0.0, "n1"),
            ]
            return succeed(([MailboxInfo(INBOX, 7, 5, 4, 0)], digests))

        def fetch(self, user: str, mailbox: str, uids: list[int]) -> Deferred[dict[int, bytes]]:
            self.fetched.append(list(uids))
            return succeed({u: b"from main" for u in uids})

    remote = Remote()
    bodies = LocalBodies(remote, "n1", tmp_path, lambda f, *a: succeed(f(*a)))  # type: ignore[arg-type]
    assert result_of(bodies.fetch(user, INBOX, [1])) == {1: b"from main"}  # no listing yet
    result_of(bodies.view(user, INBOX))
    assert result_of(bodies.fetch(user, INBOX, [1, 2])) == {1: b"one"}
    assert remote.fetched == [[1]]
    for uid in (3, 4, 9):
        assert result_of(bodies.fetch(user, INBOX, [uid])) == {uid: b"from main"}
    assert remote.fetched == [[1], [3], [4], [9]]
    assert (bodies.read_here, bodies.asked) == (2, 4)


def test_a_login_asks_the_fragment_list_in_the_same_round_trip(tmp_path: Path) -> None:
    """authenticate sends fragments along; the login's first listing within the
    window uses that answer (no second call); later ones, or after a refused login,
    ask again."""
    clock = Clock()
    hub = make_hub(tmp_path, clock)
    worker, _server, pump, _d = connect(hub, clock)
    users = worker.front.users
    calls = hub.topology.users.calls  # type: ignore[attr-defined]
    calls.clear()
    login = users.authenticate("alice@example.org", "pw")
    first = users.fragments("alice@example.org")  # before the answers: waits for it
    pump.flush()
    assert result_of(login).address == "alice@example.org"
    assert result_of(first) == ("n1",)
    assert calls == [("authenticate", "alice@example.org"), ("fragments", "alice@example.org")]
    again = users.fragments("alice@example.org")
    pump.flush()
    assert result_of(again) == ("n1",) and len(calls) == 3  # consumed: asked again
    second = users.authenticate("alice@example.org", "pw")
    pump.flush()
    result_of(second)
    clock.advance(5.0)  # the window passed
    late = users.fragments("alice@example.org")
    pump.flush()
    assert result_of(late) == ("n1",) and len(calls) == 6
    bad = users.authenticate("alice@example.org", "nope")
    pump.flush()
    failure_of(bad).trap(BadCredentials)
    users.fragments("alice@example.org")
    pump.flush()
    assert len(calls) == 9 and users.early_used == 1


def test_replicated_appends_and_mailbox_changes_run_in_the_main(tmp_path: Path) -> None:
    """With replication, a worker's APPEND/COPY store and its mailbox-change log go to
    the main's replication (message and answer intact); the UIDNEXT shown is recorded
    by the main's own mailboxes; the replica set starts at the home."""
    from yimaporc.porcupine.values import NewMessage

    clock = Clock()
    hub = make_hub(tmp_path, clock)
    seen: list[Any] = []

    class Replication:
        def store(self, nodes: list[str], m: NewMessage, replicas: int) -> Deferred[Any]:
            seen.append(("store", nodes, m, replicas))
            return succeed([Digest(9, "k9", len(m.body), m.flags, 0.0, n) for n in nodes])

        def box_ops(self, user: str, ops: list[Any], nodes: list[str]) -> Deferred[None]:
            seen.append(("box_ops", user, ops, nodes))
            return succeed(None)

    hub.replication = Replication()  # type: ignore[assignment]
    worker = MailWorker(clock, {**worker_config(), "replication": True}, TOKEN)
    worker.on_exit = lambda: None
    factory = _ChannelFactory(hub)
    client, _server, pump = connectedServerAndClient(
        lambda: factory.buildProtocol(None), lambda: WorkerChannel(worker)
    )
    worker.proto = client
    client.authenticate().addCallback(lambda p: setattr(p, "authenticated", True))
    pump.flush()
    clock.advance(0)
    pump.flush()
    replica = worker.front.retrieval.layout.replica  # type: ignore[attr-defined]
    assert replica.choose("n2", 2) == ["n2", "n1"]
    msg = NewMessage("alice@example.org", "Sent", b"body\r\n", ("\\Seen",), 5.0, 9, "f")
    stored = replica.store(["n2", "n1"], msg, 2)
    pump.flush()
    assert [d.node for d in result_of(stored)] == ["n2", "n1"]
    assert seen[0] == ("store", ["n2", "n1"], msg, 2)
    ops = replica.box_ops("alice@example.org", [("Sent", True, None, None)], ["n1", "n2"])
    pump.flush()
    result_of(ops)
    assert seen[1] == ("box_ops", "alice@example.org", [("Sent", True, None, None)], ["n1", "n2"])
    shown = worker.front.retrieval.local.shown("alice@example.org", {INBOX: (7, 12)})  # type: ignore[union-attr]
    pump.flush()
    assert result_of(shown) == {INBOX: 12}


def test_a_call_the_main_never_answers_times_out(tmp_path: Path) -> None:
    """A worker's call to a main that does not answer fails with PeerMaybeDone after
    the timeout (a session waits on a stalled main for a bounded time)."""
    from yimaporc.cluster.rpc import PeerMaybeDone
    from yimaporc.porcupine._cluster_commands import UmProfile
    from yimaporc.porcupine._mailworkers_wire import CALL_TIMEOUT, call_on

    clock = Clock()
    proto = amp.AMP()
    proto.makeConnection(StringTransport())  # nothing ever answers
    d = call_on(proto, None, UmProfile, clock=clock, user="alice@example.org")
    clock.advance(CALL_TIMEOUT - 1)
    assert not d.called
    clock.advance(2)
    failure_of(d).trap(PeerMaybeDone)
    # the answer arriving late is dropped, the channel stays
    tag = next(iter(proto._outstandingRequests))
    proto.ampBoxReceived(amp.AmpBox({b"_answer": tag, b"profile": b"null"}))
    assert proto.transport.disconnecting is False  # type: ignore[union-attr]


def test_the_workers_sessions_count_in_the_node_status(tmp_path: Path) -> None:
    """Each worker's session, client-error and login counters reach the main; the
    node's mail_sessions, client_errors and auth add them (a dead worker's counters
    stay counted, its sessions no longer open)."""
    from yimaporc.porcupine._mailworkers import merge_worker_totals

    clock = Clock()
    hub = make_hub(tmp_path, clock)
    a, server_a, pump_a, _ = connect(hub, clock, index=0)
    b, _, pump_b, _ = connect(hub, clock, index=1)
    a.front.client_errors.opened("pop3")
    a.front.client_errors.command("pop3")
    a.front.client_errors.client("pop3", "bad_command")
    b.front.client_errors.opened("pop3")
    b.front.client_errors.opened("imap")
    a.front.throttle.counters["attempts"] += 3
    a.front.send_stats()
    b.front.send_stats()
    pump_a.flush()
    pump_b.flush()
    doc = {
        "mail_sessions": {"pop3": {"sessions": 10, "open": 1, "commands": 7}},
        "client_errors": {"pop3.bad_command": 2},
        "auth": {"attempts": 5, "cache_hits": 4},
    }
    merged = merge_worker_totals(doc, hub.totals())
    assert merged["mail_sessions"]["pop3"] == {"sessions": 12, "open": 3, "commands": 8}
    assert merged["mail_sessions"]["imap"]["sessions"] == 1
    assert merged["client_errors"]["pop3.bad_command"] == 3
    assert merged["auth"]["attempts"] == 8 and merged["auth"]["cache_hits"] == 4
    server_a.transport.loseConnection()  # worker a gone
    pump_a.flush()
    after = hub.totals()
    assert after["sessions"]["pop3"]["sessions"] == 2
    assert after["sessions"]["pop3"]["open"] == 1  # b's only
    assert after["client_errors"]["pop3.bad_command"] == 1
    hub._got_stats({"id": "not-a-worker", "sessions": {"pop3": {"sessions": 99}}})
    assert hub.totals()["sessions"]["pop3"]["sessions"] == 2  # only proven workers count
