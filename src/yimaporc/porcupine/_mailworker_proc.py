"""One mail worker process (``porcupine-node --mail-workers N``, :mod:`._mailworkers`).

Started by the main process as ``python -m yimaporc.porcupine._mailworker_proc`` with
the node's POP3/IMAP listening sockets as file descriptors 3 and up, its settings in
:data:`~._mailworkers.CONFIG_ENV` and the channel's token in
:data:`~._mailworkers_wire.TOKEN_ENV`.  It connects to the main's unix socket, proves
the token, waits for the live members, then adopts the sockets and serves whole
sessions: twisted.mail POP3 and ``yimaporc.imap`` over a
:class:`~.retrieval.RetrievalProxy` whose user and mailbox managers are the cluster's
remote stubs (:class:`~._cluster_remote.RemoteUserManager`,
:class:`~._cluster_remote.RemoteMailboxManager`) calling the main.  It holds nothing
durable; it ends when its channel to the main closes.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from twisted.cred import portal as cred_portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from ..cluster.rpc import NodeAMP, RpcRegistry
from ..imap import ImapServerProtocol, Limits
from ._cluster_remote import RemoteMailboxManager, RemoteUserManager
from ._cluster_wire import _digest_in, pack_messages
from ._guard import ClientErrors
from ._imap_registry import MailboxRegistry
from ._mailworker_bodies import LocalBodies
from ._mailworkers_wire import (
    SCOPE,
    TOKEN_ENV,
    WkBoxOps,
    WkChanged,
    WkLive,
    WkReplicaStore,
    WkShown,
    WkStats,
    call_on,
)
from ._pop3 import MailPOP3
from .auth import MailRealm, ManagerChecker, SlotWaiters, ThrottledPortal
from .bodycache import BodyCache
from .delivery import SmtpPolicy
from .imap_backend import PorcupineImapBackend
from .imap_server import PorcupineImapFactory
from .interfaces import IMailboxManager, IUserManager
from .retrieval import Fragmented, ReplicatedCopies, RetrievalProxy, SingleCopies
from .service import _peer_host, _ProtocolFactory
from .softstate import bucket_of as rendezvous
from .throttle import AuthThrottle, ThrottlePolicy
from .values import Digest, NewMessage, Profile

__all__ = ["MailWorker", "WorkerFront", "WorkerRegistry", "main"]

#: Seconds between the IMAP poll of mailboxes open here (with other nodes live).
POLL_INTERVAL = 5.0
#: Seconds between a worker's counters sent to the main (WkStats).
STATS_INTERVAL = 2.0


class WorkerRegistry(MailboxRegistry):
    """The mailboxes selected in this worker: a change a session makes wakes the
    others here and is told to the main (``tell``), which wakes everyone else's."""

    def __init__(self, tell: Callable[[str, str], None]) -> None:
        super().__init__()
        self.tell = tell

    def changed(self, user: str, mailbox: str) -> None:
        """A session here changed ``mailbox``: wake ours, tell the main."""
        self.changed_here(user, mailbox)
        self.tell(user, mailbox)

    def changed_here(self, user: str, mailbox: str) -> None:
        """Wake the sessions of this worker watching ``mailbox``."""
        super().changed(user, mailbox)


class _MainReplica:
    """Replication's hooks of :class:`~.retrieval.Fragmented` (APPEND/COPY and mailbox
    changes of a replicated user), run by the main process."""

    def __init__(self, call: Callable[..., Deferred[Any]], live: Callable[[], list[str]]):
        self._call = call
        self._live = live

    def choose(self, home: str, replicas: int) -> list[str]:
        """The home and the other live nodes by name (the main fills up to R)."""
        live = self._live()
        nodes = ([home] if home in live else []) + sorted(n for n in live if n != home)
        return nodes[: max(1, replicas)] or live[:1]

    def store(
        self, nodes: Sequence[str], message: NewMessage, replicas: int | None = None
    ) -> Deferred[list[Digest]]:
        d = self._call(
            WkReplicaStore,
            nodes=list(nodes),
            message=pack_messages([message]),
            replicas=int(replicas or 0),
        )
        return d.addCallback(lambda r: [_digest_in(v) for v in r["digests"]])

    def box_ops(
        self,
        user: str,
        ops: Sequence[tuple[str, bool, str | None, str | None]],
        nodes: Sequence[str],
    ) -> Deferred[Any]:
        return self._call(WkBoxOps, user=user, ops=[list(o) for o in ops], nodes=list(nodes))


#: Seconds a fragment list asked together with a login is used for that login's
#: first listing (after that the listing asks again).
EARLY_WINDOW = 1.0
#: Seconds a worker reuses a user's profile (replicas, creation time).
PROFILE_TTL = 2.0


