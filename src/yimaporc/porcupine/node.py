"""The Porcupine composition root: one mail node's whole graph, built once.

:meth:`PorcupineNode.from_config` chooses every collaborator up front (the cluster
node and its user map, the mail service with its listeners, replication or not,
the cluster wiring, the admin site) and wires them in one place.  The twistd
plugin (:mod:`yimaporc.tap.porcupine`) only turns options into a
:class:`PorcupineConfig` and calls it; an application embedding a mail node calls
the same::

    node = PorcupineNode.from_config(reactor, PorcupineConfig(NodeConfig(...), secret,
                                                              domains=("example.org",)))
    node.service.setServiceParent(application)
    node.when_ready().addErrback(...)   # a port that cannot be bound: your call

Every listener (SMTP, submission, POP3, IMAP, their TLS forms, admin) is a
:class:`~yimaporc.cluster.listening.ListeningService`: :meth:`when_ready` fails with
:class:`~yimaporc.cluster.listening.CannotStart` naming the option; the node never
stops the reactor (only the tap does).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.python.threadpool import ThreadPool

from .._reactor import INodeReactor
from ..admin.mount import admin_endpoint, mount_admin
from ..cluster.bucketservice import BucketMapService
from ..cluster.histogram import DELIVERY_BUCKETS
from ..cluster.listening import ListeningService
from ..cluster.node import ClusterNode, ConfigError, NodeConfig
from ..cluster.routes import Route
from ._mailworkers import MAX_WORKERS as MAX_MAIL_WORKERS
from ._mailworkers import MailWorkers, merge_worker_totals
from .authcache import DEFAULT_SIZE, DEFAULT_TTL
from .bodycache import DEFAULT_MAX_BYTES as DEFAULT_BODY_CACHE_BYTES
from .cluster import MailCluster
from .mailindex import DEFAULT_MAX_ROWS
from .outbound import RetryPolicy, Routes
from .replication import ReplicationConfig
from .replication.mail import DEFAULT_CONFIG, MailReplication
from .retrieval import Fragmented, ICopyPolicy, ReplicatedCopies, SingleCopies
from .service import DEFAULT_MAX_MESSAGE_SIZE, MailService
from .storage import MailStorage
from .throttle import ThrottlePolicy

__all__ = ["PorcupineConfig", "PorcupineNode"]


def _domains(value: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for d in value:
        d = d.strip().lower()
        if d and d not in out:
            out.append(d)
    return tuple(out)


@attrs.frozen
class PorcupineConfig:
    """Everything a Porcupine node is built from (the tap's options, checked)."""

    node: NodeConfig
    secret: bytes = attrs.field(repr=False)
    #: The mail domains served; the first is the default for logins without @domain.
    domains: tuple[str, ...] = attrs.field(default=(), converter=_domains)
    #: Server endpoint strings of the mail listeners (none: not served here).
    smtp: str | None = None
    submission: str | None = None
    submissions: str | None = None
    pop3: str | None = None
    pop3s: str | None = None
    imap: str | None = None
    imaps: str | None = None
    #: Admin API server endpoint string (none: no admin site).
    admin: str | None = None
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    #: Replication's tunables; None: every message is a single copy (no update log).
    replication: ReplicationConfig | None = DEFAULT_CONFIG
    auth_throttle: ThrottlePolicy | None = None
    auth_cache_ttl: float = DEFAULT_TTL
    auth_cache_size: int = DEFAULT_SIZE
    routes: Routes | None = None
    retry: RetryPolicy | None = None
    allow_plaintext_auth: bool = False
    #: Hand R=1 deliveries to the user's manager node (docs/mail.md, "The hand-over").
    forward_deliveries: bool = False
    mail_index_rows: int = DEFAULT_MAX_ROWS
    mail_body_cache_bytes: int = DEFAULT_BODY_CACHE_BYTES
    #: POP3/IMAP worker processes (``--mail-workers``; 0: the main serves them).
    mail_workers: int = 0

    def __attrs_post_init__(self) -> None:
        if not self.domains:
            raise ConfigError("--domain is required")
        if not 0 <= self.mail_workers <= MAX_MAIL_WORKERS:
            raise ConfigError(f"--mail-workers must be 0 to {MAX_MAIL_WORKERS}")
        if (self.node.tls_cert is None) != (self.node.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")


class PorcupineNode:
    """One Porcupine node: a :class:`ClusterNode` with its user map, mail service,
    replication (if configured), cluster wiring and admin site as children.

    The children start in this order: ``first`` (e.g. the tap's user switch), the
    admin site, the user map, the mail service (recovers its store, then listens),
    replication, the cluster wiring.  :attr:`service` is what to run.
    """

    def __init__(
        self,
        node: ClusterNode,
        user_map: BucketMapService,
        mail: MailService,
        cluster: MailCluster,
        replication: MailReplication | None = None,
        *,
        admin: ListeningService | None = None,
        workers: MailWorkers | None = None,
    ) -> None:
        self.node = node
        #: The POP3/IMAP worker processes (``--mail-workers``), if any.
        self.workers = workers
        self.user_map = user_map
        self.mail = mail
        self.cluster = cluster
        self.replication = replication
        self.admin = admin

    @classmethod
    def from_config(
        cls,
        reactor: INodeReactor,
        config: PorcupineConfig,
        *,
        rng: random.Random | None = None,
        first: Iterable[IService] = (),
        threadpool: ThreadPool | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> PorcupineNode:
        """Build the whole node from ``config`` (raises :class:`ConfigError` on bad
        input, before anything listens).

        ``rng`` seeds the node, each part drawing its own generator from it (default:
        the system's random source); ``first`` are services started before any port is
        bound; ``threadpool`` runs the disk, SQLite and scrypt work (default: the mail
        storage's own pool); ``wall_clock`` seeds the membership incarnation.
        """
        rng = rng or random.SystemRandom()
        admin = admin_endpoint(reactor, config.admin) if config.admin else None
        node = ClusterNode(
            reactor,
            config.node,
            config.secret,
            rng=random.Random(rng.getrandbits(64)),
            wall_clock=wall_clock,
            threadpool=threadpool,
        )
        for service in first:
            service.setServiceParent(node)
        admin_listening = mount_admin(node, admin, label=f"--admin {config.admin}")
        user_map = BucketMapService(node)
        node.add_status(user_map.status)
        node.add_route(Route("GET", "/api/buckets", user_map.owners, mutates=False))
        # The disk first; then the strategies chosen over it (replicated or not, the
        # cluster); then the mail service built with them. Nothing is swapped later.
        storage = MailStorage(
            reactor,
            node.node_id,
            config.node.data_dir,
            threadpool=threadpool,
            mail_index_rows=config.mail_index_rows,
            mail_body_cache_bytes=config.mail_body_cache_bytes,
            auth_cache_ttl=config.auth_cache_ttl,
            auth_cache_size=config.auth_cache_size,
        )
        replication = None
        if config.replication is not None:
            replication = MailReplication(
                storage, node, config=config.replication, rng=random.Random(rng.getrandbits(64))
            )
        cluster = MailCluster(
            storage, node, user_map, replication=replication, rng=random.Random(rng.getrandbits(64))
        )
        if replication is not None:
            replication.use_topology(cluster)
        # How logins see their mail: fragments over the cluster (the tree at the home
        # the cluster chooses); with replication, each message read from its least
        # loaded holder and changed on one holder.
        layout = Fragmented(
            cluster.home_of, now=reactor.seconds, replica=replication, clock=reactor
        )
        copy_policy: ICopyPolicy = SingleCopies()
        if replication is not None:
            balancer = cluster.balancer
            copy_policy = ReplicatedCopies(lambda n: balancer.load_of(n, reactor.seconds()))
        try:
            mail = MailService(
                reactor,
                node_id=node.node_id,
                data_dir=config.node.data_dir,
                domain=config.domains[0],
                other_domains=config.domains[1:],
                tls_cert=config.node.tls_cert,
                tls_key=config.node.tls_key,
                max_message_size=config.max_message_size,
                auth_throttle=config.auth_throttle,
                routes=config.routes,
                retry=config.retry,
                allow_plaintext_auth=config.allow_plaintext_auth,
                forward_deliveries=config.forward_deliveries,
                delivery_latency=node.histograms.get(
                    "yimaporc_mail_delivery_duration_seconds",
                    "Seconds from the end of a message's SMTP DATA to its 250 (stored "
                    "durably, on --acks-before-reply copies).",
                    DELIVERY_BUCKETS,
                ),
                smtp=config.smtp,
                submission=config.submission,
                submissions=config.submissions,
                pop3=config.pop3,
                pop3s=config.pop3s,
                imap=config.imap,
                imaps=config.imaps,
                storage=storage,
                topology=cluster,
                replica=replication,
                layout=layout,
                copy_policy=copy_policy,
            )
        except ValueError as e:
            if replication is not None:
                replication.log_store.close()
                replication.objects.close()
            storage.close()
            raise ConfigError(str(e)) from e
        # Started in this order: mail (recovers the store, then listens), replication
        # (after the recovery), the cluster wiring.
        mail.setServiceParent(node)
        workers = None
        if config.mail_workers:
            workers = MailWorkers(
                reactor, mail, cluster, config.mail_workers, replication=replication
            )
            workers.setServiceParent(node)  # after the mail service: its ports first
            node.add_status(workers.status)
        if replication is not None:
            replication.setServiceParent(node)
        cluster.setServiceParent(node)
        node.add_status(cluster.status)
        for route in mail.admin_routes():
            node.add_route(route)

        def mail_status() -> dict[str, Any]:
            doc = mail.status()
            if workers is not None:  # the sessions the workers served count too
                doc = merge_worker_totals(doc, workers.totals())
            return {**doc, "services": dict(doc.get("mail", {}))}

        node.add_status(mail_status)
        return cls(
            node, user_map, mail, cluster, replication, admin=admin_listening, workers=workers
        )

    @property
    def service(self) -> ClusterNode:
        """The service to run (the cluster node, parent of every other part)."""
        return self.node

    @property
    def data_dir(self) -> Path:
        """Where the node keeps its state."""
        return Path(self.node.config.data_dir)

    def when_ready(self) -> Deferred[None]:
        """Fires once every port listens; errbacks with ``CannotStart`` if one cannot."""
        return self.node.when_ready()

    def address_of(self, name: str) -> str:
        """``host:port`` a mail listener (``smtp``, ``imap``...) is bound to, once ready."""
        return self.mail.address_of(name)
