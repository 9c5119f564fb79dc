"""Front-end worker processes for POP3 and IMAP (``porcupine-node --mail-workers N``).

The main process keeps everything durable and cluster-wide (membership, the bucket
map, the user and mailbox managers, the store, the index, replication, SMTP).  N child
processes (:mod:`._mailworker_proc`), spawned with the reactor's ``spawnProcess``,
inherit the node's ``--pop3`` and ``--imap`` listening sockets (so the kernel shares
the accepts among them and a connection waiting in the accept queue outlives a
worker's death) and serve whole sessions.  A worker reaches the main over one AMP
connection on a unix socket in the data dir (mode 0600; :mod:`._mailworkers_wire`),
proving the token the main put in its environment; it calls the managers with the
cluster's own commands through the cluster's remote stubs, so a worker's session is
a session proxied by another member: the main answers with its own managers, or
forwards the call to the node it names.

:class:`MailWorkers` is the main's side: it spawns the workers once the listeners are
bound, answers them, pushes the live members and mailbox change notices (IDLE,
EXPUNGE) to them, watches each (``processEnded``), counts ``mail_workers {live,
deaths, restarts}`` and starts a replacement with backoff; while no worker is live,
the main accepts on the sockets itself (it stops accepting once one is).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..cluster.rpc import RpcGuard, RpcRegistry
from ._cluster_remote import register_handlers
from ._cluster_wire import _digest_out, unpack_messages
from ._mailworkers_wire import (
    SCOPE,
    TOKEN_ENV,
    MainChannel,
    WkBoxOps,
    WkChanged,
    WkLive,
    WkReplicaStore,
    WkShown,
    WkStats,
)
from .interfaces import IUserManager
from .reconstruct import Horizon
from .values import Profile

if TYPE_CHECKING:
    from .interfaces import IMailTopology
    from .replication.mail import MailReplication
    from .service import MailService

__all__ = [
    "CONFIG_ENV",
    "MAX_WORKERS",
    "SOCKET_NAME",
    "MailWorkers",
    "UserRouter",
    "merge_worker_totals",
]

#: Environment variable with the worker's configuration (JSON).
CONFIG_ENV = "YIMAPORC_MAILWORKER_CONFIG"
#: The unix socket's file name in the data dir.
SOCKET_NAME = "mail-workers.sock"
#: ``--mail-workers`` at most.
MAX_WORKERS = 64
#: Seconds before restarting a dead worker: the n-th death in a row waits the n-th
#: (the last repeats); a worker that lived :data:`STABLE_AFTER` seconds resets it.
BACKOFF = (0.2, 1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_AFTER = 30.0
#: The listeners the workers serve (the TLS-wrapped ones stay in the main).
SERVED = ("pop3", "imap")


class UserRouter:
    """The user-manager half of the main's answers to its workers: each command goes
    to the manager of its address's bucket (``topology.users_for``), here or on the
    owner node, as a proxied session of another member would reach it."""

    def __init__(self, users_for: Callable[[str], IUserManager]) -> None:
        self.users_for = users_for

    def profile(self, address: str) -> Deferred[Profile | None]:
        return self.users_for(address).profile(address)

    def authenticate(self, address: str, password: str) -> Deferred[Profile]:
        return self.users_for(address).authenticate(address, password)

    def fragments(self, address: str) -> Deferred[tuple[str, ...]]:
        return self.users_for(address).fragments(address)

    def away_of(self, address: str) -> tuple[str, ...]:
        return tuple(getattr(self.users_for(address), "away_of", lambda _: ())(address))

    def certain(self, address: str) -> bool:
        return bool(getattr(self.users_for(address), "certain", lambda _: True)(address))

    def horizon_of(self, address: str) -> Horizon | None:
        found: Horizon | None = getattr(self.users_for(address), "horizon_of", lambda _: None)(
            address
        )
        return found

    def add_fragment(self, address: str, node: str, first: int | None = 0) -> Deferred[None]:
        um: Any = self.users_for(address)
        return um.add_fragment(address, node, first)  # type: ignore[no-any-return]

    def remove_fragment(self, address: str, node: str) -> Deferred[None]:
        return self.users_for(address).remove_fragment(address, node)

    def add_holder(self, address: str, node: str, first: int, fence: str) -> Deferred[str]:
        um: Any = self.users_for(address)
        return um.add_holder(address, node, first, fence)  # type: ignore[no-any-return]

    def reserve_uids(self, address: str, count: int) -> Deferred[int]:
        um: Any = self.users_for(address)
        return um.reserve_uids(address, count)  # type: ignore[no-any-return]

    def delivery_plan(self, address: str, count: int, unfenced: bool = False) -> Deferred[Any]:
        um: Any = self.users_for(address)
        return um.delivery_plan(address, count, unfenced)  # type: ignore[no-any-return]

    def note_pending(self, address: str, node: str) -> Deferred[None]:
        um: Any = self.users_for(address)
        return um.note_pending(address, node)  # type: ignore[no-any-return]


class _Child(ProcessProtocol):
    """One worker process: its stderr relayed to the log, its end reported."""

    log = Logger()

    def __init__(self, hub: MailWorkers, index: int, started: float) -> None:
        self.hub = hub
        self.index = index
        self.started = started
        self.pid: int | None = None
        self.channel: MainChannel | None = None
        self.dead = False
        self._err = b""

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        for line in lines:
            if line.strip():
                self.log.info(
                    "mail worker {i}: {line}", i=self.index, line=line.decode(errors="replace")
                )
        if len(self._err) > 65536:
            self._err = b""

    def processEnded(self, reason: Failure) -> None:
        self.dead = True
        self.hub._ended(self, reason)


class _ChannelFactory(Factory):
    def __init__(self, hub: MailWorkers) -> None:
        self.hub = hub

    def buildProtocol(self, addr: IAddress | None) -> MainChannel:
        hub = self.hub
        p = _HubChannel(
            hub.registry,
            hub.token,
            hub.node_id,
            scope=SCOPE,
            guard=hub.guard,
            server=True,
            registry_for=hub.registry_for,
        )
        p.hub = hub
        p.on_lost = hub._left
        p.calls = hub.calls
        return p


class _HubChannel(MainChannel):
    hub: MailWorkers

    def _trust(self) -> None:
        """The worker proved the token (AMP binds ``_prove`` itself: hook here)."""
        super()._trust()
        if self.authenticated:  # after Prove's answer has gone out: then the notices
            self.hub.reactor.callLater(0, self.hub._joined, self)


class MailWorkers(Service):
    """The main process's side of ``--mail-workers N`` (see the module docstring)."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        mail: MailService,
        topology: IMailTopology,
        count: int,
        *,
        replication: MailReplication | None = None,
        executable: str = sys.executable,
        token: bytes | None = None,
        backoff: Sequence[float] = BACKOFF,
    ) -> None:
        if not 0 <= count <= MAX_WORKERS:
            raise ValueError(f"--mail-workers must be 0 to {MAX_WORKERS}")
        self.reactor = reactor
        self.mail = mail
        self.topology = topology
        self.count = count
        self.replication = replication
        self.executable = executable
        self.node_id: str = mail.node_id
        #: The channel's key: only a process given it (our children) is answered.
        self.token = token if token is not None else os.urandom(32)
        self.backoff = tuple(backoff)
        self.socket_path = Path(mail.data_dir) / SOCKET_NAME
        self.guard = RpcGuard(reactor)
        self.router = UserRouter(topology.users_for)
        router = cast(IUserManager, self.router)  # answers what the handlers ask
        #: Answers to commands without a target node (and mailbox commands for us).
        self.registry = RpcRegistry()
        register_handlers(
            self.registry, lambda: router, lambda: topology.mailboxes_for(self.node_id)
        )
        self.registry.register(WkShown, self._shown)
        self.registry.register(WkStats, self._got_stats)
        self.registry.register(WkChanged, self._worker_changed)
        self.registry.register(WkReplicaStore, self._replica_store)
        self.registry.register(WkBoxOps, self._box_ops)
        self._registries: dict[str, RpcRegistry] = {}
        self._fds: dict[str, tuple[int, int]] = {}
        #: The workers' calls answered, by command.
        self.calls: Counter[str] = Counter()
        #: Each live worker's last counters (WkStats), and the sums of those gone.
        self._stats: dict[str, dict[str, Any]] = {}
        self._retired: dict[str, Any] = {}
        self.children: list[_Child] = []
        self.channels: list[MainChannel] = []
        self.deaths = 0
        self.restarts = 0
        self._in_a_row = 0
        self._respawns: list[IDelayedCall] = []
        self._server: Any = None
        self._paused = False
        self._live_sent: list[str] = []
        self._started = False

    # --- answers ------------------------------------------------------------------

    def registry_for(self, node: str) -> RpcRegistry | None:
        """The answers to mailbox commands for ``node`` (None: not a node we know)."""
        if node == self.node_id:
            return self.registry
        found = self._registries.get(node)
        if found is not None:
            return found
        known = set(self.topology.live())
        known |= set(getattr(self.topology, "known_nodes", set)())
        if node not in known:
            return None
        reg = self._registries[node] = RpcRegistry()
        router = cast(IUserManager, self.router)
        register_handlers(reg, lambda: router, lambda: self.topology.mailboxes_for(node))
        return reg

    def _shown(self, user: str, marks: Any) -> Deferred[dict[str, Any]]:
        local = self.mail.retrieval.local
        parsed = {str(k): (int(v[0]), int(v[1])) for k, v in dict(marks).items()}
        if local is None:
            return succeed({"marks": {}})
        return local.shown(user, parsed).addCallback(lambda r: {"marks": dict(r)})

    def _worker_changed(self, user: str, mailbox: str) -> dict[str, Any]:
        """A worker's session changed ``mailbox`` (flags, expunge): wake ours and the
        other workers' sessions on it."""
        self.mail.registry.changed(user, mailbox)
        self.push_changed(user, mailbox)
        return {}

    def _replica_store(self, nodes: list[str], message: bytes, replicas: int) -> Any:
        if self.replication is None:
            raise ValueError("no replication on this node")
        (m,) = unpack_messages(message)
        d = self.replication.store(nodes, m, replicas)
        return d.addCallback(lambda ds: {"digests": [_digest_out(x) for x in ds]})

    def _box_ops(self, user: str, ops: Any, nodes: Any) -> Any:
        if self.replication is None:
            raise ValueError("no replication on this node")
        parsed = [(str(o[0]), bool(o[1]), o[2], o[3]) for o in ops]
        return self.replication.box_ops(user, parsed, [str(n) for n in nodes]).addCallback(
            lambda _: {}
        )

    def _got_stats(self, stats: Any) -> dict[str, Any]:
        """A worker's counters (by the id it proved the token under)."""
        if isinstance(stats, dict):
            key = str(stats.get("id"))
            if key in {str(ch.peer_id) for ch in self.channels}:
                self._stats[key] = stats
        return {}

    def totals(self) -> dict[str, Any]:
        """The workers' ``sessions``, ``client_errors`` and ``auth`` counters summed
        (those of workers gone included; ``open`` only of the live ones)."""
        out: dict[str, Any] = _empty_totals()
        for doc in [self._retired, *self._stats.values()]:
            _add_totals(out, doc)
        return out

    # --- pushes -------------------------------------------------------------------

    def push_changed(self, user: str, mailbox: str) -> None:
        """Tell every worker ``mailbox`` of ``user`` may have changed."""
        for ch in list(self.channels):
            ch.callRemote(WkChanged, user=user, mailbox=mailbox).addErrback(lambda _: None)

    def push_live(self, force: bool = False) -> None:
        """Tell the workers the live members (when they changed)."""
        live = sorted(self.topology.live())
        if live == self._live_sent and not force:
            return
        self._live_sent = live
        for ch in list(self.channels):
            ch.callRemote(WkLive, nodes=live).addErrback(lambda _: None)

    # --- life cycle ---------------------------------------------------------------

    def startService(self) -> None:
        """Once the listeners are bound: the socket, then the workers."""
        super().startService()
        if self.count == 0:
            return
        self.mail.when_ready().addCallbacks(self._start, lambda _: None)

    def _start(self, _: object) -> None:
        if not self.running:
            return
        fds = self._listening_fds()
        if not fds:
            self.log.warn("mail: --mail-workers needs --pop3 or --imap; none started")
            return
        self._fds = fds
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass
        self._server = self.reactor.listenUNIX(
            str(self.socket_path), _ChannelFactory(self), mode=0o600
        )
        os.chmod(self.socket_path, 0o600)
        self.mail.storage.mailbox_manager.on_change(self._arrived)
        self._live_poll = self.reactor.callLater(1.0, self._poll_live)
        self._started = True
        for i in range(self.count):
            self.children.append(self._spawn(i))

    def _listening_fds(self) -> dict[str, tuple[int, int]]:
        """``name -> (fd, family)`` of the listeners the workers serve."""
        out: dict[str, tuple[int, int]] = {}
        for name in SERVED:
            port = self.mail.ports.get(name)
            if port is None:
                continue
            fd = port.fileno()  # type: ignore[attr-defined]
            out[name] = (fd, int(getattr(port, "addressFamily", socket.AF_INET)))
        return out

    def _config(self, index: int) -> dict[str, Any]:
        mail = self.mail
        policy = mail.throttle.policy
        import attrs

        return {
            "index": index,
            "node_id": self.node_id,
            "socket": str(self.socket_path),
            "listeners": {
                name: [3 + i, fam] for i, (name, (_, fam)) in enumerate(self._fds.items())
            },
            "domain": mail.domain,
            "other_domains": list(mail.policy.other_domains),
            "hostname": mail.policy.hostname,
            "max_message_size": mail.max_message_size,
            "tls": list(self._tls_files()) if mail.tls is not None else None,
            "allow_plaintext_auth": mail.allow_plaintext_auth,
            "auth_throttle": attrs.asdict(policy),
            "replication": self.replication is not None,
            # bodies held here are read from their files by the workers
            "data_dir": str(self.mail.data_dir),
            # each worker's share of --mail-body-cache-bytes (bodies by key)
            "body_cache_bytes": self._body_cache_share(),
        }

    def _body_cache_share(self) -> int:
        cache = getattr(self.mail, "body_cache", None)
        total = int(getattr(cache, "max_bytes", 0) or 0)
        return total // max(1, self.count) if total else 0

    def _tls_files(self) -> tuple[str, str]:
        files = self.mail.tls_files
        assert files is not None
        return (str(files[0]), str(files[1]))

    def _spawn(self, index: int) -> _Child:
        child = _Child(self, index, self.reactor.seconds())
        env = dict(os.environ)
        env[TOKEN_ENV] = self.token.hex()
        env[CONFIG_ENV] = json.dumps(self._config(index))
        fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for i, (fd, _) in enumerate(self._fds.values()):
            fds[3 + i] = fd
        argv = [self.executable, "-m", "yimaporc.porcupine._mailworker_proc"]
        self.reactor.spawnProcess(child, self.executable, argv, env=env, childFDs=fds)
        self.log.info("mail worker {i} started (pid {pid})", i=index, pid=child.pid)
        return child

    def _joined(self, channel: MainChannel) -> None:
        """A worker proved the token: it serves now (it adopts the sockets on the
        live members we send)."""
        if channel.closed:
            return
        self.channels.append(channel)
        channel.callRemote(WkLive, nodes=sorted(self.topology.live())).addErrback(lambda _: None)
        self._pause_main()

    def _left(self, channel: MainChannel) -> None:
        """A worker's channel closed (it ends with it): with none left, the main
        accepts itself again."""
        if channel in self.channels:
            self.channels.remove(channel)
        last = self._stats.pop(str(channel.peer_id), None)
        if last is not None:  # its counters stay counted; its sessions are closed
            closed = {p: {**row, "open": 0} for p, row in dict(last.get("sessions", {})).items()}
            merged = _empty_totals()
            _add_totals(merged, self._retired)
            _add_totals(merged, {**last, "sessions": closed})
            self._retired = merged
        if not self.channels and self.running:
            self._resume_main()

    def _ended(self, child: _Child, reason: Failure) -> None:
        if child not in self.children:
            return
        if not self.running:
            return
        self.deaths += 1
        lived = self.reactor.seconds() - child.started
        self._in_a_row = 0 if lived >= STABLE_AFTER else self._in_a_row + 1
        delay = self.backoff[min(self._in_a_row, len(self.backoff) - 1)]
        self.log.error(
            "mail worker {i} (pid {pid}) ended ({why}); a new one in {d:g} s",
            i=child.index,
            pid=child.pid,
            why=reason.getErrorMessage(),
            d=delay,
            event="mail_worker_died",
        )
        call = self.reactor.callLater(delay, self._respawn, child)
        self._respawns.append(call)

    def _respawn(self, child: _Child) -> None:
        self._respawns = [c for c in self._respawns if c.active()]
        if not self.running or child not in self.children:
            return
        self.restarts += 1
        self.children[self.children.index(child)] = self._spawn(child.index)

    def live(self) -> int:
        """Workers running and connected."""
        return len(self.channels)

    def _pause_main(self) -> None:
        """A worker serves: the main stops accepting on the sockets it shares."""
        if self._paused:
            return
        self._paused = True
        for name in self._fds:
            port = self.mail.ports.get(name)
            if port is not None:
                port.stopReading()  # type: ignore[attr-defined]

    def _resume_main(self) -> None:
        """No worker serves: the main accepts on the sockets itself again."""
        if not self._paused:
            return
        self._paused = False
        for name in self._fds:
            port = self.mail.ports.get(name)
            if port is not None:
                port.startReading()  # type: ignore[attr-defined]
        self.log.warn("mail: no mail worker live; the main process serves POP3/IMAP")

    def _arrived(self, user: str, mailbox: str) -> None:
        self.push_changed(user, mailbox)

    def _poll_live(self) -> None:
        self._live_poll = self.reactor.callLater(1.0, self._poll_live)
        self.push_live()

    def stopService(self) -> Deferred[None] | None:
        """End the workers and close the socket."""
        super().stopService()
        for call in self._respawns:
            if call.active():
                call.cancel()
        self._respawns = []
        poll = getattr(self, "_live_poll", None)
        if poll is not None and poll.active():
            poll.cancel()
        for child in self.children:
            if not child.dead and child.transport is not None:
                try:
                    child.transport.signalProcess("TERM")
                except Exception:  # already gone
                    pass
        for ch in list(self.channels):
            if ch.transport is not None:
                ch.transport.loseConnection()
        if self._server is not None:
            d: Deferred[None] | None = self._server.stopListening()
            self._server = None
            try:
                self.socket_path.unlink()
            except FileNotFoundError:
                pass
            return d
        return None

    def status(self) -> dict[str, Any]:
        """``mail_workers``: configured, live, deaths, restarts, channel refusals."""
        return {
            "mail_workers": {
                "configured": self.count,
                "live": self.live(),
                "deaths": self.deaths,
                "restarts": self.restarts,
                "pids": [c.pid for c in self.children if not c.dead],
                "main_accepts": not self._paused,
                "channel": dict(self.guard.stats),
                "calls": dict(self.calls),
                **self.totals(),
            }
        }