class PipelinedUsers(RemoteUserManager):
    """The user managers through the main, no caches (the main's answer each time),
    with one round trip fewer per login: ``authenticate`` asks the user's fragment
    list in the same write, and the login's first ``fragments`` (within
    :data:`EARLY_WINDOW` s) takes that answer, as fresh as a call made then."""

    def __init__(self, node_id: str, call: Callable[..., Deferred[Any]], clock: Any) -> None:
        # Profiles (R, the INBOX UIDVALIDITY) are kept PROFILE_TTL s, as any member's
        # stub keeps them; logins are never answered here (cached_login below).
        super().__init__(node_id, call, clock.seconds, profile_ttl=PROFILE_TTL)
        self.clock = clock
        #: address -> (asked at, [result] once in, waiters)
        self._early: dict[str, tuple[float, list[Any], list[Deferred[Any]]]] = {}
        self.early_used = 0

    def cached_login(self, address: str, password: str) -> Profile | None:
        """Never: every login is checked by the main (its auth cache is the one
        flushed cluster-wide on passwd/deluser)."""
        return None

    def authenticate(self, address: str, password: str) -> Deferred[Profile]:
        key = address.lower()
        now = self.clock.seconds()
        if len(self._early) > 1000:
            self._early = {k: v for k, v in self._early.items() if v[0] > now - EARLY_WINDOW}
        entry: tuple[float, list[Any], list[Deferred[Any]]] = (now, [], [])
        self._early[key] = entry

        def arrived(result: Any) -> None:
            entry[1].append(result)
            waiters = list(entry[2])
            entry[2].clear()
            for w in waiters:
                (w.errback if isinstance(result, Failure) else w.callback)(result)

        d = super().authenticate(address, password)
        super().fragments(address).addBoth(arrived)

        def refused(f: Failure) -> Failure:
            if self._early.get(key) is entry:
                del self._early[key]
            return f

        return d.addErrback(refused)

    def fragments(self, address: str) -> Deferred[tuple[str, ...]]:
        entry = self._early.pop(address.lower(), None)
        if entry is None or entry[0] < self.clock.seconds() - EARLY_WINDOW:
            return super().fragments(address)
        self.early_used += 1
        _asked, result, waiters = entry
        if result:
            r = result[0]
            return fail(r) if isinstance(r, Failure) else succeed(r)
        d: Deferred[tuple[str, ...]] = Deferred()
        waiters.append(d)
        return d


class _MainLocal:
    """The main's own mailboxes as :class:`~.retrieval.Fragmented` uses them (the
    UIDNEXT shown is recorded there)."""

    def __init__(self, call: Callable[..., Deferred[Any]]) -> None:
        self._call = call

    def shown(self, user: str, marks: dict[str, tuple[int, int]]) -> Deferred[dict[str, int]]:
        d = self._call(WkShown, user=user, marks={k: list(v) for k, v in marks.items()})
        return d.addCallback(lambda r: {str(k): int(v) for k, v in dict(r["marks"]).items()})


