"""What every node has: identity, data dir, membership, RPC, common clock.

:class:`ClusterNode` is a ``MultiService``; a node kind (yima, porcupine) adds
its own child services, RPC commands, admin routes and status fields to it.
The node holds the admin routes and the status document but serves neither:
the composition root mounts the admin site (:mod:`yimaporc.admin.mount`) as a
child, so the cluster layer imports nothing of ``yimaporc.admin``.
Collaborators (reactor, secret, random source) are passed in, so other Twisted
applications can embed a node directly.
"""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import MultiService
from twisted.internet import ssl
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    FirstError,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import SSL4ClientEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .._reactor import INodeReactor
from ..secret import cluster_key

# Re-exported: node kinds, the taps and tests import them from here.
from ._nodeconfig import ConfigError as ConfigError
from ._nodeconfig import NodeConfig as NodeConfig
from ._nodeconfig import load_ca as load_ca
from ._nodeconfig import load_tls as load_tls
from ._nodeconfig import parse_cluster_address as parse_cluster_address
from ._nodeconfig import parse_join as parse_join
from .catalog import PutRecords
from .histogram import LAG_BUCKETS, Histograms
from .interfaces import IClusterNode
from .lag import ReactorLagMonitor
from .listening import CannotStart as CannotStart  # re-exported: services import it here
from .listening import IReady as IReady
from .membership import AttachmentFor, IMembershipListener, Membership, View
from .routes import Route
from .rpc import Echo, RpcClient, RpcGuard, RpcRegistry, RpcServerFactory
from .statefile import Pool, StateFile, write_atomically
from .udp import MembershipProtocol
from .wire import Member

UDP_RCVBUF = 4 * 1024 * 1024
#: How far above its view's epoch a node's state file reserves: a node restarts above
#: the reservation, so its epoch never goes back even when it crashed between a view
#: change and the (off-reactor) write of that epoch (see :meth:`ClusterNode._view_changed`).
EPOCH_HEADROOM = 1000


def grow_receive_buffer(port: IListeningPort, size: int) -> int:
    """Best effort: give a UDP port's socket a ``size``-byte receive buffer, so a burst of
    junk does not push genuine pings out; the size the kernel granted (0 if unknown)."""
    sock = getattr(port, "socket", None)
    if sock is None:
        return 0
    # SO_RCVBUFFORCE passes net.core.rmem_max with CAP_NET_ADMIN; SO_RCVBUF up to it
    for opt in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
        if opt is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
            break
        except OSError:
            continue
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    except OSError:
        return 0


@attrs.define
class _Persisted:
    epoch: int = 0
    lamport: int = 0
    incarnation: int = 0
    known: list[str] = attrs.field(factory=list)
    # Which cluster the known addresses belong to ("" in files written before).
    cluster: str = ""
    kind: str = ""
    #: No view of this node had an epoch above this (``epoch`` + EPOCH_HEADROOM when
    #: written): a restart begins above it.  0 in files written before.
    reserved: int = 0