def _empty_totals() -> dict[str, Any]:
    return {"sessions": {}, "client_errors": {}, "auth": {}}


def _add_totals(out: dict[str, Any], doc: dict[str, Any]) -> None:
    """Add the numbers of a worker's counters ``doc`` into ``out`` (malformed parts
    are skipped: they come from our own children, but never crash the status)."""
    for proto, row in dict(doc.get("sessions") or {}).items():
        if isinstance(row, dict):
            mine = out["sessions"].setdefault(str(proto), {})
            for k, v in row.items():
                if isinstance(v, int | float):
                    mine[str(k)] = mine.get(str(k), 0) + v
    for part in ("client_errors", "auth"):
        for k, v in dict(doc.get(part) or {}).items():
            if isinstance(v, int | float):
                out[part][str(k)] = out[part].get(str(k), 0) + v


def merge_worker_totals(doc: dict[str, Any], totals: dict[str, Any]) -> dict[str, Any]:
    """The mail status ``doc`` with the workers' ``totals`` added to its
    ``mail_sessions``, ``client_errors`` and ``auth`` numbers."""
    out = dict(doc)
    sessions: dict[str, Any] = {p: dict(r) for p, r in dict(doc.get("mail_sessions") or {}).items()}
    for proto, row in totals.get("sessions", {}).items():
        mine = sessions.setdefault(proto, {})
        for k, v in row.items():
            mine[k] = mine.get(k, 0) + v
    out["mail_sessions"] = sessions
    for part, key in (("client_errors", "client_errors"), ("auth", "auth")):
        merged = dict(doc.get(key) or {})
        for k, v in totals.get(part, {}).items():
            if isinstance(merged.get(k, 0), int | float):
                merged[k] = merged.get(k, 0) + v
        out[key] = merged
    return out
