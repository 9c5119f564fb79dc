"""The Yima composition root: one node's whole graph, built once.

:meth:`YimaNode.from_config` chooses every collaborator up front (the cluster
node, the storage service with its thread pool and layout workers, the
streaming service with its RTSP endpoint, the admin site) and wires them in one
place; nothing is switched on or replaced after construction.  The twistd plugin
(:mod:`yimaporc.tap.yima`) only turns options into a :class:`YimaConfig` and
calls it; an application embedding Yima calls the same::

    node = YimaNode.from_config(reactor, YimaConfig(NodeConfig(...), secret))
    node.service.setServiceParent(application)
    node.when_ready().addErrback(...)   # a port that cannot be bound: your call

:meth:`YimaNode.__init__` takes collaborators already built (tests and embedders
with their own storage or streaming pass theirs) and does the wiring.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamServerEndpoint

from .._reactor import INodeReactor
from ..admin.mount import admin_endpoint, mount_admin
from ..cluster.listening import ListeningService
from ..cluster.node import ClusterNode, ConfigError, NodeConfig
from ..cluster.statefile import Pool
from ._rtsp_plan import SEND_AHEAD
from ._rtsp_relay import MAX_RELAY_BATCH, RELAY_BATCH
from .rtspservice import YimaStreamingService
from .storage import YimaStorageService
from .streaming import DEFAULT_CACHE_BYTES
from .workers import default_workers

__all__ = ["MODES", "YimaConfig", "YimaNode"]

#: Delivery designs: bipartite (Yima-2) or master-slave (Yima-1).
MODES = ("bipartite", "master-slave")


def _disks(
    value: Iterable[tuple[str | Path, int | None]],
) -> tuple[tuple[str | Path, int | None], ...]:
    return tuple((path, capacity) for path, capacity in value)


@attrs.frozen
class YimaConfig:
    """Everything a Yima node is built from (the tap's options, checked)."""

    node: NodeConfig
    secret: bytes = attrs.field(repr=False)
    #: ``(path, capacity or None)`` per disk; none: one disk under DATA_DIR/disks/0.
    disks: tuple[tuple[str | Path, int | None], ...] = attrs.field(default=(), converter=_disks)
    #: RTSP server endpoint string (none: the node streams for others only).
    rtsp: str | None = None
    #: Admin API server endpoint string (none: no admin site; NodeSummary still answered).
    admin: str | None = None
    mode: str = "bipartite"
    #: :class:`~yimaporc.rtsp.RtspServerFactory` session caps and timeouts.
    rtsp_guards: Mapping[str, Any] = attrs.field(factory=dict)
    #: Worker threads of the storage service's own pool.
    storage_threads: int = 4
    #: How datagrams leave (``--send-path``: auto, gso, sendmmsg or sendto).
    send_path: str = "auto"
    #: Block cache memory bound in bytes (``--block-cache-mb``).
    cache_bytes: int = DEFAULT_CACHE_BYTES
    #: Delivery worker processes (``--workers``, default auto: one per core, at most 8;
    #: 0 or 1: delivery in this process).
    workers: int = attrs.field(factory=default_workers)
    #: Seconds a delivery tick looks ahead (``--send-ahead-ms``): a session's packets
    #: due within it leave together, in one send; none leaves more than this early.
    send_ahead: float = SEND_AHEAD
    #: Seconds a relay release looks ahead (``--relay-send-ahead-ms``): a relayed
    #: session's packets due within it are forwarded together, none more than this early.
    relay_send_ahead: float = SEND_AHEAD
    #: Seconds of a relayed session's packets the nodes send at once
    #: (``--relay-batch-ms``, for the sessions this node relays; 0: their send-ahead).
    relay_batch: float = RELAY_BATCH

    def __attrs_post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode {self.mode!r}: must be bipartite or master-slave")
        if self.storage_threads < 1:
            raise ConfigError("the storage service needs at least one thread")
        if self.workers < 0:
            raise ConfigError("--workers must be 0 or more")
        if not 0.0 <= self.send_ahead <= MAX_SEND_AHEAD:
            raise ConfigError(
                f"--send-ahead-ms must be 0..{MAX_SEND_AHEAD * 1000:.0f} ms, "
                f"not {self.send_ahead * 1000:g}"
            )
        if not 0.0 <= self.relay_send_ahead <= MAX_SEND_AHEAD:
            raise ConfigError(
                f"--relay-send-ahead-ms must be 0..{MAX_SEND_AHEAD * 1000:.0f} ms, "
                f"not {self.relay_send_ahead * 1000:g}"
            )
        if not 0.0 <= self.relay_batch <= MAX_RELAY_BATCH:
            raise ConfigError(
                f"--relay-batch-ms must be 0..{MAX_RELAY_BATCH * 1000:.0f} ms, "
                f"not {self.relay_batch * 1000:g}"
            )


#: The largest ``--send-ahead-ms``: a player's buffer holds far more (the relay's lead is
#: 1.5 s), but a session's burst grows with it (docs/operations.md, "The send path").
MAX_SEND_AHEAD = 0.2


class YimaNode:
    """One Yima node: a :class:`ClusterNode` with storage, streaming and admin children.

    The children are started in this order: ``first`` (e.g. the tap's user
    switch), the admin site, storage, streaming.  :attr:`service` is what to run.
    """

    def __init__(
        self,
        node: ClusterNode,
        storage: YimaStorageService,
        streaming: YimaStreamingService,
        *,
        admin: IStreamServerEndpoint | None = None,
        admin_label: str = "--admin",
        first: Iterable[IService] = (),
    ) -> None:
        self.node = node
        self.storage = storage
        self.streaming = streaming
        for service in first:
            service.setServiceParent(node)
        self.admin: ListeningService | None = mount_admin(node, admin, label=admin_label)
        storage.setServiceParent(node)
        streaming.setServiceParent(node)

    @classmethod
    def from_config(
        cls,
        reactor: INodeReactor,
        config: YimaConfig,
        *,
        rng: random.Random | None = None,
        first: Iterable[IService] = (),
        threadpool: Pool | None = None,
    ) -> YimaNode:
        """Build the whole node from ``config`` (raises :class:`ConfigError` on bad input).

        ``rng`` seeds the node (default: the system's random source); ``first``
        are services started before any port is bound; ``threadpool`` writes the
        node's state files (default: the reactor's pool).
        """
        rng = rng or random.SystemRandom()
        admin = admin_endpoint(reactor, config.admin) if config.admin else None
        node = ClusterNode(reactor, config.node, config.secret, rng=rng, threadpool=threadpool)
        storage = YimaStorageService.from_config(
            node, reactor, config.disks, threads=config.storage_threads
        )
        streaming = YimaStreamingService(
            node,
            reactor,
            storage,
            rtsp_endpoint=config.rtsp,
            mode=config.mode,
            rng=rng,
            rtsp_guards=dict(config.rtsp_guards),
            send_path=config.send_path,
            cache_bytes=config.cache_bytes,
            send_ahead=config.send_ahead,
            relay_send_ahead=config.relay_send_ahead,
            relay_batch=config.relay_batch,
            workers=config.workers,
        )
        return cls(
            node,
            storage,
            streaming,
            admin=admin,
            admin_label=f"--admin {config.admin}",
            first=first,
        )

    @property
    def service(self) -> ClusterNode:
        """The service to run (the cluster node, parent of every other part)."""
        return self.node

    def when_ready(self) -> Deferred[None]:
        """Fires once every port listens; errbacks with ``CannotStart`` if one cannot."""
        return self.node.when_ready()
