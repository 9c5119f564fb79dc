"""Yima's storage on a running node: disks, ingest, reads, online scaling, rebuild.

:class:`YimaStorageService` is a child service of a
:class:`~yimaporc.cluster.node.ClusterNode`.  It is the public face of parts that
each own one seam (built once, in ``__init__``, from the same :class:`StorageContext`):

- :mod:`._catalog`: the replicated ``yima-storage`` document, parsed;
- :mod:`._placing`: layouts (where blocks are) and per-disk counts;
- :mod:`._blocks`: block I/O by owner, reads with parity recovery;
- :mod:`._ingest`: uploads in, ``media rm`` out;
- :mod:`._reorganise`: ``disks add/remove`` as a persisted phase table;
- :mod:`._rebuild`: restoring a local disk from parity;
- :mod:`._adapters`: the RPC handlers and admin routes.

This module keeps the catalog's life on this node: registering local disks,
re-publishing lost records, moving time indexes out of the catalog.  Blocking
work (file reads, analysis, parity XOR) runs in the injected thread pool.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Generator, Sequence
from pathlib import Path
from typing import IO, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ..._reactor import INodeReactor
from ...cluster.catalog import ReplicatedDocument
from ...cluster.node import ClusterNode
from ..disks import MergePolicy, PhysicalDisk, initial_history
from ..events import ParityWatch
from ..interfaces import IMediaStorage
from ..layouts import LayoutCache, Placed, ProcessRunner
from ..media import MediaInfo
from ..placement import LogicalDisk
from ..rpc import GetTimeIndex
from ..store import BlockKey, BlockStore, SynchronousThreadPool
from ..timeindex import IndexUnavailable, TimeIndexes
from ._adapters import StorageRoutes, StorageRpc
from ._blocks import BlockRouter
from ._catalog import (
    DOCUMENT,
    MEDIA,
    TOPOLOGY,
    Catalog,
    empty_document,
    join_catalog,
    no_topology,
    split_catalog,
)
from ._context import StorageContext
from ._ingest import Ingester
from ._placing import Placements
from ._rebuild import Rebuilder
from ._reorganise import DEFAULT_MOVE_RATE, Reorganiser

__all__ = ["YimaStorageService"]


@implementer(IMediaStorage)
class YimaStorageService(Service):
    """This node's disks, plus the cluster-wide storage operations it can coordinate."""

    log = Logger()
    name = "yima-storage"

    def __init__(
        self,
        node: ClusterNode,
        reactor: INodeReactor,
        threadpool: ThreadPool | SynchronousThreadPool,
        disks: Sequence[tuple[str | Path, int | None]],
        *,
        own_pool: bool = False,
        move_rate: float = DEFAULT_MOVE_RATE,
        layout_runner: ProcessRunner | None = None,
    ) -> None:
        self.node = node
        self.reactor = reactor
        self.pool = threadpool
        self._own_pool = own_pool
        self.store = BlockStore(reactor, threadpool, {})
        self.ctx = ctx = StorageContext(node, reactor, threadpool, self.store, self.log)
        self.doc = ctx.doc = ReplicatedDocument(node, DOCUMENT, empty_document(), run=ctx.in_pool,
                                                split=split_catalog, join=join_catalog)  # fmt: skip
        self._parsed: dict[str, tuple[Any, MediaInfo]] = {}
        ctx.catalog = Catalog.parse(self.doc.value, self._parsed)
        #: Time indexes, per file beside the data (not in the replicated catalog).
        self.indexes = TimeIndexes(node.config.data_dir / "time-index", ctx.in_pool,
                                   self._fetch_index)  # fmt: skip
        self._wanted = [(Path(p).absolute(), c) for p, c in disks] or [
            (node.config.data_dir / "disks" / "0", None)
        ]
        self._local: list[PhysicalDisk] = []
        self._stored: dict[str, int] = {}
        self._reconciling = False
        #: Names being ingested or removed, and the records this node published.
        self._ingesting: set[str] = set()
        self._published: dict[str, dict[str, Any]] = {}
        # Layouts are CPU-bound: a process pool keeps them from starving the reactor of the
        # GIL; without one they run in the storage thread pool (tests: synchronous).
        self.layout_runner = layout_runner
        self.layouts = LayoutCache(layout_runner or ctx.in_pool, node.config.data_dir / "layouts")
        self.placements = Placements(ctx, self.layouts, layout_runner)
        self.parity_watch = ParityWatch(lambda: self.catalog)
        self.router = BlockRouter(ctx, self.placements, self.parity_watch)
        self.reorganiser = Reorganiser(
            ctx,
            self.router,
            self.placements,
            move_rate=move_rate,
            ingesting=self._ingesting,
            detach=self.detach,
            refresh_stored=self.refresh_stored,
            after=self._reconcile,
        )
        self.ingester = Ingester(
            ctx,
            self.router,
            self.placements,
            self.reorganiser,
            self.indexes,
            ingesting=self._ingesting,
            published=self._published,
            refresh_stored=self.refresh_stored,
        )
        self.rebuilder = Rebuilder(ctx, self.router, self.placements, self.refresh_stored)
        self.doc.subscribe(self._changed)
        StorageRpc(self).register(node.registry)
        for route in StorageRoutes(self).routes():
            node.add_route(route)
        node.add_status(self.status)
        node.subscribe(self.parity_watch)

    @classmethod
    def from_config(
        cls,
        node: ClusterNode,
        reactor: INodeReactor,
        disks: Sequence[tuple[str | Path, int | None]],
        threads: int = 4,
    ) -> YimaStorageService:
        """A service with its own thread pool of ``threads`` workers."""
        pool = ThreadPool(minthreads=0, maxthreads=threads, name="yima-storage")
        return cls(node, reactor, pool, disks, own_pool=True, layout_runner=ProcessRunner(reactor))

    # --- the public face (what streaming, the adapters and tests use) ----------------

    @property
    def catalog(self) -> Catalog:
        """The latest parsed catalog."""
        return self.ctx.catalog

    @property
    def move_rate(self) -> float:
        """Default pace of reorganisation copies (bytes/s)."""
        return self.reorganiser.move_rate

    @property
    def reorg_progress(self) -> dict[str, int]:
        """Progress of the last disk add/remove this node ran."""
        return self.reorganiser.progress

    def run_blocking(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """``f(*args)`` in the storage thread pool (CPU or disk work kept off the reactor)."""
        return self.ctx.in_pool(f, *args)

    def media_info(self, name: str) -> MediaInfo:
        """The catalog entry of ``name`` (KeyError if unknown), with its time index once
        loaded (see :meth:`time_index`; a file's index is loaded when its record arrives)."""
        info = self.catalog.media[name]
        return self.indexes.cached(info) or info

    def time_index(self, name: str) -> Deferred[MediaInfo]:
        """The catalog entry of ``name`` with its time index (KeyError if unknown), loaded
        off the reactor (from this node's copy, or a peer's) when not cached."""
        return self.indexes.load(self.catalog.media[name])

    def read_block(self, name: str, index: int) -> Deferred[bytes]:
        """Data block ``index`` of ``name``, from wherever it is, rebuilt from parity if lost."""
        return self.router.read(name, BlockKey(index))

    def read(
        self, name: str, key: BlockKey, recover: bool = True, avoid: Collection[str] = ()
    ) -> Deferred[bytes]:
        """A block of ``name`` (new place, then old, then parity recovery); see
        :meth:`BlockRouter.read`."""
        return self.router.read(name, key, recover, avoid)  # type: ignore[no-any-return]

    def places(self, info: MediaInfo, key: BlockKey) -> list[LogicalDisk]:
        """Where ``key`` of ``info`` may be, in read order: new place, then old."""
        return self.placements.places(info, key)

    def blocks_of_node(self, name: str, node_id: str) -> Deferred[list[int]]:
        """Data blocks of ``name`` whose first place (pending history first) is on ``node_id``."""
        return self.placements.blocks_of_node(name, node_id)

    def layout_of(self, info: MediaInfo, pending: bool = False) -> Deferred[Placed | None]:
        """``info``'s layout under the committed (or pending) history, computed off the reactor."""
        return self.placements.layout_of(info, pending)

    def placed_counts(self) -> dict[str, int]:
        """Blocks per physical disk under the committed history (see :class:`Placements`)."""
        return self.placements.placed_counts()

    def refresh_placed(self) -> Deferred[dict[str, int]]:
        """Sum the committed layouts' per-disk counts, off the reactor."""
        return self.placements.refresh_placed()

    def write_at(self, disk: LogicalDisk, media: str, key: BlockKey, data: bytes) -> Deferred[Any]:
        """Store a block on physical disk ``disk.physical`` of its node."""
        return self.router.write_at(disk, media, key, data)

    def read_at(self, disk: LogicalDisk, media: str, key: BlockKey) -> Deferred[bytes]:
        """Read a block from physical disk ``disk.physical`` (no recovery)."""
        return self.router.read_at(disk, media, key)

    def delete_at(self, disk: LogicalDisk, media: str, key: BlockKey) -> Deferred[Any]:
        """Delete a block from physical disk ``disk.physical``."""
        return self.router.delete_at(disk, media, key)

    def ingest(
        self,
        content: IO[bytes],
        name: str,
        block_size: int | None = None,
        parity_group: int | None = None,
        opaque: bool = False,
    ) -> Deferred[dict[str, Any]]:
        """Analyse, cut, place and store an upload, then publish it (see :class:`Ingester`)."""
        return self.ingester.ingest(  # type: ignore[no-any-return]
            content, name, block_size, parity_group, opaque
        )

    def remove_media(self, name: str) -> Deferred[dict[str, Any]]:
        """``media rm``: unpublish ``name`` (with a tombstone) and delete its blocks."""
        return self.ingester.remove(name)  # type: ignore[no-any-return]

    def scale_add(self, disk: PhysicalDisk, rate: float | None = None) -> Deferred[dict[str, Any]]:
        """SCADDAR-add ``disk`` and move blocks onto it; fires with the move summary."""
        return self.reorganiser.add(disk, rate)

    def scale_remove(self, disk_id: str, rate: float | None = None) -> Deferred[dict[str, Any]]:
        """SCADDAR-remove ``disk_id``, moving its blocks away first."""
        return self.reorganiser.remove(disk_id, rate)

    def rebuild_local(self, disk_id: str) -> Deferred[dict[str, Any]]:
        """Restore every block that belongs on local ``disk_id`` and is missing or damaged."""
        return self.rebuilder.rebuild_local(disk_id)  # type: ignore[no-any-return]

    def detach(self, disk_id: str) -> bool:
        """Stop using local ``disk_id`` (it was removed from the cluster)."""
        if disk_id not in self.store.disk_ids:
            return False
        self.store.remove_disk(disk_id)
        self._local = [d for d in self._local if d.disk_id != disk_id]
        self._stored.pop(disk_id, None)
        return True

    def refresh_stored(self) -> Deferred[dict[str, int]]:
        """Count the block files on this node's disks (for ``stored`` in status)."""

        def keep(counts: dict[str, int]) -> dict[str, int]:
            self._stored = counts
            return counts

        return self.store.block_counts().addCallback(keep)

    # --- lifecycle --------------------------------------------------------------

    def startService(self) -> None:
        """Start the pool, attach this node's disks, register them in the catalog."""
        if self._own_pool and isinstance(self.pool, ThreadPool):
            self.pool.start()
        super().startService()
        me = self.node.node_id
        cat = self.catalog
        known = [d for d in cat.all_disks() if d.node_id == me]
        taken = {d.disk_id for d in cat.all_disks()}
        for path, capacity in self._wanted:
            if (me, str(path)) in cat.retired:
                self.log.warn("disk {path} was removed from the cluster; not re-adding", path=path)
                continue
            match = next((d for d in known if d.path == str(path)), None)
            if match is None:
                k = 0
                while f"{me}-{k}" in taken:
                    k += 1
                match = PhysicalDisk(f"{me}-{k}", me, str(path), capacity)
                taken.add(match.disk_id)
            self._local.append(match)
        self._attach_mine()
        self.store.clean_temp().addErrback(self.ctx.log_failure, "cleaning temp files")
        self.refresh_stored()
        self._reconcile()
        self.placements.warm()  # load (or compute) the layouts in the background, off the reactor
        self._migrate(self.catalog.legacy)
        self._warm_indexes()
        self.reorganiser.resume().addErrback(self.ctx.log_failure, "resuming a reorganisation")

    def stopService(self) -> Deferred[None] | None:
        """Stop the pool (waits for running work) and the layout workers."""
        super().stopService()
        if self.layout_runner is not None:
            self.layout_runner.stop()
        if self._own_pool and isinstance(self.pool, ThreadPool):
            pool = self.pool
            return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), pool.stop)
        return None

    # --- catalog ------------------------------------------------------------------

    def _changed(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        before = self.catalog
        try:
            self.ctx.catalog = Catalog.parse(new, self._parsed)
        except ValueError:
            self.log.failure("storage: unreadable catalog version ignored")
            return
        self._attach_mine()
        gone = {n for n in before.media if n not in self.catalog.media}
        if gone:
            self.indexes.forget(gone).addErrback(self.ctx.log_failure, "removing time indexes")
        if self.running:
            self.reactor.callLater(0, self._reconcile)
            self.placements.warm()
            self._migrate(self.catalog.legacy)
            self._warm_indexes()

    # --- time indexes ----------------------------------------------------------------

    def _migrate(self, legacy: dict[str, MediaInfo]) -> None:
        """Move the time index of records that still carry it out of the catalog: store
        it beside the data, then rewrite the record with its digest only."""
        for name, full in legacy.items():

            def rewrite(bare: MediaInfo, name: str = name) -> Deferred[Any] | None:
                if self.catalog.media.get(name) != bare:
                    return None  # replaced or removed meanwhile
                if name in self._published:
                    self._published[name] = bare.to_record()
                return self.doc.put({MEDIA + name: bare.to_record()})

            d = self.indexes.store(full).addCallback(rewrite)
            d.addErrback(
                self.ctx.log_failure, f"moving the time index of {name} out of the catalog"
            )

    def _warm_indexes(self) -> None:
        """Load (or fetch from a peer) every file's time index in the background."""
        for info in list(self.catalog.media.values()):
            if self.indexes.cached(info) is None:
                self.indexes.load(info).addErrback(self._index_failed, info.name)

    def _index_failed(self, failure: Failure, name: str) -> None:
        self.log.warn("storage: time index of {name} not loaded yet: {e}", name=name,
                      e=failure.getErrorMessage())  # fmt: skip

    @inlineCallbacks
    def _fetch_index(self, name: str, digest: str) -> Generator[Deferred[Any], Any, bytes]:
        """The packed time index ``digest`` of ``name`` from the first peer that has it."""
        me = self.node.config.cluster_address
        problems = []
        for member in list(self.node.view.members):
            if member.address == me:
                continue
            try:
                answer = yield self.node.rpc.call(member.address, GetTimeIndex, media=name,
                                                  digest=digest)  # fmt: skip
            except Exception as e:
                problems.append(f"{member.node_id}: {e}")
                continue
            data: bytes = answer["data"]
            return data
        raise IndexUnavailable(f"time index of {name}: no node has it ({'; '.join(problems)})")

    def _attach_mine(self) -> None:
        me = self.node.node_id
        attached = set(self.store.disk_ids)
        for d in [*self._local, *self.catalog.all_disks()]:
            if d.node_id == me and d.disk_id not in attached:
                self.store.add_disk(d.disk_id, d.path)
                attached.add(d.disk_id)

    def _reconcile(self) -> None:
        """Make sure this node's disks (and files it published) are in the catalog.

        Two nodes may update the document at once; the loser's change is lost
        (last writer wins), so every node re-checks after every change.
        """
        cat = self.catalog
        if (
            not self.running
            or self._reconciling
            or self.reorganiser.busy
            or cat.pending is not None
        ):
            return
        removed = self.doc.value.get("removed") or {}  # by `media rm`: name -> seed
        lost = {
            n: m
            for n, m in self._published.items()
            if n not in cat.media and removed.get(n) != m.get("seed")
        }
        registered = {d.disk_id for d in cat.disks}
        # A disk removed by `disks remove` stays out, even if it was a --disk.
        self._local = [d for d in self._local if (d.node_id, d.path) not in cat.retired]
        missing = [d for d in self._local if d.disk_id not in registered]
        if not missing and not lost:
            return
        self._reconciling = True
        d: Deferred[Any]
        if lost:
            d = self.doc.put({MEDIA + n: m for n, m in lost.items()})
        elif not cat.media:
            d = self.doc.update_record(
                TOPOLOGY, lambda t: self._register(t or no_topology(), missing)
            )
        else:
            d = self._add_chain(missing)

        def done(result: object) -> None:
            self._reconciling = False
            if isinstance(result, Failure):
                self.ctx.log_failure(result, "registering local disks")
                self.reactor.callLater(1.0, self._reconcile)
            else:
                self.reactor.callLater(0, self._reconcile)

        d.addBoth(done)

    def _register(self, value: dict[str, Any], missing: list[PhysicalDisk]) -> dict[str, Any]:
        """Add ``missing`` to a catalog without media: a fresh history over all disks."""
        if self.catalog.media or value.get("pending"):
            return value
        disks = {d["disk_id"]: d for d in value["disks"]}
        for m in missing:
            disks.setdefault(m.disk_id, m.to_json())
        ordered = [PhysicalDisk.from_json(disks[k]) for k in sorted(disks)]
        policy = MergePolicy.from_json(value["policy"])
        history = initial_history(ordered, policy)
        return {**value, "disks": [d.to_json() for d in ordered], "history": history.to_json()}

    @inlineCallbacks
    def _add_chain(self, missing: list[PhysicalDisk]) -> Generator[Deferred[Any], Any, None]:
        for disk in missing:
            yield self.scale_add(disk)

    # --- status --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``disks`` and ``media`` of CONTRACT §3 (``blocks`` computed from placement)."""
        cat = self.catalog
        placed = self.placements.placed_counts()
        logical = {} if cat.history is None else cat.history.disks
        per_disk: dict[str, int] = {}
        for ld in logical:
            per_disk[ld.physical] = per_disk.get(ld.physical, 0) + 1
        disks = [
            {
                "disk_id": d.disk_id,
                "node_id": d.node_id,
                "path": d.path,
                "capacity": d.capacity,
                "blocks": placed.get(d.disk_id, 0),
                "logical": per_disk.get(d.disk_id, 0),
                "stored": self._stored.get(d.disk_id),
            }
            for d in cat.disks
        ]
        media = [
            {
                "name": m.name,
                "blocks": m.blocks,
                "bytes": m.size,
                "seed": m.seed,
                "kind": m.kind,
                "streamable": m.streamable,
                "parity_group": m.parity_group,
                "duration": m.duration,
            }
            for m in sorted(cat.media.values(), key=lambda m: m.name)
        ]
        return {
            "disks": disks,
            "media": media,
            "storage": {
                "reorganising": cat.pending is not None,
                "scaling_steps": 0 if cat.history is None else cat.history.steps,
                "logical_disks": 0 if cat.history is None else cat.history.n_disks,
                # Placement layouts held in memory (computed off the reactor), and whether
                # the disks' "blocks" still await one (then they are the last full count).
                "layouts_cached": len(self.layouts),
                "blocks_pending": self.placements.counts_pending,
                "reorganisation": dict(self.reorganiser.progress),
                "reorganisation_phase": self.reorganiser.phase.value,
            },
        }
