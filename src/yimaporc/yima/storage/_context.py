"""What every part of the storage service shares: the node, the clock, the thread pool,
the local block store, the replicated catalog and its latest parsed snapshot."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, FirstError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ..._reactor import IClockThreads
from ...cluster.catalog import ReplicatedDocument
from ...cluster.node import ClusterNode
from ..store import BlockStore, SynchronousThreadPool
from ._catalog import Catalog

__all__ = ["StorageContext", "unwrap"]


@attrs.define(eq=False)
class StorageContext:
    """Shared by the storage parts; :attr:`catalog` is replaced on every catalog change."""

    node: ClusterNode
    reactor: IClockThreads
    pool: ThreadPool | SynchronousThreadPool
    store: BlockStore
    log: Logger
    #: Set once, right after (the document runs its disk work in :meth:`in_pool`).
    doc: ReplicatedDocument = attrs.field(init=False)
    catalog: Catalog = attrs.field(init=False)

    def in_pool(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """``f(*args)`` in the storage thread pool (CPU or disk work kept off the reactor)."""
        return deferToThreadPool(self.reactor, self.pool, f, *args)  # type: ignore[arg-type]

    def now(self) -> float:
        """Seconds on the injected clock."""
        return float(self.reactor.seconds())

    def log_failure(self, failure: Failure, what: str) -> None:
        """An errback: log ``failure`` as ``storage: WHAT failed``."""
        self.log.failure("storage: {what} failed", failure, what=what)


def unwrap(f: Failure) -> Failure:
    """The first failure inside a ``gatherResults`` FirstError (else ``f``)."""
    if f.check(FirstError):
        inner = f.value.subFailure  # type: ignore[union-attr]
        if isinstance(inner, Failure):
            return inner
    return f
