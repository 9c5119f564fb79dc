"""Yima's storage on a running node: disks, ingest, reads, online scaling, rebuild.

:class:`YimaStorageService` is a child service of a
:class:`~yimaporc.cluster.node.ClusterNode`.  Cluster-wide metadata lives in
one :class:`~yimaporc.cluster.catalog.ReplicatedDocument` named
``yima-storage``::

    {"policy":  MergePolicy,            fixed for the cluster's life
     "disks":   [PhysicalDisk, ...],    the committed physical disks
     "history": ScalingHistory | null,  SCADDAR history over their logical disks
     "pending": null | {"history": ..., "disks": [...]},   during a reorganisation
     "media":   {name: MediaInfo},      every stored file (seed, size, digest of its
                                        time index; the index is in yima/timeindex.py)
     "retired": [{"node_id", "path", "disk_id"}]}          removed disks, not re-added

Placement is computed from that document on every node; block bytes are moved
with the ``yima.*`` AMP commands of :mod:`.rpc` to the node owning the target
physical disk.  Blocking work (file reads, analysis, parity XOR) runs in the
injected thread pool.
"""

from __future__ import annotations

import base64
import json
import tempfile
import threading
from collections.abc import Callable, Collection, Generator, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import IO, Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred,
    DeferredSemaphore,
    FirstError,
    fail,
    gatherResults,
    inlineCallbacks,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ..admin.routes import ApiError, Route
from ..cluster.catalog import ReplicatedDocument
from ..cluster.node import ClusterNode
from ..cluster.rpc import PeerUnavailable
from .disks import (
    DiskError,
    MergePolicy,
    PhysicalDisk,
    add_physical,
    initial_history,
    remove_physical,
)
from .events import ParityWatch
from .layouts import LayoutCache, Placed, ProcessRunner, counts_of
from .media import MAX_HEADER, TAIL, Analyser, MediaInfo, check_name, plan, unstreamable_reason
from .parity import (
    FilePlacement,
    Layout,
    ParityError,
    group_members,
    group_size_for,
    make_parity,
)
from .parity import reconstruct as parity_reconstruct
from .placement import LogicalDisk, ScalingHistory
from .reorg import Move, MoveThrottle, Plan, plan_for_layouts
from .rpc import (
    CountBlocks,
    DeleteBlock,
    DetachDisk,
    GetBlock,
    GetTimeIndex,
    PutBlock,
    RebuildDisk,
    StorageRefused,
)
from .store import BlockKey, BlockMissing, BlockStore, SynchronousThreadPool, expected_length
from .timeindex import IndexUnavailable, TimeIndexes

DOCUMENT = "yima-storage"
# Default pace of reorganisation copies (bytes/s) and moves in flight.
DEFAULT_MOVE_RATE = 64 << 20
MOVES_IN_FLIGHT = 4
# Parity groups written concurrently during an ingest.
INGEST_WINDOW = 3
READ_CHUNK = 1 << 20


def empty_document(policy: MergePolicy | None = None) -> dict[str, Any]:
    """The catalog of a cluster with no disks and no media."""
    return {
        "policy": (policy or MergePolicy()).to_json(),
        "disks": [],
        "history": None,
        "pending": None,
        "media": {},
        "retired": [],
    }


TOPOLOGY = "topology"
MEDIA = "media/"


def split_catalog(doc: dict[str, Any]) -> dict[str, Any]:
    """The catalog's replicated records: one for the topology (policy, disks, history,
    pending, retired) and one per media file (``media/NAME``)."""
    out: dict[str, Any] = {TOPOLOGY: {k: v for k, v in doc.items() if k != "media"}}
    out.update({MEDIA + n: m for n, m in doc.get("media", {}).items()})
    return out


