"""Ingest: analyse an upload, cut it into blocks with parity, place and store them, publish.

The blocking parts (reading the upload, analysis, cutting, parity XOR) run in the
storage thread pool; at most :data:`INGEST_WINDOW` parity groups are written at once.
A failed ingest deletes what it wrote (the file was never published, so unreachable).
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Generator
from functools import partial
from typing import IO, Any

from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults, inlineCallbacks

from ...cluster.routes import ApiError
from ...cluster.rpc import PeerUnavailable
from ..media import MAX_HEADER, TAIL, Analyser, MediaInfo, check_name, plan, unstreamable_reason
from ..parity import Layout, ParityError, group_size_for, make_parity
from ..placement import LogicalDisk, ScalingHistory
from ..store import BlockKey
from ..timeindex import TimeIndexes
from ._blocks import BlockRouter
from ._catalog import MEDIA
from ._context import StorageContext, unwrap
from ._placing import Placements
from ._reorganise import Reorganiser
from ._work import bounded

__all__ = ["INGEST_WINDOW", "Ingester"]

#: Parity groups written concurrently during an ingest.
INGEST_WINDOW = 3
READ_CHUNK = 1 << 20


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


class Ingester:
    """Stores uploads as placed blocks and publishes their catalog records."""

    def __init__(
        self,
        ctx: StorageContext,
        router: BlockRouter,
        placements: Placements,
        reorganiser: Reorganiser,
        indexes: TimeIndexes,
        *,
        ingesting: set[str],
        published: dict[str, dict[str, Any]],
        refresh_stored: Callable[[], object],
    ) -> None:
        self.ctx = ctx
        self.router = router
        self.placements = placements
        self.reorganiser = reorganiser
        self.indexes = indexes
        #: Names being ingested (or removed): no second ingest of them meanwhile.
        self.ingesting = ingesting
        #: Records this node published (re-published if a concurrent write loses them).
        self.published = published
        self._refresh_stored = refresh_stored

    def require_nodes_up(self, history: ScalingHistory) -> None:
        up = {m.node_id for m in self.ctx.node.view.members} | {self.ctx.node.node_id}
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
        cat = self.ctx.catalog
        if name in cat.media or name in self.ingesting:
            raise ApiError(f"media {name} already exists", 409)
        if cat.pending is not None or self.reorganiser.busy:
            raise ApiError("a disk reorganisation is under way; ingest again when it ends", 409)
        history = cat.history
        if history is None:
            raise ApiError("no disks are registered yet", 503)
        self.require_nodes_up(history)
        self.ingesting.add(name)
        copies: list[IO[bytes]] = []
        try:
            started = self.ctx.now()
            lock = threading.Lock()
            seed = self.ctx.node.rng.getrandbits(63)
            try:
                group, parity_warning = group_size_for(history, parity_group)
            except ParityError as e:
                raise ApiError(str(e)) from e
            try:
                info, stored, warnings = yield self.ctx.in_pool(
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
            placed = yield self.placements.layouts.fetch(info, history)
            layout = placed.layout
            table = history.disks
            step = info.parity_group or 4

            def one_group(first: int) -> Deferred[Any]:
                count = min(step, info.blocks - first)
                g = first // step if info.parity_group else None
                d = self.ctx.in_pool(
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
                        writes.append(self.router.write_at(table[index], name, key, data))
                    return gatherResults(writes, consumeErrors=True).addErrback(unwrap)

                return d.addCallback(send)

            # Let every group settle before judging, so no write lands after a cleanup.
            results = yield bounded(
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
                current = self.ctx.catalog.history
                if current is None or current == history or self.ctx.catalog.pending is not None:
                    break
                plan = yield self.placements.plan(info, history, current)
                throttle = yield self.reorganiser.run_moves(info, plan.moves, float("inf"), history)
                if throttle.failures:
                    raise ApiError(f"ingest of {name} failed: the disks changed under it", 503)
                yield self.reorganiser.delete_old([(info, m) for m in plan.moves])
                history = current
            bare = yield self.indexes.store(info)  # the index, beside the data, once
            entry = bare.to_record()
            self.published[name] = entry
            yield self.ctx.doc.put({MEDIA + name: entry})
            self._refresh_stored()
            yield self.placements.refresh_placed()
            seconds = max(self.ctx.now() - started, 1e-9)
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
            self.ingesting.discard(name)
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
            return self.router.delete_at(table[disk], info.name, key).addErrback(lambda _: None)

        d = gatherResults([window.run(one, k, d) for k, d in keys], consumeErrors=True)
        return d.addBoth(lambda _: self.ctx.log.warn("ingest of {n} failed: its blocks deleted",
                                                 n=info.name))  # fmt: skip

    @inlineCallbacks
    def remove(self, name: str) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        """Drop ``name`` from the catalog (with a tombstone, so the node that ingested it
        does not publish it again), then delete its data and parity blocks on every disk.
        Refused while disks are reorganised."""
        cat = self.ctx.catalog
        info = cat.media.get(name)
        if info is None:
            raise ApiError(f"no media named {name}", 404)
        if cat.pending is not None or self.reorganiser.busy or name in self.ingesting:
            raise ApiError("a disk reorganisation (or an ingest of it) is under way; retry", 409)
        found = yield self.placements.layout_of(info)  # cached, or computed off the reactor
        self.ingesting.add(name)  # no ingest of the same name until its blocks are gone
        try:
            yield self.ctx.doc.update(
                lambda v: {
                    **v,
                    "media": {n: m for n, m in v["media"].items() if n != name},
                    "removed": {**(v.get("removed") or {}), name: info.seed},
                }
            )
            self.published.pop(name, None)
            deleted = failed = 0
            if found is not None:
                history, layout = found.history, found.layout
                keys = [(BlockKey(i), d) for i, d in enumerate(layout.data)]
                keys += [(BlockKey(g, True), d) for g, d in enumerate(layout.parity)]
                results = yield bounded(
                    INGEST_WINDOW,
                    (
                        partial(self.router.delete_at, history.disks[d], name, key)
                        for key, d in keys
                    ),
                )
                deleted = sum(1 for ok, _ in results if ok)
                failed = len(results) - deleted
            self._refresh_stored()
            self.ctx.log.info(
                "media {name} removed: {deleted} blocks deleted, {failed} not reached",
                name=name,
                deleted=deleted,
                failed=failed,
            )
            return {"name": name, "blocks_deleted": deleted, "blocks_not_reached": failed}
        finally:
            self.ingesting.discard(name)