class WorkerFront:
    """A worker's sessions: the POP3 and IMAP factories over the main's managers.

    ``call(node, command, **kw)`` sends a command to the main (``node``: the mailbox
    manager it is for, None for the user managers and the worker commands).
    """

    log = Logger()

    def __init__(
        self, reactor: Any, config: dict[str, Any], call: Callable[..., Deferred[Any]]
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.node_id: str = config["node_id"]
        self._call = call
        self.live: list[str] = [self.node_id]
        self.worker_id = "worker"
        main_call = self.call_main
        # No caches of profiles or logins here: the main's answer each time (its auth
        # cache, dropped cluster-wide on passwd/deluser, stays the one to trust).
        self.users = PipelinedUsers(self.node_id, lambda _n, c, **kw: main_call(c, **kw), reactor)
        self._boxes: dict[str, Any] = {}
        replica = (
            _MainReplica(main_call, lambda: list(self.live)) if config["replication"] else None
        )
        layout = Fragmented(self.home_of, now=reactor.seconds, replica=replica, clock=reactor)  # type: ignore[arg-type]
        copies = ReplicatedCopies(lambda n: 0.0) if config["replication"] else SingleCopies()
        self.retrieval = RetrievalProxy(
            self.node_id,
            self.users_for,
            self.mailboxes_for,
            layout=layout,
            copy_policy=copies,
            local=_MainLocal(main_call),  # type: ignore[arg-type]
        )
        domain = str(config["domain"])
        self.domain = domain
        self.policy = SmtpPolicy(
            domain=domain,
            hostname=str(config["hostname"]),
            max_message_size=int(config["max_message_size"]),
            other_domains=tuple(config["other_domains"]),
        )
        self.client_errors = ClientErrors(reactor.seconds)
        realm = MailRealm(self.retrieval, None, self.policy, reactor.seconds)  # type: ignore[arg-type]
        self.portal = cred_portal.Portal(realm, [ManagerChecker(self.retrieval, domain)])
        self.throttle = AuthThrottle(ThrottlePolicy(**config["auth_throttle"]))
        self.slot_waiters = SlotWaiters(reactor)
        self.registry = WorkerRegistry(self._tell_changed)
        tls = config.get("tls")
        self.tls: Any = None
        if tls:
            from .service import _ServerTLS

            self.tls = _ServerTLS(Path(tls[0]), Path(tls[1]))
        self.allow_plaintext_auth = bool(config["allow_plaintext_auth"])
        self.factories: dict[str, Factory] = {
            "pop3": _ProtocolFactory(self._pop3_protocol),
            "imap": self._imap_factory(),
        }
        self._poll = LoopingCall(self.poll_open_mailboxes)
        self._poll.clock = reactor
        self._stats = LoopingCall(self.send_stats)
        self._stats.clock = reactor

    # --- the managers, as a proxied session of another member sees them -----------

    def call_main(self, command: type[amp.Command], /, **kw: Any) -> Deferred[Any]:
        return self._call(None, command, **kw)

    def users_for(self, address: str) -> IUserManager:
        """The user managers, through the main (it routes by bucket)."""
        return self.users

    def mailboxes_for(self, node_id: str) -> IMailboxManager:
        """The mailbox manager of ``node_id``, through the main."""
        proxy = self._boxes.get(node_id)
        if proxy is None:
            if len(self._boxes) > 1024:
                self._boxes.clear()
            remote = RemoteMailboxManager(node_id, self._call)
            if node_id == self.node_id and self.config.get("data_dir"):
                cache = BodyCache(int(self.config.get("body_cache_bytes", 0)))
                proxy = LocalBodies(
                    remote, node_id, Path(self.config["data_dir"]), self._read, cache
                )
            else:
                proxy = remote
            self._boxes[node_id] = proxy
        return cast(IMailboxManager, proxy)

    def _read(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Blocking file reads, on the reactor's thread pool."""
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def home_of(self, address: str) -> str:
        """As :meth:`~.cluster.MailCluster.home_of`, over the live members the main sent."""
        live = self.live or [self.node_id]
        return max(live, key=lambda n: rendezvous(f"{address.lower()}|{n}", 1 << 31))

    def set_live(self, nodes: list[str]) -> None:
        self.live = list(nodes) or [self.node_id]

    def poll_open_mailboxes(self) -> int:
        """As :meth:`~.cluster.MailCluster.poll_open_mailboxes`, for this worker's."""
        if len(self.live) < 2:
            return 0
        keys = list(self.registry.boxes)
        for user, mailbox in keys:
            self.registry.changed_here(user, mailbox)
        return len(keys)

    def _tell_changed(self, user: str, mailbox: str) -> None:
        self.call_main(WkChanged, user=user, mailbox=mailbox).addErrback(lambda _: None)

    # --- sessions -------------------------------------------------------------------

    def _portal_for(self, p: Protocol, addr: IAddress | None) -> Any:
        def close() -> None:
            if p.transport is None:
                return
            if isinstance(p, ImapServerProtocol):
                p.close()
            else:
                p.transport.loseConnection()

        return ThrottledPortal(
            self.portal,
            self.throttle,
            self.reactor,
            _peer_host(addr),
            self.domain,
            close,
            self.slot_waiters,
        )

    def _pop3_protocol(self, addr: IAddress | None = None) -> MailPOP3:
        p = MailPOP3(self.reactor, self.tls, self.client_errors, self.allow_plaintext_auth)
        p.portal = self._portal_for(p, addr)
        return p

    def _imap_factory(self) -> PorcupineImapFactory:
        size = self.policy.max_message_size
        shared = PorcupineImapBackend(self.portal, self.registry, self.reactor, self.client_errors)
        return PorcupineImapFactory(
            shared,
            self._portal_for,
            self.client_errors,
            self.reactor,
            limits=Limits(
                max_append=size,
                max_command=max(size + 2**20, Limits().max_command),
                max_buffer=max(size + 2**21, Limits().max_buffer),
            ),
            tls=self.tls,
            plaintext_auth=self.tls is None or self.allow_plaintext_auth,
            implicit_tls=False,
            greeting=f"{self.policy.hostname} yimaporc IMAP4rev1",
        )

    def stats(self) -> dict[str, Any]:
        """This worker's counters, as the main adds them to the node's status."""
        return {
            "id": self.worker_id,
            "sessions": self.client_errors.activity(),
            "client_errors": self.client_errors.status(),
            "auth": self.throttle.status(),
        }

    def send_stats(self) -> None:
        self.call_main(WkStats, stats=self.stats()).addErrback(lambda _: None)

    def start_polling(self) -> None:
        if not self._poll.running:
            self._poll.start(POLL_INTERVAL, now=False)
        if not self._stats.running:
            self._stats.start(STATS_INTERVAL, now=False)

    def stop_polling(self) -> None:
        for loop in (self._poll, self._stats):
            if loop.running:
                loop.stop()


class WorkerChannel(NodeAMP):
    """The worker's end of the channel (a client that, once proven, also answers)."""

    def __init__(self, worker: MailWorker) -> None:
        registry = RpcRegistry()
        registry.register(WkChanged, worker.on_changed)
        registry.register(WkLive, worker.on_live)
        super().__init__(registry, worker.token, worker.worker_id, scope=SCOPE)
        self.worker = worker

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.worker.channel_lost(reason)


class _ChannelFactory(Factory):
    def __init__(self, worker: MailWorker) -> None:
        self.worker = worker

    def buildProtocol(self, addr: IAddress | None) -> WorkerChannel:
        return WorkerChannel(self.worker)


class MailWorker:
    """The worker process's whole life: channel, then the adopted sockets."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: dict[str, Any],
        token: bytes,
        on_exit: Callable[[], None] = lambda: None,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.token = token
        self.index = int(config.get("index", 0))
        #: How the main knows this worker (its Hello, its counters).
        self.worker_id = f"worker-{self.index}-{os.getpid()}"
        self.proto: WorkerChannel | None = None
        self.front = WorkerFront(reactor, config, self.call)
        self.front.worker_id = self.worker_id
        self.ports: dict[str, Any] = {}
        #: Called when the worker must end (no channel, or the main went): the
        #: process entry (:func:`main`) stops its reactor then; nothing here does.
        self.on_exit = on_exit

    def call(self, node: str | None, command: type[amp.Command], /, **kw: Any) -> Deferred[Any]:
        """``command`` to the main (``node``: the mailbox manager it is meant for)."""
        return call_on(self.proto, node, command, clock=self.reactor, **kw)

    def start(self) -> Deferred[Any]:
        """Connect to the main's socket and prove the token."""
        from twisted.internet.endpoints import UNIXClientEndpoint

        endpoint = UNIXClientEndpoint(self.reactor, self.config["socket"], timeout=10)
        d = endpoint.connect(_ChannelFactory(self))

        def connected(p: WorkerChannel) -> Deferred[Any]:
            self.proto = p
            return p.authenticate()

        def proven(p: WorkerChannel) -> None:
            p.authenticated = True  # the main pushes its notices on this connection

        def failed(f: Failure) -> None:
            self.log.error("mail worker: no channel to the main: {e}", e=f.getErrorMessage())
            self.on_exit()

        return d.addCallback(connected).addCallback(proven).addErrback(failed)

    def on_live(self, nodes: list[str]) -> dict[str, Any]:
        """The live members; the first such notice: the worker serves from now on."""
        self.front.set_live(nodes)
        if not self.ports:
            self.adopt()
        return {}

    def on_changed(self, user: str, mailbox: str) -> dict[str, Any]:
        self.front.registry.changed_here(user, mailbox)
        return {}

    def adopt(self) -> None:
        """Serve the inherited listening sockets."""
        for name, (fd, family) in self.config["listeners"].items():
            port = self.reactor.adoptStreamPort(
                int(fd), socket.AddressFamily(int(family)), self.front.factories[name]
            )
            os.close(int(fd))  # the port holds its own duplicate
            self.ports[name] = port
        self.front.start_polling()

    def channel_lost(self, reason: Failure) -> None:
        """The main is gone or dropped us: stop (the main starts a new worker)."""
        self.proto = None
        self.front.stop_polling()
        self.on_exit()


def main() -> None:
    """The worker process's entry point."""
    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    from ._mailworkers import CONFIG_ENV

    config = json.loads(os.environ.pop(CONFIG_ENV))
    token = bytes.fromhex(os.environ.pop(TOKEN_ENV))
    # Warnings and errors only: the main relays each line into the node's log (a line
    # per connection there would cost the main more than the session itself).
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.warn)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    stopping: list[bool] = []

    def stop() -> None:
        if not stopping:
            stopping.append(True)
            reactor.callLater(0, reactor.stop)  # type: ignore[attr-defined]

    worker = MailWorker(reactor, config, token, on_exit=stop)
    reactor.callWhenRunning(worker.start)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