def join_catalog(records: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`split_catalog` (record values are shared, not copied)."""
    topology = records.get(TOPOLOGY)
    if topology is None:
        topology = {k: v for k, v in empty_document().items() if k != "media"}
    media = {k[len(MEDIA) :]: v for k, v in records.items() if k.startswith(MEDIA)}
    return {**topology, "media": media}


@attrs.frozen
class Catalog:
    """A parsed snapshot of the ``yima-storage`` document."""

    policy: MergePolicy
    disks: tuple[PhysicalDisk, ...]
    history: ScalingHistory | None
    pending: ScalingHistory | None
    pending_disks: tuple[PhysicalDisk, ...]
    media: dict[str, MediaInfo]
    retired: tuple[tuple[str, str], ...]
    #: Records written before the time index left the catalog: name -> entry with it.
    legacy: dict[str, MediaInfo] = attrs.field(factory=dict)

    @classmethod
    def parse(
        cls, doc: dict[str, Any], known: dict[str, tuple[Any, MediaInfo]] | None = None
    ) -> Catalog:
        """Parse the document (raises ValueError on a malformed one).

        ``known`` maps names to ``(raw entry, MediaInfo)`` parsed before: an entry
        that is the very same object (an unchanged record) is not parsed again,
        so a catalog change costs the records it changed.  Entries hold no time
        index (its digest only); a record that still carries one (written before
        the index left the catalog) is listed in :attr:`legacy` with it, when
        first parsed.
        """
        history = doc.get("history")
        pending = doc.get("pending") or None
        media: dict[str, MediaInfo] = {}
        legacy: dict[str, MediaInfo] = {}
        for name, raw in doc.get("media", {}).items():
            hit = None if known is None else known.get(name)
            if hit is not None and hit[0] is raw:
                media[name] = hit[1]
                continue
            full = MediaInfo.from_json(raw)
            media[name] = full.bare()
            if full.block_times:
                legacy[name] = full
        if known is not None:
            known.clear()
            known.update({n: (doc["media"][n], m) for n, m in media.items()})
        return cls(
            MergePolicy.from_json(doc.get("policy") or MergePolicy().to_json()),
            tuple(PhysicalDisk.from_json(d) for d in doc.get("disks", [])),
            None if history is None else ScalingHistory.from_json(history),
            None if pending is None else ScalingHistory.from_json(pending["history"]),
            () if pending is None else tuple(PhysicalDisk.from_json(d) for d in pending["disks"]),
            media,
            tuple((r["node_id"], r["path"]) for r in doc.get("retired", [])),
            legacy,
        )

    def all_disks(self) -> tuple[PhysicalDisk, ...]:
        """Committed disks plus those a reorganisation is adding."""
        seen = {d.disk_id for d in self.disks}
        return self.disks + tuple(d for d in self.pending_disks if d.disk_id not in seen)


def _physical_disk(disk: LogicalDisk) -> str:
    return disk.physical


def _unwrap(f: Failure) -> Failure:
    if f.check(FirstError):
        inner = f.value.subFailure  # type: ignore[union-attr]
        if isinstance(inner, Failure):
            return inner
    return f


def _bounded(
    width: int, thunks: Iterable[Callable[[], Deferred[Any]]]
) -> Deferred[list[tuple[bool, Any]]]:
    """Run ``thunks`` at most ``width`` at a time, like a ``DeferredList(consumeErrors=True)``
    of them, but starting each only when a slot is free (no mass of Deferreds up front)."""
    work = iter(enumerate(thunks))
    results: dict[int, tuple[bool, Any]] = {}

    @inlineCallbacks
    def worker() -> Generator[Deferred[Any], Any, None]:
        for k, thunk in work:
            try:
                value = yield maybeDeferred(thunk)
            except Exception:
                results[k] = (False, Failure())
            else:
                results[k] = (True, value)

    done = gatherResults([worker() for _ in range(width)])
    return done.addCallback(lambda _: [results[k] for k in sorted(results)])


def _read_range(content: IO[bytes], lock: threading.Lock, offset: int, length: int) -> bytes:
    with lock:
        content.seek(offset)
        return content.read(length)


def _cut_group(
    content: IO[bytes],
    lock: threading.Lock,
    info: MediaInfo,
    first: int,
    count: int,
    group: int | None,
) -> list[tuple[BlockKey, bytes]]:
    """Blocks ``first .. first+count-1`` of the upload, plus the group's parity if any."""
    data = _read_range(content, lock, first * info.block_size, count * info.block_size)
    blocks = [data[i : i + info.block_size] for i in range(0, len(data), info.block_size)]
    if len(blocks) != count:
        raise ValueError("upload shorter than analysed")
    out = [(BlockKey(first + i), b) for i, b in enumerate(blocks)]
    if group is not None:
        out.append((BlockKey(group, parity=True), make_parity(blocks)))
    return out


def _analyse(
    content: IO[bytes],
    lock: threading.Lock,
    name: str,
    seed: int,
    block_size: int | None,
    group: int,
) -> tuple[MediaInfo, IO[bytes], tuple[str, ...]]:
    """The upload's MediaInfo, the file to store (the upload, or a trimmed or
    realigned copy: see ``media.plan``) and what was changed, as warnings."""
    with lock:
        size = content.seek(0, 2)
        content.seek(0)
        head = content.read(MAX_HEADER)
        content.seek(max(0, size - TAIL))
        tail = content.read(TAIL)
        rewrite = plan(head, tail, size)
        if rewrite is not None and not rewrite.is_identity(size):
            copy = tempfile.TemporaryFile()
            try:
                rewrite.copy(content, copy)
            except BaseException:
                copy.close()
                raise
            content = copy
    analyser = Analyser(name, seed, block_size, group)
    with lock:
        content.seek(0)
        while chunk := content.read(READ_CHUNK):
            analyser.feed(chunk)
    return analyser.finish(), content, rewrite.warnings if rewrite is not None else ()


class YimaStorageService(Service):
    """This node's disks, plus the cluster-wide storage operations it can coordinate."""

    log = Logger()
    name = "yima-storage"

    def __init__(
        self,
        node: ClusterNode,
        reactor: Any,
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
        self.move_rate = move_rate
        self.store = BlockStore(reactor, threadpool, {})
        self.doc = ReplicatedDocument(node, DOCUMENT, empty_document(), run=self._in_pool,
                                      split=split_catalog, join=join_catalog)  # fmt: skip
        self._parsed: dict[str, tuple[Any, MediaInfo]] = {}
        self.catalog = Catalog.parse(self.doc.value, self._parsed)
        #: Time indexes, per file beside the data (not in the replicated catalog).
        self.indexes = TimeIndexes(node.config.data_dir / "time-index", self._in_pool,
                                   self._fetch_index)  # fmt: skip
        self._wanted = [(Path(p).absolute(), c) for p, c in disks] or [
            (node.config.data_dir / "disks" / "0", None)
        ]
        self._local: list[PhysicalDisk] = []
        # Layouts are CPU-bound: a process pool keeps them from starving the reactor of the
        # GIL; without one they run in the storage thread pool (tests: synchronous).
        self._layout_runner = layout_runner
        self.layouts = LayoutCache(layout_runner or self._in_pool, node.config.data_dir / "layouts")
        self._placed: dict[str, int] = {}
        self._placed_for: tuple[Any, ...] | None = None
        self._placing = False
        self._placed_waiters: list[Deferred[dict[str, int]]] = []
        self._warm_for: tuple[Any, ...] | None = None
        self._stored: dict[str, int] = {}
        self._reconciling = False
        self._scaling = False
        #: Progress of the last disk add/remove this node ran (``storage.reorganisation``).
        self.reorg_progress = {"blocks_to_move": 0, "blocks_moved": 0, "blocks_moved_total": 0}
        self._ingesting: set[str] = set()
        self._published: dict[str, dict[str, Any]] = {}
        self.doc.subscribe(self._changed)
        reg = node.registry
        reg.register(PutBlock, self._rpc_put)
        reg.register(GetBlock, self._rpc_get)
        reg.register(DeleteBlock, self._rpc_delete)
        reg.register(CountBlocks, self._rpc_count)
        reg.register(DetachDisk, self._rpc_detach)
        reg.register(RebuildDisk, self._rpc_rebuild)
        reg.register(GetTimeIndex, self._rpc_time_index)
        for route in (
            Route("GET", "/api/yima/media", self._route_list, mutates=False),
            Route("POST", "/api/yima/media", self._route_ingest, raw=True),
            Route("GET", "/api/yima/block", self._route_block),
            Route("POST", "/api/yima/disks", self._route_add_disk),
            Route("POST", "/api/yima/disks/remove", self._route_remove_disk),
            Route("POST", "/api/yima/rebuild", self._route_rebuild),
            Route("GET", "/api/yima/stored", self._route_stored),
            Route("POST", "/api/yima/media/delete", self._route_remove_media),
        ):
            node.add_route(route)
        node.add_status(self.status)
        self.parity_watch = ParityWatch(lambda: self.catalog)
        node.subscribe(self.parity_watch)

    @classmethod
    def from_config(
        cls,
        node: ClusterNode,
        reactor: Any,
        disks: Sequence[tuple[str | Path, int | None]],
        threads: int = 4,
    ) -> YimaStorageService:
        """A service with its own thread pool of ``threads`` workers."""
        pool = ThreadPool(minthreads=0, maxthreads=threads, name="yima-storage")
        return cls(node, reactor, pool, disks, own_pool=True, layout_runner=ProcessRunner(reactor))

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
        self.store.clean_temp().addErrback(self._log_failure, "cleaning temp files")
        self._refresh_stored()
        self._reconcile()
        self._warm()  # load (or compute) the layouts in the background, off the reactor
        self._migrate(self.catalog.legacy)
        self._warm_indexes()

    def stopService(self) -> Deferred[None] | None:
        """Stop the pool (waits for running work) and the layout workers."""
        super().stopService()
        if self._layout_runner is not None:
            self._layout_runner.stop()
        if self._own_pool and isinstance(self.pool, ThreadPool):
            pool = self.pool
            return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), pool.stop)
        return None

    def _log_failure(self, failure: Failure, what: str) -> None:
        self.log.failure("storage: {what} failed", failure, what=what)

    # --- catalog ------------------------------------------------------------------

    def _changed(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        before = self.catalog
        try:
            self.catalog = Catalog.parse(new, self._parsed)
        except ValueError:
            self.log.failure("storage: unreadable catalog version ignored")
            return
        self._attach_mine()
        gone = {n for n in before.media if n not in self.catalog.media}
        if gone:
            self.indexes.forget(gone).addErrback(self._log_failure, "removing time indexes")
        if self.running:
            self.reactor.callLater(0, self._reconcile)
            self._warm()
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
            d.addErrback(self._log_failure, f"moving the time index of {name} out of the catalog")

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

    def _rpc_time_index(self, media: str, digest: str) -> Deferred[dict[str, Any]]:
        try:
            check_name(media)
        except ValueError as e:
            raise StorageRefused(str(e)) from e
        return self.indexes.raw(media, digest).addCallback(lambda data: {"data": data})

    def time_index(self, name: str) -> Deferred[MediaInfo]:
        """The catalog entry of ``name`` with its time index (KeyError if unknown), loaded
        off the reactor (from this node's copy, or a peer's) when not cached."""
        return self.indexes.load(self.catalog.media[name])

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
        if not self.running or self._reconciling or self._scaling or cat.pending is not None:
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
            d = self._update_topology(lambda v: self._register(v, missing))
        else:
            d = self._add_chain(missing)

        def done(result: object) -> None:
            self._reconciling = False
            if isinstance(result, Failure):
                self._log_failure(result, "registering local disks")
                self.reactor.callLater(1.0, self._reconcile)
            else:
                self.reactor.callLater(0, self._reconcile)

        d.addBoth(done)

    def _update_topology(self, change: Callable[[dict[str, Any]], Any]) -> Deferred[int]:
        """Change the topology record only (the media records are neither copied nor sent)."""
        return self.doc.update_record(TOPOLOGY, lambda t: change(t or self._no_topology()))

    @staticmethod
    def _no_topology() -> dict[str, Any]:
        return split_catalog(empty_document())[TOPOLOGY]  # type: ignore[no-any-return]

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

    # --- placement ------------------------------------------------------------------

    def _in_pool(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.pool, f, *args)  # type: ignore[arg-type]

    def run_blocking(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """``f(*args)`` in the storage thread pool (CPU or disk work kept off the reactor)."""
        return self._in_pool(f, *args)

    def _histories(self) -> list[tuple[bool, ScalingHistory]]:
        cat = self.catalog
        return [(p, h) for p, h in ((True, cat.pending), (False, cat.history)) if h is not None]

    def _placement_state(self) -> tuple[Any, ...]:
        """What every cached layout and count depends on: histories and files."""
        cat = self.catalog
        files = tuple(sorted((m.name, m.seed, m.blocks) for m in cat.media.values()))
        return (cat.history, cat.pending, files)

    def layout_of(self, info: MediaInfo, pending: bool = False) -> Deferred[Placed | None]:
        """``info``'s layout under the committed (or pending) history, computed off the reactor."""
        history = self.catalog.pending if pending else self.catalog.history
        if history is None:
            return succeed(None)
        return self.layouts.fetch(info, history)  # type: ignore[return-value]

    def _warm(self) -> None:
        """Compute (or load) every layout the current catalog needs, in the pool, one at a
        time; then the per-disk counts. Nothing is recomputed unless the history changed."""
        state = self._placement_state()
        if state == self._warm_for:
            return
        self._warm_for = state
        wanted = [(info, h) for _, h in self._histories() for info in self.catalog.media.values()]

        @inlineCallbacks
        def run() -> Generator[Deferred[Any], Any, None]:
            for info, history in sorted(wanted, key=lambda w: w[0].name):
                if self._placement_state() != state:
                    return  # a newer warm-up is under way
                yield self.layouts.fetch(info, history)
            if self._placement_state() == state:
                yield self.layouts.retain(wanted)
                yield self.refresh_placed()

        run().addErrback(self._log_failure, "computing placement layouts")

    def places(self, info: MediaInfo, key: BlockKey) -> list[LogicalDisk]:
        """Where ``key`` of ``info`` may be, in read order: new place, then old.

        From the cached layouts; on a miss the one block's place is computed
        alone (its parity group only, cheap) and the whole layout is warmed in
        the pool for the next call.
        """
        out: list[LogicalDisk] = []
        for _, history in self._histories():
            placed = self.layouts.get(info, history)
            if placed is not None:
                disk = placed.disk(key.index, key.parity)
            else:
                self.layouts.fetch(info, history).addErrback(self._log_failure, "layout")
                placement = FilePlacement.of(info)
                index = (
                    placement.parity_disk(key.index, history)
                    if key.parity
                    else placement.data_disk(key.index, history)
                )
                disk = history.disks[index]
            if all(disk.physical != o.physical for o in out):
                out.append(disk)
        return out

    def blocks_of_node(self, name: str, node_id: str) -> Deferred[list[int]]:
        """Data blocks of ``name`` whose first place (pending history first) is on ``node_id``."""
        info = self.catalog.media.get(name)
        if info is None:
            return fail(KeyError(name))
        histories = self._histories()
        if not histories:
            return succeed([])
        d = self.layouts.fetch(info, histories[0][1])
        return d.addCallback(lambda placed: list(placed.by_node.get(node_id, ())))

    def placed_counts(self) -> dict[str, int]:
        """Blocks (data + parity) per physical disk under the committed history, as last
        summed from cached layouts (never computed here: see :meth:`refresh_placed`)."""
        if self._placed_for != self._placement_state():
            self.refresh_placed().addErrback(self._log_failure, "counting placed blocks")
        return self._placed

    def refresh_placed(self) -> Deferred[dict[str, int]]:
        """Sum the committed layouts' per-disk counts (layouts fetched off the reactor);
        fires once the counts match the catalog as it is when they are done."""
        d: Deferred[dict[str, int]] = Deferred()
        self._placed_waiters.append(d)
        if not self._placing:
            self._sum_placed()
        return d

    def _sum_placed(self) -> None:
        self._placing = True
        state = self._placement_state()
        cat = self.catalog
        history = cat.history
        infos = sorted(cat.media.values(), key=lambda m: m.name)

        @inlineCallbacks
        def run() -> Generator[Deferred[Any], Any, None]:
            placed = []
            if history is not None:
                for info in infos:
                    p = yield self.layouts.fetch(info, history)
                    placed.append(p)
            self._placed = counts_of(placed, (d.disk_id for d in cat.disks))
            self._placed_for = state

        def done(result: object) -> None:
            self._placing = False
            if not isinstance(result, Failure) and state != self._placement_state():
                self._sum_placed()  # the catalog changed meanwhile: sum again
                return
            waiters, self._placed_waiters = self._placed_waiters, []
            for w in waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(self._placed)

        run().addBoth(done)

    def _plan(self, info: MediaInfo, old: ScalingHistory, new: ScalingHistory) -> Deferred[Plan]:
        """:func:`~.reorg.plan_for`, with both layouts cached and the diff off the reactor."""
        d = gatherResults([self.layouts.fetch(info, old), self.layouts.fetch(info, new)])

        def diff(both: list[Placed]) -> Deferred[Plan]:
            run = self._layout_runner or self._in_pool  # CPU-bound: a process if we have one
            return run(plan_for_layouts, info, both[0].layout, both[1].layout, old, new)

        return d.addCallback(diff)

    # --- block I/O by owner --------------------------------------------------------------

    def _address(self, node_id: str) -> str:
        for m in self.node.view.members:
            if m.node_id == node_id:
                return m.address
        raise PeerUnavailable(f"node {node_id} is not a member (down?)")

    def _at(
        self, node_id: str, local: Callable[[], Deferred[Any]], command: Any, **kw: Any
    ) -> Deferred[Any]:
        if node_id == self.node.node_id:
            return maybeDeferred(local)
        try:
            address = self._address(node_id)
        except PeerUnavailable:
            return maybeDeferred(self._address, node_id)
        return self.node.rpc.call(address, command, **kw)

    def write_at(self, disk: LogicalDisk, media: str, key: BlockKey, data: bytes) -> Deferred[Any]:
        """Store a block on physical disk ``disk.physical`` of its node."""
        return self._at(
            disk.node_id,
            lambda: self.store.write_block(media, key, data, disk_id=disk.physical),
            PutBlock,
            media=media,
            index=key.index,
            parity=key.parity,
            disk_id=disk.physical,
            data=data,
        )

    def read_at(self, disk: LogicalDisk, media: str, key: BlockKey) -> Deferred[bytes]:
        """Read a block from physical disk ``disk.physical`` (no recovery)."""
        d = self._at(
            disk.node_id,
            lambda: self.store.read_block(media, key, disk_id=disk.physical),
            GetBlock,
            media=media,
            index=key.index,
            parity=key.parity,
            disk_id=disk.physical,
        )
        if disk.node_id != self.node.node_id:
            d.addCallback(lambda r: r["data"])
        return d

    def delete_at(self, disk: LogicalDisk, media: str, key: BlockKey) -> Deferred[Any]:
        """Delete a block from physical disk ``disk.physical``."""
        return self._at(
            disk.node_id,
            lambda: self.store.delete_block(media, key, disk_id=disk.physical),
            DeleteBlock,
            media=media,
            index=key.index,
            parity=key.parity,
            disk_id=disk.physical,
        )

    def media_info(self, name: str) -> MediaInfo:
        """The catalog entry of ``name`` (KeyError if unknown), with its time index once
        loaded (see :meth:`time_index`; a file's index is loaded when its record arrives)."""
        info = self.catalog.media[name]
        return self.indexes.cached(info) or info

    def read_block(self, name: str, index: int) -> Deferred[bytes]:
        """Data block ``index`` of ``name``, from wherever it is, rebuilt from parity if lost."""
        return self.read(name, BlockKey(index))

    @inlineCallbacks
    def read(
        self, name: str, key: BlockKey, recover: bool = True, avoid: Collection[str] = ()
    ) -> Generator[Deferred[Any], Any, bytes]:
        """A block of ``name`` (new place, then old, then parity recovery).

        Places on the nodes in ``avoid`` (silent ones, not yet declared gone) are
        not asked: the block is rebuilt from its parity group instead.
        """
        info = self.catalog.media.get(name)
        if info is None:
            raise BlockMissing(f"no such media: {name}")
        expect = expected_length(info, key)
        problems = []
        for disk in self.places(info, key):
            if disk.node_id in avoid:
                problems.append(f"{disk.physical}: node {disk.node_id} is silent")
                continue
            try:
                data = yield self.read_at(disk, name, key)
            except Exception as e:
                problems.append(f"{disk.physical}: {e}")
                continue
            if len(data) == expect:
                return data
            problems.append(f"{disk.physical}: {len(data)} bytes, expected {expect}")
        if recover and info.parity_group > 0:
            data = yield self._recover(info, key, avoid)
            return data
        raise BlockMissing(f"{name} {key.filename}: {'; '.join(problems)}")

    @inlineCallbacks
    def _recover(
        self, info: MediaInfo, key: BlockKey, avoid: Collection[str] = ()
    ) -> Generator[Deferred[Any], Any, bytes]:
        g = info.parity_group
        group = key.index if key.parity else key.index // g
        members = list(group_members(group, g, info.blocks))
        wanted = [BlockKey(i) for i in members if key.parity or i != key.index]
        if not key.parity:
            wanted.append(BlockKey(group, parity=True))
        try:
            blocks = yield gatherResults(
                [self.read(info.name, w, recover=False, avoid=avoid) for w in wanted],
                consumeErrors=True,
            )
        except FirstError as e:
            why = e.subFailure.getErrorMessage()
            self.parity_watch.group_incomplete(info.name, group, key.filename, why)
            raise BlockMissing(
                f"{info.name} {key.filename}: lost, and its parity group is incomplete "
                f"({e.subFailure.getErrorMessage()})"
            ) from e

        def rebuild() -> bytes:
            if key.parity:
                return make_parity(blocks)
            others = dict(zip((w.index for w in wanted[:-1]), blocks[:-1], strict=True))
            return parity_reconstruct(key.index, others, blocks[-1], info.block_length(key.index))

        data = yield deferToThreadPool(self.reactor, self.pool, rebuild)  # type: ignore[arg-type]
        return data

    # --- RPC handlers ------------------------------------------------------------------

    def _check_local(self, media: str, disk_id: str) -> None:
        try:
            check_name(media)
        except ValueError as e:
            raise StorageRefused(str(e)) from e
        if disk_id not in self.store.disk_ids:
            raise StorageRefused(f"no disk {disk_id} on node {self.node.node_id}")

    def _rpc_put(
        self, media: str, index: int, parity: bool, disk_id: str, data: bytes
    ) -> Deferred[dict[str, Any]]:
        self._check_local(media, disk_id)
        d = self.store.write_block(media, BlockKey(index, parity), data, disk_id=disk_id)
        return d.addCallback(lambda _: {})

    def _rpc_get(
        self, media: str, index: int, parity: bool, disk_id: str
    ) -> Deferred[dict[str, Any]]:
        self._check_local(media, disk_id)
        d = self.store.read_block(media, BlockKey(index, parity), disk_id=disk_id)
        return d.addCallback(lambda data: {"data": data})

    def _rpc_delete(
        self, media: str, index: int, parity: bool, disk_id: str
    ) -> Deferred[dict[str, Any]]:
        self._check_local(media, disk_id)
        d = self.store.delete_block(media, BlockKey(index, parity), disk_id=disk_id)
        return d.addCallback(lambda n: {"removed": n})

    def _rpc_count(self) -> Deferred[dict[str, Any]]:
        d = self._refresh_stored()
        return d.addCallback(lambda counts: {"counts": json.dumps(counts)})

    def _rpc_detach(self, disk_id: str) -> dict[str, Any]:
        return {"detached": self._detach(disk_id)}

    def _rpc_rebuild(self, disk_id: str) -> Deferred[dict[str, Any]]:
        if disk_id not in self.store.disk_ids:
            raise StorageRefused(f"no disk {disk_id} on node {self.node.node_id}")
        return self.rebuild_local(disk_id)

    def _detach(self, disk_id: str) -> bool:
        if disk_id not in self.store.disk_ids:
            return False
        self.store.remove_disk(disk_id)
        self._local = [d for d in self._local if d.disk_id != disk_id]
        self._stored.pop(disk_id, None)
        return True

    def _refresh_stored(self) -> Deferred[dict[str, int]]:
        def keep(counts: dict[str, int]) -> dict[str, int]:
            self._stored = counts
            return counts

        return self.store.block_counts().addCallback(keep)

    # --- status --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``disks`` and ``media`` of CONTRACT §3 (``blocks`` computed from placement)."""
        cat = self.catalog
        placed = self.placed_counts()
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
                "blocks_pending": self._placed_for != self._placement_state(),
                "reorganisation": dict(self.reorg_progress),
            },
        }

    # --- ingest --------------------------------------------------------------------

    def _require_nodes_up(self, history: ScalingHistory) -> None:
        up = {m.node_id for m in self.node.view.members} | {self.node.node_id}
        down: dict[str, list[str]] = {}
        for ld in history.disks:
            if ld.node_id not in up:
                down.setdefault(ld.node_id, [])
                if ld.physical not in down[ld.node_id]:
                    down[ld.node_id].append(ld.physical)
        if down:
            detail = "; ".join(f"node {n} (disks {', '.join(ds)})" for n, ds in down.items())
            raise ApiError(f"cannot place blocks: {detail} is down", 503)

    @inlineCallbacks
    def ingest(
        self,
        content: IO[bytes],
        name: str,
        block_size: int | None = None,
        parity_group: int | None = None,
        opaque: bool = False,
    ) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        """Analyse, cut, place and store an uploaded file, then publish its MediaInfo.

        ``parity_group`` G: data blocks per parity block (None: the most the
        disks allow, at most 4; 0: no parity, plain SCADDAR placement, which
        moves the fewest blocks on scaling but survives no disk loss).  A file
        that cannot be streamed is refused (415) unless ``opaque``.
        """
        try:
            check_name(name)
        except ValueError as e:
            raise ApiError(str(e)) from e
        cat = self.catalog
        if name in cat.media or name in self._ingesting:
            raise ApiError(f"media {name} already exists", 409)
        if cat.pending is not None or self._scaling:
            raise ApiError("a disk reorganisation is under way; ingest again when it ends", 409)
        history = cat.history
        if history is None:
            raise ApiError("no disks are registered yet", 503)
        self._require_nodes_up(history)
        self._ingesting.add(name)
        copies: list[IO[bytes]] = []
        try:
            started = float(self.reactor.seconds())
            lock = threading.Lock()
            seed = self.node.rng.getrandbits(63)
            try:
                group, parity_warning = group_size_for(history, parity_group)
            except ParityError as e:
                raise ApiError(str(e)) from e
            try:
                info, stored, warnings = yield deferToThreadPool(
                    self.reactor,
                    self.pool,  # type: ignore[arg-type]
                    _analyse,
                    content,
                    lock,
                    name,
                    seed,
                    block_size,
                    group,
                )
            except ValueError as e:
                raise ApiError(str(e)) from e
            if stored is not content:
                copies.append(stored)
                content = stored
            if not info.streamable and not opaque:
                raise ApiError(
                    f"{name} cannot be streamed: {unstreamable_reason(info)}; not stored "
                    "(ingest with --opaque to store it as opaque blocks)",
                    415,
                )
            placed = yield self.layouts.fetch(info, history)
            layout = placed.layout
            table = history.disks
            step = info.parity_group or 4

            def one_group(first: int) -> Deferred[Any]:
                count = min(step, info.blocks - first)
                g = first // step if info.parity_group else None
                d = deferToThreadPool(
                    self.reactor,
                    self.pool,  # type: ignore[arg-type]
                    _cut_group,
                    content,
                    lock,
                    info,
                    first,
                    count,
                    g,
                )

                def send(items: list[tuple[BlockKey, bytes]]) -> Deferred[Any]:
                    writes = []
                    for key, data in items:
                        index = (layout.parity if key.parity else layout.data)[key.index]
                        writes.append(self.write_at(table[index], name, key, data))
                    return gatherResults(writes, consumeErrors=True).addErrback(_unwrap)

                return d.addCallback(send)

            # Let every group settle before judging, so no write lands after a cleanup.
            results = yield _bounded(
                INGEST_WINDOW,
                (partial(one_group, first) for first in range(0, info.blocks, step)),
            )
            failures = [r for ok, r in results if not ok]
            if failures:
                # Never published, so unreachable: delete what was written (best effort;
                # a node that is down keeps its orphans).
                yield self._discard(info, layout, table)
                err = failures[0].value
                if isinstance(err, PeerUnavailable):
                    raise ApiError(f"ingest of {name} failed, a node is down: {err}", 503) from err
                failures[0].raiseException()
            # Another node may have registered its disks meanwhile (a fresh history
            # while the catalog had no media): move what we wrote to the new places.
            for _ in range(3):
                current = self.catalog.history
                if current is None or current == history or self.catalog.pending is not None:
                    break
                plan = yield self._plan(info, history, current)
                throttle = yield self._run_moves(info, plan.moves, float("inf"), history)
                if throttle.failures:
                    raise ApiError(f"ingest of {name} failed: the disks changed under it", 503)
                yield self._delete_old([(info, m) for m in plan.moves])
                history = current
            bare = yield self.indexes.store(info)  # the index, beside the data, once
            entry = bare.to_record()
            self._published[name] = entry
            yield self.doc.put({MEDIA + name: entry})
            self._refresh_stored()
            yield self.refresh_placed()
            seconds = max(float(self.reactor.seconds()) - started, 1e-9)
            return {
                "name": name,
                "kind": info.kind,
                "bytes": info.size,
                "blocks": info.blocks,
                "block_size": info.block_size,
                "parity_group": info.parity_group,
                "seed": info.seed,
                "streamable": info.streamable,
                "duration": info.duration,
                "message": info.message,
                "warnings": [*warnings, *([parity_warning] if parity_warning else [])],
                "seconds": round(seconds, 3),
            }
        finally:
            self._ingesting.discard(name)
            for copy in copies:
                copy.close()

    def _discard(
        self, info: MediaInfo, layout: Layout, table: tuple[LogicalDisk, ...]
    ) -> Deferred[Any]:
        """Delete every block of an unpublished file from where it was placed."""
        keys = [(BlockKey(i), d) for i, d in enumerate(layout.data)]
        keys += [(BlockKey(g, True), d) for g, d in enumerate(layout.parity)]
        window = DeferredSemaphore(INGEST_WINDOW)

        def one(key: BlockKey, disk: int) -> Deferred[Any]:
            return self.delete_at(table[disk], info.name, key).addErrback(lambda _: None)

        d = gatherResults([window.run(one, k, d) for k, d in keys], consumeErrors=True)
        return d.addBoth(lambda _: self.log.warn("ingest of {n} failed: its blocks deleted",
                                                 n=info.name))  # fmt: skip

    # --- scaling -------------------------------------------------------------------

    def scale_add(self, disk: PhysicalDisk, rate: float | None = None) -> Deferred[dict[str, Any]]:
        """SCADDAR-add ``disk`` and move blocks onto it; fires with the move summary."""
        cat = self.catalog
        if any(d.disk_id == disk.disk_id for d in cat.all_disks()):
            raise ApiError(f"disk {disk.disk_id} is already in use", 409)
        if any(d.node_id == disk.node_id and d.path == disk.path for d in cat.all_disks()):
            raise ApiError(f"{disk.path} on node {disk.node_id} is already a disk", 409)
        if cat.history is None:
            raise ApiError("no disks are registered yet", 503)
        try:
            new = add_physical(cat.history, disk, cat.policy)
        except DiskError as e:
            raise ApiError(str(e)) from e
        return self._scale(new, (*cat.disks, disk), None, rate)

    def scale_remove(self, disk_id: str, rate: float | None = None) -> Deferred[dict[str, Any]]:
        """SCADDAR-remove ``disk_id``, moving its blocks away first."""
        cat = self.catalog
        gone = next((d for d in cat.disks if d.disk_id == disk_id), None)
        if gone is None or cat.history is None:
            raise ApiError(f"no such disk: {disk_id}", 404)
        try:
            new = remove_physical(cat.history, disk_id)
        except DiskError as e:
            raise ApiError(str(e)) from e
        return self._scale(new, tuple(d for d in cat.disks if d.disk_id != disk_id), gone, rate)

    @inlineCallbacks
    def _scale(
        self,
        new: ScalingHistory,
        disks: tuple[PhysicalDisk, ...],
        removed: PhysicalDisk | None,
        rate: float | None,
    ) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        cat = self.catalog
        if cat.pending is not None or self._scaling or self._ingesting:
            raise ApiError("another ingest or reorganisation is under way", 409)
        old = cat.history
        assert old is not None
        self._scaling = True
        self.reorg_progress.update(blocks_to_move=0, blocks_moved=0)
        started = float(self.reactor.seconds())
        try:
            pending = {"history": new.to_json(), "disks": [d.to_json() for d in disks]}

            def start(t: dict[str, Any] | None) -> dict[str, Any]:
                t = t or self._no_topology()
                return {**t, "pending": t.get("pending") or pending}

            won = yield self.doc.claim_record(TOPOLOGY, start)
            if not won or self.catalog.pending != new:
                # Another node started a reorganisation (or changed the catalog) at
                # the same moment; its version replaces ours everywhere.
                raise ApiError("another ingest or reorganisation is under way", 409)
            moved = total = nbytes = 0
            done: list[tuple[MediaInfo, Move]] = []
            for info in sorted(self.catalog.media.values(), key=lambda m: m.name):
                plan = yield self._plan(info, old, new)
                total += plan.total
                self.reorg_progress["blocks_to_move"] += len(plan.moves)
                throttle = yield self._run_moves(info, plan.moves, rate or self.move_rate)
                if throttle.failures:
                    yield self._update_topology(lambda v: {**v, "pending": None})
                    raise ApiError(
                        f"reorganisation abandoned: {len(throttle.failures)} block(s) of "
                        f"{info.name} could not be moved (is a node down?); nothing changed",
                        503,
                    )
                moved += len(plan.moves)
                nbytes += sum(m.size for m in plan.moves)
                done.extend((info, m) for m in plan.moves)
            copied = float(self.reactor.seconds())

            def commit(v: dict[str, Any]) -> dict[str, Any]:
                out = {**v, "history": new.to_json(), "disks": pending["disks"], "pending": None}
                if removed is not None:
                    entry = {
                        "node_id": removed.node_id,
                        "path": removed.path,
                        "disk_id": removed.disk_id,
                    }
                    out["retired"] = [*v.get("retired", []), entry]
                return out

            yield self._update_topology(commit)
            yield self._delete_old(done)
            yield self.refresh_placed()
            if removed is not None:
                yield self._at(
                    removed.node_id,
                    lambda: succeed(self._detach(removed.disk_id)),
                    DetachDisk,
                    disk_id=removed.disk_id,
                ).addErrback(self._log_failure, f"detaching {removed.disk_id}")
            self._refresh_stored()
            now = float(self.reactor.seconds())
            return {
                "moved": moved,
                "total": total,
                "bytes": nbytes,
                "copy_seconds": round(copied - started, 3),
                "seconds": round(now - started, 3),
                "summary": f"moved {moved} of {total} blocks",
            }
        finally:
            self._scaling = False
            self.reactor.callLater(0, self._reconcile)

    def _move(self, info: MediaInfo, move: Move, staged: bool) -> Deferred[Any]:
        d = self.read_at(move.src_disk, info.name, move.key)

        def check(data: bytes) -> bytes:
            if len(data) != expected_length(info, move.key):
                raise BlockMissing(f"{info.name} {move.key.filename}: damaged at its old place")
            return data

        d.addCallback(check)
        if not staged:
            # Old copy gone or its node down: rebuild it from the block's group.
            d.addErrback(lambda _: self.read(info.name, move.key))
        return d.addCallback(lambda data: self.write_at(move.dst_disk, info.name, move.key, data))

    def _run_moves(
        self,
        info: MediaInfo,
        moves: Iterable[Move],
        rate: float,
        staged: ScalingHistory | None = None,
    ) -> Deferred[Any]:
        """Copy ``moves`` at ``rate`` bytes/s; ``staged``: a file not yet in the catalog."""
        clock = self.reactor
        rate = min(rate, 1e15)
        throttle = MoveThrottle(
            list(moves), rate, float(clock.seconds()), max_in_flight=MOVES_IN_FLIGHT
        )
        finished: Deferred[MoveThrottle] = Deferred()
        timer: list[IDelayedCall] = []

        def ok(_: object, move: Move) -> None:
            throttle.finished(move, float(clock.seconds()))
            if self._scaling:
                self.reorg_progress["blocks_moved"] += 1
                self.reorg_progress["blocks_moved_total"] += 1
            clock.callLater(0, pump)

        def bad(f: Failure, move: Move) -> None:
            self.log.warn(
                "storage: move of {name} {key} failed: {e}",
                name=info.name,
                key=move.key.filename,
                e=f.getErrorMessage(),
            )
            throttle.failed(move, float(clock.seconds()))
            clock.callLater(0, pump)

        def pump() -> None:
            if finished.called:
                return
            if timer and timer[0].active():
                timer.pop().cancel()
            timer.clear()
            now = float(clock.seconds())
            for move in throttle.start(now):
                d = self._move(info, move, staged is not None)
                d.addCallbacks(ok, bad, callbackArgs=(move,), errbackArgs=(move,))
            if throttle.complete:
                finished.callback(throttle)
                return
            wake = throttle.next_wakeup(now)
            if wake is not None:
                timer.append(clock.callLater(max(0.0, wake - now), pump))

        pump()
        return finished

    def _delete_old(self, done: list[tuple[MediaInfo, Move]]) -> Deferred[Any]:
        def one(info: MediaInfo, move: Move) -> Deferred[Any]:
            d = self.delete_at(move.src_disk, info.name, move.key)
            return d.addErrback(
                lambda f: self.log.warn(
                    "storage: old copy of {name} {key} on {disk} not deleted: {e}",
                    name=info.name,
                    key=move.key.filename,
                    disk=move.src_disk.physical,
                    e=f.getErrorMessage(),
                )
            )

        return _bounded(8, (partial(one, info, m) for info, m in done))

    # --- rebuild --------------------------------------------------------------------

    @inlineCallbacks
    def rebuild_local(self, disk_id: str) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        """Restore every block that belongs on local ``disk_id`` and is missing or damaged.

        Blocks of files ingested without parity cannot be restored: they are
        counted as ``lost`` (and the files named in ``unprotected``).
        """
        restored = present = lost = 0
        unprotected: list[str] = []
        for info in sorted(self.catalog.media.values(), key=lambda m: m.name):
            found = yield self.layout_of(info)
            if found is None:
                continue
            history, layout = found.history, found.layout
            keys = [
                BlockKey(i)
                for i, d in enumerate(layout.data)
                if history.disks[d].physical == disk_id
            ]
            keys += [
                BlockKey(g, True)
                for g, d in enumerate(layout.parity)
                if history.disks[d].physical == disk_id
            ]
            if info.parity_group == 0:
                here = yield gatherResults(
                    [self.store.has_block(info.name, k, disk_id) for k in keys]
                )
                missing = sum(1 for ok in here if not ok)
                present += len(keys) - missing
                if missing:
                    lost += missing
                    unprotected.append(info.name)
                continue

            def fetch(media: str, key: BlockKey) -> Deferred[bytes]:
                return self.read(media, key, recover=False)

            report = yield self.store.rebuild(disk_id, info, keys, fetch)
            restored += len(report.restored)
            present += report.present
        self._refresh_stored()
        return {"restored": restored, "present": present, "lost": lost, "unprotected": unprotected}

    # --- admin routes ----------------------------------------------------------------

    def _route_list(self, body: dict[str, Any], query: dict[str, str]) -> dict[str, Any]:
        media = [
            {**m.to_record(), "block_times": m.blocks if m.index_digest else 0}
            for m in sorted(self.catalog.media.values(), key=lambda m: m.name)
        ]
        return {"media": media}

    def _route_ingest(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        name = query.get("name", "")
        size = query.get("block_size")
        if size is not None and not size.isdigit():
            raise ApiError("block_size must be a positive integer")
        group = query.get("parity_group")
        if group is not None and not group.isdigit():
            raise ApiError("parity_group must be a whole number (0: no parity)")
        if "content" not in body:
            raise ApiError("upload the file as the request body")
        return self.ingest(
            body["content"],
            name,
            int(size) if size else None,
            int(group) if group else None,
            opaque=query.get("opaque", "0") in ("1", "true", "yes"),
        )

    @inlineCallbacks
    def _route_remove_media(
        self, body: dict[str, Any], query: dict[str, str]
    ) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        """``POST /api/yima/media/delete {name}``: drop ``name`` from the catalog (with a
        tombstone, so the node that ingested it does not publish it again), then delete
        its data and parity blocks on every disk. Refused while disks are reorganised."""
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError('give the media name as {"name": NAME}')
        cat = self.catalog
        info = cat.media.get(name)
        if info is None:
            raise ApiError(f"no media named {name}", 404)
        if cat.pending is not None or self._scaling or name in self._ingesting:
            raise ApiError("a disk reorganisation (or an ingest of it) is under way; retry", 409)
        found = yield self.layout_of(info)  # cached, or computed off the reactor
        self._ingesting.add(name)  # no ingest of the same name until its blocks are gone
        try:
            yield self.doc.update(
                lambda v: {
                    **v,
                    "media": {n: m for n, m in v["media"].items() if n != name},
                    "removed": {**(v.get("removed") or {}), name: info.seed},
                }
            )
            self._published.pop(name, None)
            deleted = failed = 0
            if found is not None:
                history, layout = found.history, found.layout
                keys = [(BlockKey(i), d) for i, d in enumerate(layout.data)]
                keys += [(BlockKey(g, True), d) for g, d in enumerate(layout.parity)]
                results = yield _bounded(
                    INGEST_WINDOW,
                    (partial(self.delete_at, history.disks[d], name, key) for key, d in keys),
                )
                deleted = sum(1 for ok, _ in results if ok)
                failed = len(results) - deleted
            self._refresh_stored()
            self.log.info(
                "media {name} removed: {deleted} blocks deleted, {failed} not reached",
                name=name,
                deleted=deleted,
                failed=failed,
            )
            return {"name": name, "blocks_deleted": deleted, "blocks_not_reached": failed}
        finally:
            self._ingesting.discard(name)

    def _route_block(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        name = query.get("name", "")
        info = self.catalog.media.get(name)
        if info is None:
            raise ApiError(f"no such media: {name}", 404)
        try:
            key = BlockKey(int(query.get("index", "")), query.get("parity", "0") == "1")
            expected_length(info, key)
            if key.parity and key.index >= -(-info.blocks // max(info.parity_group, 1)):
                raise IndexError("no such parity group")
        except (ValueError, IndexError) as e:
            raise ApiError(f"bad block: {e}") from e
        d = self.read(name, key, recover=query.get("recover", "1") == "1")

        def missing(f: Failure) -> None:
            f.trap(BlockMissing)
            raise ApiError(f.getErrorMessage(), 503)

        d.addCallbacks(lambda data: {"data": base64.b64encode(data).decode("ascii")}, missing)
        return d

    def _route_add_disk(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        path = body.get("path")
        node_id = body.get("node") or self.node.node_id
        capacity = body.get("capacity")
        if not isinstance(path, str) or not Path(path).is_absolute():
            raise ApiError("path must be an absolute directory path on the disk's node")
        if capacity is not None and (not isinstance(capacity, int) or capacity <= 0):
            raise ApiError("capacity must be a positive number of bytes")
        members = {m.node_id for m in self.node.view.members} | {self.node.node_id}
        if node_id not in members:
            raise ApiError(f"node {node_id} is not a member of the cluster", 404)
        taken = {d.disk_id for d in self.catalog.all_disks()}
        k = 0
        while f"{node_id}-{k}" in taken:
            k += 1
        try:
            disk = PhysicalDisk(f"{node_id}-{k}", node_id, path, capacity)
        except DiskError as e:
            raise ApiError(str(e)) from e
        d = self.scale_add(disk, self._rate(body))
        return d.addCallback(lambda r: {**r, "disk_id": disk.disk_id})

    def _route_remove_disk(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        disk_id = body.get("disk_id")
        if not isinstance(disk_id, str) or not disk_id:
            raise ApiError("disk_id is required")
        return self.scale_remove(disk_id, self._rate(body))

    @staticmethod
    def _rate(body: dict[str, Any]) -> float | None:
        rate = body.get("rate")
        if rate is None:
            return None
        if not isinstance(rate, int | float) or rate <= 0:
            raise ApiError("rate must be a positive number of bytes per second")
        return float(rate)

    def _route_rebuild(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        disk_id = body.get("disk_id")
        disk = next((d for d in self.catalog.disks if d.disk_id == disk_id), None)
        if disk is None:
            raise ApiError(f"no such disk: {disk_id}", 404)
        if self.catalog.pending is not None or self._scaling:
            raise ApiError("a disk reorganisation is under way; rebuild when it ends", 409)
        d = self._at(
            disk.node_id,
            lambda: self.rebuild_local(disk.disk_id),
            RebuildDisk,
            disk_id=disk.disk_id,
        )

        def down(f: Failure) -> None:
            f.trap(PeerUnavailable)
            raise ApiError(f"node {disk.node_id} holding {disk.disk_id} is down", 503)

        def report(result: dict[str, Any]) -> dict[str, Any]:
            return {"disk_id": disk.disk_id, **result}

        d.addErrback(down)
        return d.addCallback(report)

    def _route_stored(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        """Block files actually on disk, per disk, asked of every member."""
        nodes = sorted({d.node_id for d in self.catalog.all_disks()})

        def one(node_id: str) -> Deferred[dict[str, int]]:
            d = self._at(node_id, self._refresh_stored, CountBlocks)
            if node_id != self.node.node_id:
                d.addCallback(lambda r: json.loads(r["counts"]))
            return d.addErrback(lambda f: {})

        d = gatherResults([one(n) for n in nodes])

        def merge(results: list[dict[str, int]]) -> dict[str, Any]:
            out: dict[str, int] = {}
            for r in results:
                out.update(r)
            return {"stored": out}

        return d.addCallback(merge)
