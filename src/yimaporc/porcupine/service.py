"""The mail service of a Porcupine node: managers, proxies and SMTP/POP3/IMAP listeners.

``MailService(reactor, node_id=..., data_dir=..., domain=..., smtp=..., pop3=...,
imap=...)`` is a ``MultiService``: on start it recovers the fragment store (drops
anything half-stored), seeds the user manager's fragment lists from this
node's hard state, then listens on the given server endpoint strings.  It
gives the admin API its routes (``/api/mail/users...``) and the status page
its ``status()``.

All disk, SQLite and scrypt work runs on a thread pool (its own unless one is
passed in).  The managers are reached through ``users_for(address)`` and
``mailboxes_for(node_id)`` of the :class:`~.interfaces.IMailTopology` the service
is built with: :class:`~.topology.LocalTopology` (the default, a node alone) or
:class:`~.cluster.MailCluster` (AMP-backed proxies behind the same calls), chosen
by the composition root (:mod:`~.node`) together with the :class:`~.storage.MailStorage`
and replication's hooks; none is replaced later.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import MultiService
from twisted.cred import portal
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IOpenSSLContextFactory,
    IResolver,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from .._reactor import INodeReactor
from ..admin.routes import Route
from ..cluster.histogram import Histogram
from ..cluster.listening import CannotStart, IReady, ListeningService
from ..imap import ImapServerProtocol, Limits
from ._cluster_profiles import ProfileReplicator
from ._guard import ClientErrors
from ._pop3 import MailPOP3
from ._smtp import MailESMTP
from .auth import MailRealm, ManagerChecker, SlotWaiters, ThrottledPortal
from .authcache import DEFAULT_SIZE, DEFAULT_TTL
from .bodycache import DEFAULT_MAX_BYTES as DEFAULT_BODY_CACHE_BYTES
from .delivery import (
    DeliveryProxy,
    OutboundSpool,
    Recipient,
    SmtpDelivery,
    SmtpPolicy,
    with_return_path,
)
from .fragments import MailboxManager
from .imap_backend import PorcupineImapBackend
from .imap_server import PorcupineImapFactory
from .interfaces import ILocalMailboxes, IMailboxManager, IMailTopology, IUserManager
from .mailadmin import MailAdmin
from .mailindex import DEFAULT_MAX_ROWS
from .outbound import OutboundSender, RetryPolicy, Routes
from .retrieval import ICopyPolicy, IMailLayout, RetrievalProxy
from .storage import MailStorage
from .throttle import AuthThrottle, ThrottlePolicy
from .topology import LocalTopology
from .usermap import normalise
from .values import Profile

if TYPE_CHECKING:
    from .replication.mail import MailReplication

DEFAULT_MAX_MESSAGE_SIZE = 25 << 20
_DOMAIN = re.compile(r"^[a-z0-9-]+(\.[a-z0-9-]+)*$")


class _ProtocolFactory(Factory):
    def __init__(self, build: Callable[[IAddress | None], Protocol]) -> None:
        self.build = build

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        p: Protocol = self.build(addr)
        p.factory = self
        return p


def _peer_host(addr: IAddress | None) -> str:
    host = getattr(addr, "host", None)
    return host if isinstance(host, str) else str(addr)


@implementer(IOpenSSLContextFactory)
class _ServerTLS:
    """A server TLS context from PEM files (TLS 1.2+), for STARTTLS and STLS."""

    def __init__(self, cert: Path, key: Path) -> None:
        from OpenSSL import SSL

        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.use_certificate_chain_file(str(cert))
        ctx.use_privatekey_file(str(key))
        ctx.check_privatekey()
        self._ctx = ctx

    def getContext(self) -> Any:
        """The one shared context."""
        return self._ctx


def _own_tls(endpoint: str | None) -> bool:
    """True if ``endpoint`` is an ``ssl:`` endpoint (it brings its certificate)."""
    return bool(endpoint) and str(endpoint).split(":", 1)[0] == "ssl"


@implementer(IReady)
class MailService(MultiService):
    """SMTP, POP3 and IMAP of one Porcupine node, over its managers."""

    log = Logger()

    def __init__(
        self,
        reactor: INodeReactor,
        *,
        node_id: str,
        data_dir: Path | str,
        domain: str,
        smtp: str | None = None,
        pop3: str | None = None,
        imap: str | None = None,
        tls_cert: Path | str | None = None,
        tls_key: Path | str | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        relay_domains: Sequence[str] = (),
        threadpool: ThreadPool | None = None,
        auth_throttle: ThrottlePolicy | None = None,
        submission: str | None = None,
        submissions: str | None = None,
        routes: Routes | None = None,
        resolver: IResolver | None = None,
        retry: RetryPolicy | None = None,
        pop3s: str | None = None,
        imaps: str | None = None,
        allow_plaintext_auth: bool = False,
        other_domains: Sequence[str] = (),
        mail_index_rows: int = DEFAULT_MAX_ROWS,
        mail_body_cache_bytes: int = DEFAULT_BODY_CACHE_BYTES,
        auth_cache_ttl: float = DEFAULT_TTL,
        auth_cache_size: int = DEFAULT_SIZE,
        delivery_latency: Histogram | None = None,
        storage: MailStorage | None = None,
        topology: IMailTopology | None = None,
        replica: MailReplication | None = None,
        layout: IMailLayout | None = None,
        copy_policy: ICopyPolicy | None = None,
        forward_deliveries: bool = False,
    ) -> None:
        super().__init__()
        domain = domain.strip().lower()
        others = tuple(d.strip().lower() for d in other_domains if d.strip().lower() != domain)
        for name in (domain, *others):
            if not _DOMAIN.match(name):
                raise ValueError(f"not a mail domain: {name!r}")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if max_message_size < 1024:
            raise ValueError("max_message_size must be at least 1024 bytes")
        self.reactor = reactor
        self.node_id = node_id
        self.domain = domain
        self.data_dir = Path(data_dir)
        self.endpoints = {
            "smtp": smtp,
            "pop3": pop3,
            "imap": imap,
            "submission": submission,
            "submissions": submissions,
            "pop3s": pop3s,
            "imaps": imaps,
        }
        # Parsed now: a bad endpoint string is a ValueError here, not a failed start.
        self._parsed: dict[str, IStreamServerEndpoint] = {}
        for name, description in self.endpoints.items():
            if description:
                try:
                    self._parsed[name] = serverFromString(reactor, description)
                except (ValueError, KeyError, TypeError, OSError) as e:
                    raise ValueError(f"--{name} {description!r}: {e}") from e
        if (submission or submissions) and tls_cert is None and not _own_tls(submissions):
            raise ValueError(
                "--submission/--submissions need --tls-cert/--tls-key (AUTH is TLS-only)"
            )
        for name, endpoint in (("pop3s", pop3s), ("imaps", imaps)):
            if endpoint and tls_cert is None and not _own_tls(endpoint):
                raise ValueError(f"--{name} needs --tls-cert/--tls-key or an ssl: endpoint")
        self.allow_plaintext_auth = allow_plaintext_auth
        self.max_message_size = max_message_size
        self.tls = self._tls_options(tls_cert, tls_key) if tls_cert and tls_key else None
        #: The certificate and key files (mail workers load them again).
        self.tls_files = (Path(tls_cert), Path(tls_key)) if tls_cert and tls_key else None
        now = reactor.seconds
        #: This node's mail on disk (built here for a node alone; the composition
        #: root builds it first and passes it, with the strategies over it).
        self.storage = storage or MailStorage(
            reactor,
            node_id,
            self.data_dir,
            threadpool=threadpool,
            mail_index_rows=mail_index_rows,
            mail_body_cache_bytes=mail_body_cache_bytes,
            auth_cache_ttl=auth_cache_ttl,
            auth_cache_size=auth_cache_size,
        )
        self.pool = self.storage.pool
        self.fragment_store = self.storage.fragment_store
        self.mail_index = self.storage.mail_index
        self.body_cache = self.storage.body_cache
        self.profiles = self.storage.profiles
        self.registry = self.storage.registry
        #: This node's mailboxes as its users' sessions reach them (replicated or not).
        self.mailbox_manager: ILocalMailboxes = (
            replica.mailboxes if replica is not None else self.storage.mailbox_manager
        )
        # the local manager checkpoints the group-commit journal (also when only
        # replicas write here)
        self._checkpoints = LoopingCall(self._local_boxes_checkpoint, self.storage.mailbox_manager)
        self._checkpoints.clock = reactor
        #: Where managers are: this node alone, or the cluster (chosen by the caller).
        self.topology: IMailTopology = topology or LocalTopology(
            node_id, self.profiles, self.mailbox_manager
        )
        self.user_manager = self.topology.user_manager
        #: The one profile write path (pushed to the other nodes in a cluster).
        self.replicator: ProfileReplicator = self.topology.replicator
        balancer = self.topology.balancer
        self.delivery = DeliveryProxy(
            node_id,
            self.topology.users_for,
            self.topology.mailboxes_for,
            self.topology.live,
            now,
            balancer=balancer,
            replicated=replica.store if replica is not None else None,
            # A cluster hands R=1 deliveries to the user's manager node: one call
            # instead of plan, store and add_fragment (docs/mail.md, "The hand-over").
            forward=getattr(self.topology, "forward_delivery", None)
            if forward_deliveries
            else None,
            manager_lease=getattr(self.topology, "manager_lease", None),
        )
        serve = getattr(self.topology, "serve_deliveries", None)
        if serve is not None:  # a cluster: answer nodes that hand deliveries over
            serve(self.delivery.deliver_forwarded)
        #: Logins open their mail with the strategies the caller chose (default: this
        #: node alone, one copy of each message; the composition root chooses the
        #: cluster's :class:`~.retrieval.Fragmented` and, with replication,
        #: :class:`~.retrieval.ReplicatedCopies`).
        self.retrieval = RetrievalProxy(
            node_id,
            self.topology.users_for,
            self.topology.mailboxes_for,
            layout=layout,
            copy_policy=copy_policy,
            local=self.mailbox_manager,
        )
        self.spool = OutboundSpool(reactor, self.pool, self.data_dir / "mail" / "outbound")
        self.policy = SmtpPolicy(
            domain=domain,
            hostname=f"{node_id}.{domain}" if re.match(r"^[A-Za-z0-9-]+$", node_id) else domain,
            max_message_size=max_message_size,
            relay_domains=tuple(d.lower() for d in relay_domains),
            other_domains=others,
        )
        #: Submission listeners: AUTH before MAIL, own address only, any destination.
        self.submission_policy = attrs.evolve(self.policy, submission=True)
        self.outbound = OutboundSender(
            reactor,
            self.pool,
            self.spool.root,
            self.policy.hostname,
            self._bounce,
            routes,
            resolver,
            retry,
        )
        self.outbound.setServiceParent(self)
        #: POP3/IMAP client mistakes and server errors (``client_errors`` in status).
        self.client_errors = ClientErrors(now)
        realm = MailRealm(self.retrieval, self.delivery, self.policy, now)
        self.portal = portal.Portal(realm, [ManagerChecker(self.retrieval, domain)])
        #: Shared by IMAP, POP3 and SMTP AUTH: per address and per account.
        self.throttle = AuthThrottle(auth_throttle)
        #: Logins waiting for a password-check slot of their address.
        self.slot_waiters = SlotWaiters(reactor)
        self.factories: dict[str, Factory] = {
            "smtp": _ProtocolFactory(self._smtp_protocol),
            "pop3": _ProtocolFactory(self._pop3_protocol),
            "imap": self._imap_factory(implicit_tls=False),
            "submission": _ProtocolFactory(
                lambda addr: self._smtp_protocol(addr, self.submission_policy)
            ),
            "pop3s": self._implicit_tls(_ProtocolFactory(self._pop3_protocol), pop3s),
            "imaps": self._implicit_tls(self._imap_factory(implicit_tls=True), imaps),
            "submissions": self._implicit_tls(
                _ProtocolFactory(lambda addr: self._smtp_protocol(addr, self.submission_policy)),
                submissions,
            ),
        }
        self.ports: dict[str, IListeningPort] = {}
        #: One :class:`ListeningService` per endpoint, children once the store recovered.
        self.listeners: dict[str, ListeningService] = {}
        self._ready: Deferred[Any] | None = None
        self._start_error: Failure | None = None
        self.delivered = 0
        #: Seconds from a message's final dot to its 250 (the node's histogram).
        self.delivery_latency = delivery_latency

    # --- wiring ---------------------------------------------------------------------

    @staticmethod
    def _tls_options(cert: Path | str, key: Path | str) -> Any:
        return _ServerTLS(Path(cert), Path(key))

    def _run_blocking(self, f: Any, *args: Any) -> Deferred[Any]:
        """Run blocking ``f(*args)`` on the service's thread pool."""
        return self.storage.run_blocking(f, *args)

    def users_for(self, address: str) -> IUserManager:
        """The user manager of ``address``'s bucket (this node's, or the cluster's choice)."""
        return self.topology.users_for(address)

    def mailboxes_for(self, node_id: str) -> IMailboxManager:
        """The mailbox manager of ``node_id`` (``KeyError``: none for that node)."""
        return self.topology.mailboxes_for(node_id)

    def _deliver(self, sender: bytes, recipients: list[Recipient], body: bytes) -> Deferred[object]:
        local = [r.address for r in recipients if not r.relay]
        relay = [r.address for r in recipients if r.relay]
        ds: list[Deferred[Any]] = []
        if local:
            ds.append(self.delivery.deliver(local, with_return_path(sender, body)))
        if relay:
            origin = sender.decode("utf-8", "replace")
            queued = self.spool.enqueue(origin, relay, body)
            ds.append(queued.addCallback(self.outbound.queued, origin, relay))

        def done(result: object) -> object:
            self.delivered += 1
            return result

        return gatherResults(ds, consumeErrors=True).addCallbacks(done, _first)

    def _challengers(self) -> dict[bytes, Any]:
        if self.tls is None:
            return {}
        return {b"LOGIN": imap4.LOGINCredentials, b"PLAIN": imap4.PLAINCredentials}

    def _portal_for(self, p: Protocol, addr: IAddress | None) -> Any:
        """This connection's throttled way to the portal (closes it after repeated failures)."""

        def close() -> None:
            if p.transport is None:
                return
            if isinstance(p, ImapServerProtocol):
                p.close()  # unregisters its producer first
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

    def _bounce(self, sender: bytes, rcpt: str, body: bytes) -> Deferred[object]:
        """Deliver a delivery status notification to ``rcpt`` (local, or queued out)."""
        d: Deferred[Any]
        if self.policy.is_local(rcpt.rpartition("@")[2]):
            d = maybeDeferred(normalise, rcpt).addCallback(
                lambda address: self.delivery.deliver([address], with_return_path(sender, body))
            )
        else:
            d = self.spool.enqueue("", [rcpt], body)
            d.addCallback(self.outbound.queued, "", [rcpt])

        def lost(f: Failure) -> None:
            self.log.warn("mail: bounce to {rcpt} not delivered: {e}", rcpt=rcpt, e=f.value)

        return d.addErrback(lost)

    def _implicit_tls(self, factory: Factory, endpoint: str | None) -> Factory:
        """``factory`` behind TLS from --tls-cert, unless ``endpoint`` brings its own (ssl:)."""
        if endpoint is None or _own_tls(endpoint) or self.tls is None:
            return factory
        from twisted.protocols.tls import TLSMemoryBIOFactory

        return TLSMemoryBIOFactory(self.tls, False, factory)  # type: ignore[return-value]

    def _smtp_protocol(
        self, addr: IAddress | None = None, policy: SmtpPolicy | None = None
    ) -> MailESMTP:
        policy = policy or self.policy
        p = MailESMTP(
            self.reactor,
            policy,
            self._deliver,
            self._challengers(),
            self.tls,
            counters=self.client_errors.counts,
            stats=self.client_errors,
            on_stored=self._stored_in,
        )
        p.delivery = SmtpDelivery(self.delivery, policy, self.reactor.seconds)
        p.portal = self._portal_for(p, addr)
        return p

    def _stored_in(self, seconds: float) -> None:
        if self.delivery_latency is not None:
            self.delivery_latency.observe(seconds)

    def _pop3_protocol(self, addr: IAddress | None = None) -> MailPOP3:
        p = MailPOP3(self.reactor, self.tls, self.client_errors, self.allow_plaintext_auth)
        p.portal = self._portal_for(p, addr)
        return p

    def _imap_factory(self, implicit_tls: bool) -> PorcupineImapFactory:
        """IMAP (``yimaporc.imap``) over this node's mail; one backend per connection."""
        shared = PorcupineImapBackend(self.portal, self.registry, self.reactor, self.client_errors)
        return PorcupineImapFactory(
            shared,
            self._portal_for,
            self.client_errors,
            self.reactor,
            limits=Limits(
                max_append=self.max_message_size,
                max_command=max(self.max_message_size + 2**20, Limits().max_command),
                max_buffer=max(self.max_message_size + 2**21, Limits().max_buffer),
            ),
            tls=None if implicit_tls else self.tls,
            plaintext_auth=self.tls is None or self.allow_plaintext_auth,
            implicit_tls=implicit_tls,
            greeting=f"{self.policy.hostname} yimaporc IMAP4rev1",
        )

    # --- life cycle ----------------------------------------------------------------

    def startService(self) -> None:
        """Start the pool, recover the store, seed fragment lists, then listen."""
        super().startService()
        self.storage.start()
        if self.tls is None and any(self.endpoints[n] for n in ("pop3", "imap")):
            self.log.warn(
                "mail: no --tls-cert/--tls-key: IMAP and POP3 passwords cross the network "
                "in clear (fine on loopback only; status shows plaintext_passwords)"
            )
        d = self.storage.recover()
        self._start_error = None
        d.addCallback(self._listen_all)
        d.addErrback(self._start_failed)
        self._ready = d  # never fails: the outcome is in _start_error

    @staticmethod
    def _local_boxes_checkpoint(manager: MailboxManager) -> None:
        manager.maybe_checkpoint()

    def _listen_all(self, users: list[str]) -> Deferred[None]:
        self.user_manager.seed(self.node_id, users)
        if not self._checkpoints.running:
            self._checkpoints.start(1.0, now=False)
        ds = []
        if not self.running:  # stopped while recovering
            return succeed(None)
        for name, endpoint in self._parsed.items():
            label = f"--{name} {self.endpoints[name]}"
            listening = self.listeners[name] = ListeningService(
                endpoint, self.factories[name], label
            )
            listening.setServiceParent(self)  # we are running: it listens now
            ds.append(listening.when_ready().addCallback(self._listening, name, listening))
        return gatherResults(ds, consumeErrors=True).addCallbacks(lambda _: None, _first)

    def _listening(self, _: object, name: str, listening: ListeningService) -> None:
        assert listening.port is not None
        self.ports[name] = listening.port
        self.log.info("mail: {name} on {addr}", name=name, addr=self.address_of(name))

    def _start_failed(self, f: Failure) -> None:
        if not f.check(CannotStart):  # (a port that cannot be bound: logged already)
            self.log.failure("mail: cannot start", f)
        self._start_error = f

    def when_ready(self) -> Deferred[None]:
        """Fires once every endpoint listens (errback if one cannot)."""
        if self._ready is None:
            raise RuntimeError("service not started")
        d: Deferred[None] = Deferred()

        def relay(result: object) -> object:
            if self._start_error is not None:
                d.errback(self._start_error)
            else:
                d.callback(None)
            return result

        self._ready.addCallback(relay)
        return d

    def address_of(self, name: str) -> str:
        """``host:port`` a protocol listens on."""
        host = self.ports[name].getHost()
        return f"{host.host}:{host.port}"  # type: ignore[attr-defined]

    def stopService(self) -> Deferred[None]:
        """Stop listening (the listeners are children), then the pool (if ours) and the
        databases."""
        self.ports = {}
        if self._checkpoints.running:
            self._checkpoints.stop()
        d: Deferred[Any] = maybeDeferred(super().stopService)

        def disown(_: object) -> None:
            for listening in self.listeners.values():  # the next start makes new ones
                self.removeService(listening)
            self.listeners = {}

        d.addCallback(disown)

        def close(_: object) -> None:
            self.storage.close()

        return d.addCallback(close)

    # --- status and admin ------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``users`` (count), ``domain`` and the mail endpoints listening."""
        return {
            "users": self.profiles.count(),
            "domain": self.domain,
            "domains": [self.domain, *self.policy.other_domains],
            "mail": {name: self.address_of(name) for name in self.ports},
            "messages_accepted": self.delivered,
            "delivery": self.delivery.status(),
            "group_commit": self.fragment_store.commit_stats(),
            "auth": {**self.throttle.status(), **self.profiles.auth_cache.status()},
            "client_errors": self.client_errors.status(),
            "mail_sessions": self.client_errors.activity(),
            # commands refused for the session's sake, by reason (validity_unknown,
            # reserve_wait_lapsed), and APPEND/COPY waits for a new manager (reserve_waits)
            "mail_refusals": dict(self.retrieval.counts),
            "imap_open_mailboxes": self.registry.count(),
            "mail_index": self.mail_index.status(),
            "mail_body_cache": self.body_cache.status(),
            "outbound": self.outbound.status(),
            # No certificate: IMAP LOGIN, POP3 USER/PASS (and SMTP AUTH is off) in clear.
            "plaintext_passwords": self.tls is None,
        }

    def admin_routes(self) -> list[Route]:
        """``/api/mail/users...`` and ``/api/mail/queue...`` (:class:`~.mailadmin.MailAdmin`)."""
        return MailAdmin(self).routes()

    def add_user(self, address: str, password: str, replicas: int = 1) -> Deferred[Profile]:
        """Create a user (cluster-wide when attached to a cluster); fails with UserExists."""
        return self.replicator.add(normalise(address), password, replicas)


def _first(f: Failure) -> Failure:
    from twisted.internet.defer import FirstError

    err = f.value
    if isinstance(err, FirstError):
        sub: Failure = err.subFailure
        return sub
    return f