@implementer(IClusterNode)
class ClusterNode(MultiService):
    """Membership, RPC, the common clock, admin routes and status of one node.

    Nothing here stops the reactor: a port that cannot be bound fails
    :meth:`when_ready`, and whoever runs the node (the twistd plugin, an
    embedding application) decides what that means.
    """

    log = Logger()

    def __init__(
        self,
        reactor: INodeReactor,
        config: NodeConfig,
        secret: bytes,
        *,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
        threadpool: Pool | None = None,
    ) -> None:
        """``threadpool`` writes the node's state files (default: the reactor's pool,
        asked for at the first write); the simulator passes its host's pool."""
        super().__init__()
        self.reactor = reactor
        #: The wall clock (seconds since 1970) that seeds the incarnation at each boot;
        #: the simulator passes a simulated one so that a seed replays exactly.
        self.wall_clock = wall_clock
        self.config = config
        self.secret = secret
        self.rng = rng or random.Random()
        self.scope = config.scope
        self.membership_key = cluster_key(secret, "membership", self.scope.cluster, config.kind)
        self.rpc_key = cluster_key(secret, "rpc", self.scope.cluster, config.kind)
        self.registry = RpcRegistry()
        self.rpc_guard = RpcGuard(reactor)
        self.tls = load_tls(config.tls_cert, config.tls_key)
        self.tls_ca = load_ca(config.tls_ca) if config.tls_ca is not None else None
        self.rpc = RpcClient(
            reactor,
            self.rpc_key,
            config.node_id,
            scope=self.scope,
            registry=self.registry,
            guard=self.rpc_guard,
            endpoint_for=self._rpc_endpoint if self.tls is not None else None,
        )
        self.routes: list[Route] = []
        self.documents: dict[str, Any] = {}
        self.registry.register(PutRecords, self._put_records)
        self.add_route(Route("GET", "/api/rpc-check", self._rpc_check))
        self.status_providers: list[Callable[[], dict[str, Any]]] = []
        self._listeners: list[IMembershipListener] = []
        self._attachment_for: AttachmentFor | None = None
        self._ports: list[IListeningPort] = []
        self.core: Membership | None = None
        self.udp_rcvbuf = 0
        self.protocol: MembershipProtocol | None = None
        self.started_at = 0.0
        self.view_changes = 0
        self._state_path = config.data_dir / "membership.json"
        #: Written on the reactor, rarely: when a view's epoch passes the reservation
        #: known to be on disk (a jump of EPOCH_HEADROOM within one write).
        self._floor_path = config.data_dir / "membership.floor"
        self.state = self._load_state()
        #: The highest ``reserved`` known to be on disk (membership.json or the floor).
        self._durable_reserved = 0
        #: Synchronous writes of membership.floor (and how many failed).
        self.floor_writes = self.floor_write_failures = 0
        self._pool: Pool | Callable[[], Pool] = (
            threadpool if threadpool is not None else (lambda: reactor.getThreadPool())
        )
        self._state_files: dict[str, StateFile] = {}
        #: ``membership.json``, written off the reactor (ordered, coalesced, fsynced).
        self.state_file = self.state_file_for("membership", self._state_path, durable=True)
        self._start_error: CannotStart | None = None
        self._state_durable: Deferred[None] = succeed(None)
        #: Histograms services keep for /metrics (yimaporc.admin.metrics exports them).
        self.histograms = Histograms()
        lag = self.histograms.get(
            "yimaporc_reactor_lag_seconds",
            "How late the reactor ran its 100 ms sampling timer, every sample since start.",
            LAG_BUCKETS,
        )
        self.lag_monitor = ReactorLagMonitor(reactor, histogram=lag)
        self.lag_monitor.setServiceParent(self)

    # --- public face --------------------------------------------------------------

    @property
    def node_id(self) -> str:
        """This node's id."""
        return self.config.node_id

    @property
    def view(self) -> View:
        """The current committed view (a group of one until others are found)."""
        return self.core.view if self.core is not None else View(0, (), "")

    def subscribe(self, listener: IMembershipListener) -> None:
        """Call ``listener.membership_changed`` on every new view."""
        self._listeners.append(listener)

    def _tls_options(self) -> ssl.CertificateOptions:
        """Both ends of a cluster TLS connection: present our certificate, require and
        verify the peer's against ``--tls-ca`` (default: our own certificate, for a
        cluster sharing one self-signed certificate).  Peers prove the secret too."""
        assert self.tls is not None
        ca = self.tls_ca if self.tls_ca is not None else self.tls
        return ssl.CertificateOptions(
            privateKey=self.tls.privateKey.original,
            certificate=self.tls.original,
            verify=True,
            caCerts=[ca.original],
            requireCertificate=True,
        )

    def _rpc_endpoint(self, address: str) -> Any:
        """TLS to a peer, with our client certificate, trusting the cluster's CA."""
        host, _, port = address.rpartition(":")
        return SSL4ClientEndpoint(self.reactor, host, int(port), self._tls_options(), timeout=3)

    def _rpc_check(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        """Echo over RPC to every member: {node_id: {ok, rtt_ms | error}}."""
        peers = [m for m in self.view.members if m.node_id != self.node_id]

        def one(member: Member) -> Deferred[Any]:
            start = float(self.reactor.seconds())
            d = self.rpc.call(member.address, Echo, payload=b"x" * 100_000)
            d.addCallback(
                lambda _: {"ok": True, "rtt_ms": round((self.reactor.seconds() - start) * 1e3, 3)}
            )
            d.addErrback(lambda f: {"ok": False, "error": f.getErrorMessage()})
            return d

        d = DeferredList([one(m) for m in peers], consumeErrors=True)
        return d.addCallback(
            lambda results: {
                "tls": self.tls is not None,
                "peers": {m.node_id: r for m, (_, r) in zip(peers, results, strict=True)},
            }
        )

    def _put_records(self, name: str, body: bytes) -> Deferred[dict[str, int]]:
        doc = self.documents.get(name)
        if doc is None:
            return succeed({"accepted": 0})
        # Answered once the taken records are on disk (written off the reactor).
        d: Deferred[int] = doc.offer(body)
        return d.addCallback(lambda n: {"accepted": n})

    def set_commit_attachment(self, provider: AttachmentFor) -> None:
        """When this node coordinates a commit, ship ``provider(old, members, epoch)`` in it."""
        self._attachment_for = provider
        if self.core is not None:
            self.core.attachment_for = provider

    def cluster_time(self) -> float:
        """Seconds on the cluster's common clock (see :mod:`.timesync`)."""
        offset = self.core.clock_sync.offset if self.core is not None else 0.0
        return float(self.reactor.seconds()) + offset

    def synced_cluster_time(self) -> float | None:
        """:meth:`cluster_time` while synced to the reference (see :mod:`.timesync`),
        else None (thread-safe: reads only)."""
        core = self.core
        if core is None or not core.clock_sync.synced:
            return None
        return self.cluster_time()

    def state_file_for(self, name: str, path: Path, *, durable: bool) -> StateFile:
        """A :class:`StateFile` for ``path`` written by this node's pool, reported as
        ``state_files.NAME`` in the status and flushed when the node stops."""
        if name in self._state_files:
            raise ValueError(f"state file {name!r} exists already")
        f = self._state_files[name] = StateFile(self.reactor, self._pool, path, durable=durable)
        return f

    def add_route(self, route: Route) -> None:
        """Mount an admin API route."""
        self.routes.append(route)

    def add_status(self, provider: Callable[[], dict[str, Any]]) -> None:
        """Merge ``provider()`` into ``GET /api/status``."""
        self.status_providers.append(provider)

    def status(self) -> dict[str, Any]:
        """The status document of CONTRACT §3 (common part plus the providers')."""
        view = self.view
        sync = self.core.clock_sync if self.core is not None else None
        doc: dict[str, Any] = {
            "node_id": self.node_id,
            "kind": self.config.kind,
            "cluster": self.scope.cluster,
            "address": self.config.cluster_address,
            "epoch": view.epoch,
            "coordinator": view.coordinator,
            "members": [{"node_id": m.node_id, "address": m.address} for m in view.members],
            "incarnation": self.state.incarnation,
            "uptime": round(float(self.reactor.seconds()) - self.started_at, 3),
            "clock": {
                "reference": sync.reference.node_id if sync and sync.reference else self.node_id,
                "offset": sync.offset if sync else 0.0,
                "rtt": sync.rtt if sync else None,
            },
            "membership": self._membership_status(),
            "reactor_lag": self.lag_monitor.summary().as_status(),
            "rpc": {**self.rpc_guard.stats, "unauthenticated": self.rpc_guard.unauthenticated},
            "state_files": {name: dict(f.stats) for name, f in self._state_files.items()},
        }
        for provider in self.status_providers:
            doc.update(provider())
        return doc

    def _rpc_timed_out(self, address: str) -> None:
        """An RPC to ``address`` timed out: the failure detector hears of it."""
        if self.core is None or self.protocol is None or self.protocol.held:
            return
        if self.protocol.transport is None:
            return
        self.protocol.perform(self.core.rpc_timeout(address, float(self.reactor.seconds())))

    def _membership_status(self) -> dict[str, Any]:
        if self.protocol is None or self.core is None:
            return {}
        return {
            **self.protocol.status(),
            **{"detector_" + k: v for k, v in self.core.detector.items()},
            "local_health": self.core.health,
            "udp_rcvbuf": self.udp_rcvbuf,
            "epoch_floor_writes": self.floor_writes,
            "epoch_floor_write_failures": self.floor_write_failures,
        }

    # --- service ------------------------------------------------------------------

    def startService(self) -> None:
        """Bind the cluster port (UDP + TCP), start membership and the children."""
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        st = self.state
        st.incarnation = max(st.incarnation + 1, int(self.wall_clock() * 1000))
        # The last run may have installed views up to its reservation without having
        # written their epoch: begin above it (epochs never go back, docs/cluster.md).
        st.epoch = max(st.epoch, st.reserved)
        # The new incarnation is on disk before the node announces itself: the ports
        # bind now (a busy port still raises here), the membership protocol starts
        # once the write is done.  A write that fails fails when_ready().
        self._save_state()
        self._start_error = None
        self._state_durable = self.state_file.when_saved().addErrback(self._state_unsaved)
        self.started_at = float(self.reactor.seconds())
        me = Member(cfg.node_id, cfg.cluster_address, st.incarnation)
        self.core = Membership(
            me,
            seeds=cfg.join,
            rng=random.Random(self.rng.getrandbits(64)),
            config=cfg.trm,
            epoch=st.epoch,
            lamport=st.lamport,
            known=st.known,
            attachment_for=self._attachment_for,
        )
        self.protocol = MembershipProtocol(
            self.core,
            self.membership_key,
            self.reactor,
            self._view_changed,
            scope=self.scope,
            start_when=self.state_file.when_saved(),
        )
        self.rpc.on_timeout = self._rpc_timed_out
        rpc_factory = RpcServerFactory(
            self.registry, self.rpc_key, cfg.node_id, scope=self.scope, guard=self.rpc_guard
        )
        if self.tls is not None:
            port = self.reactor.listenSSL(
                cfg.cluster_port, rpc_factory, self._tls_options(), interface=cfg.cluster_host
            )
        else:
            port = self.reactor.listenTCP(cfg.cluster_port, rpc_factory, interface=cfg.cluster_host)
        self._ports.append(port)
        udp = self.reactor.listenUDP(cfg.cluster_port, self.protocol, interface=cfg.cluster_host)
        self._ports.append(udp)
        self.udp_rcvbuf = grow_receive_buffer(udp, UDP_RCVBUF)
        self.log.info(
            "node {node} ({kind}) up on {addr}, incarnation {inc}, seeds {seeds}",
            node=cfg.node_id,
            kind=cfg.kind,
            addr=cfg.cluster_address,
            inc=st.incarnation,
            seeds=list(cfg.join),
        )
        super().startService()

    def when_ready(self) -> Deferred[None]:
        """Fires once every child service that says so (:class:`IReady`) listens.

        Errbacks with the first child's :class:`CannotStart` when one cannot (the
        cluster port is bound synchronously in :meth:`startService` and raises
        there).  Call it after the node has started.
        """
        own: Deferred[None] = Deferred()

        def relay(result: object) -> object:
            if self._start_error is not None:
                own.errback(self._start_error)
            else:
                own.callback(None)
            return result

        self._state_durable.addCallback(relay)
        ds = [own] + [child.when_ready() for child in self if IReady.providedBy(child)]
        return gatherResults(ds, consumeErrors=True).addCallbacks(
            lambda _: None, lambda f: f.value.subFailure if isinstance(f.value, FirstError) else f
        )

    def _state_unsaved(self, failure: Failure) -> None:
        """The start-up write of the state failed (already logged by the state file)."""
        self._start_error = CannotStart(
            f"cannot write {self._state_path}: {failure.getErrorMessage()}"
        )

    def stopService(self) -> Deferred[Any]:
        """Stop children first, then the ports; fires once the state is on disk."""
        d = maybeDeferred(super().stopService)

        def close(_: object) -> Deferred[Any]:
            self.rpc.close()
            ports, self._ports = self._ports, []
            return DeferredList([maybeDeferred(p.stopListening) for p in ports], consumeErrors=True)

        def flushed(_: object) -> Deferred[None]:
            # A failed write was logged and counted already; stopping goes on.
            saved = [f.when_saved() for f in self._state_files.values()]
            return DeferredList(saved, consumeErrors=True).addCallback(lambda _: None)

        return d.addCallback(close).addCallback(flushed)

    # --- membership ---------------------------------------------------------------

    def _view_changed(self, old: View, new: View) -> None:
        assert self.core is not None
        self.view_changes += 1
        st = self.state
        if new.epoch > self._durable_reserved:
            self._write_floor(new.epoch + EPOCH_HEADROOM)
        st.epoch = new.epoch
        st.lamport = self.core.lamport
        st.known = self.core.known_addresses()
        self._save_state()
        self.log.info(
            "membership: epoch {epoch}, coordinator {coord}, members {members}",
            epoch=new.epoch,
            coord=new.coordinator,
            members=list(new.node_ids),
        )
        self._log_joins_and_leaves(old, new)
        for listener in list(self._listeners):
            try:
                listener.membership_changed(old, new)
            except Exception:
                self.log.failure("membership listener {l!r} failed", l=listener)

    def _log_joins_and_leaves(self, old: View, new: View) -> None:
        """One line per member that joined, restarted or left, with the reason."""
        if not old.members:
            return  # this node's first view: its start-up line said enough
        me = self.node_id
        accused = self.core.last_accused if self.core is not None else None
        for m in new.members:
            before = old.member(m.node_id)
            if m.node_id == me:
                continue
            if before is None:
                self.log.info(
                    "membership: node {node} joined at {addr} (epoch {epoch})",
                    node=m.node_id,
                    addr=m.address,
                    epoch=new.epoch,
                    event="node_joined",
                )
            elif before.incarnation != m.incarnation or before.address != m.address:
                self.log.info(
                    "membership: node {node} rejoined at {addr} (epoch {epoch}): "
                    "restarted since the last view",
                    node=m.node_id,
                    addr=m.address,
                    epoch=new.epoch,
                    event="node_joined",
                )
        for m in old.members:
            if new.member(m.node_id) is not None or m.node_id == me:
                continue
            if m.node_id == accused:
                reason = "it stopped answering this node's pings"
            elif new.coordinator == me:
                reason = "it did not answer this node's view round"
            else:
                reason = f"not in the view {new.coordinator} committed (another member's suspicion)"
            self.log.warn(
                "membership: node {node} left (epoch {epoch}): {reason}",
                node=m.node_id,
                epoch=new.epoch,
                reason=reason,
                event="node_left",
            )

    # --- persistence ----------------------------------------------------------------
    # A few hundred bytes written only on view changes, off the reactor through
    # :attr:`state_file` (one write at a time, the newest state wins); fsynced so that
    # a node's epoch never goes back across a crash.

    def _load_state(self) -> _Persisted:
        scope = self.scope
        floor = self._load_floor()
        try:
            raw = json.loads(self._state_path.read_text())
            state = _Persisted(
                int(raw["epoch"]),
                int(raw["lamport"]),
                int(raw["incarnation"]),
                [str(a) for a in raw["known"]],
                str(raw.get("cluster", "")),
                str(raw.get("kind", "")),
                max(int(raw.get("reserved", 0)), floor),
            )
        except FileNotFoundError:
            return _Persisted(cluster=scope.cluster, kind=scope.kind, reserved=floor)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{self._state_path} is corrupt ({e}); move it away to reset") from e
        if state.kind and state.kind != scope.kind:
            raise ConfigError(
                f"{self._state_path} belongs to a {state.kind} node, not a {scope.kind} one"
            )
        if (state.cluster, state.kind) != (scope.cluster, scope.kind):
            # Written before clusters had names (or under another name): the addresses
            # it remembers may be another cluster's, so start from --join alone.
            self.log.info(
                "membership: forgetting {n} remembered address(es) of cluster {old!r}",
                n=len(state.known),
                old=state.cluster,
            )
            state.known = []
            state.cluster, state.kind = scope.cluster, scope.kind
        return state

    def _save_state(self) -> None:
        """Queue the current state for writing (snapshot now, serialise and write in
        the pool)."""
        st = self.state
        st.reserved = max(st.reserved, st.epoch + EPOCH_HEADROOM)
        # Flat fields (``known`` is a list of str): no recursive asdict per save.
        snapshot = attrs.asdict(st, recurse=False)
        snapshot["known"] = list(snapshot["known"])
        self.state_file.save(lambda: json.dumps(snapshot).encode())
        reserved = st.reserved

        def durable(_: object) -> None:
            self._durable_reserved = max(self._durable_reserved, reserved)

        # (A failed write is logged and counted by the state file.)
        self.state_file.when_saved().addCallbacks(durable, lambda _: None)

    def _load_floor(self) -> int:
        try:
            return int(json.loads(self._floor_path.read_text())["reserved"])
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{self._floor_path} is corrupt ({e}); move it away to reset") from e

    def _write_floor(self, reserved: int) -> None:
        """Reserve epochs up to ``reserved`` on disk now, on the reactor thread.

        Only when a view's epoch passes every reservation known to be durable: the
        epoch jumped by more than EPOCH_HEADROOM while a write was in flight (or
        the writes fail).  A node that crashes before the pool's write would
        otherwise restart below an epoch its listeners saw."""
        self.floor_writes += 1
        data = json.dumps({"reserved": reserved}).encode()
        try:
            write_atomically(self._floor_path, data, durable=True)
        except OSError:
            self.floor_write_failures += 1
            self.log.failure("cannot write {path}", path=str(self._floor_path))
            return
        self._durable_reserved = max(self._durable_reserved, reserved)
        self.state.reserved = max(self.state.reserved, reserved)
