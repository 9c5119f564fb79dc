"""Placement layouts computed off the reactor, cached in memory and on disk.

A file's layout (:meth:`.parity.FilePlacement.layout`: the logical disk of
every data and parity block) depends only on the file's seed, block count,
parity group size and placement version, and on the scaling history.  For a
2-hour film after ten scaling steps it takes seconds of CPU, so it is never
computed on the reactor: :meth:`LayoutCache.fetch` runs it in the injected
thread pool (or loads a copy persisted by an earlier run) and fires with a
:class:`Placed`.  Entries are keyed by ``(file, scaling history)``, so a
catalog change that does not change the history (an ingest, a deletion, a
disk's registration elsewhere) keeps every cached layout; :meth:`retain` drops
the ones no current or pending history needs.

On disk (``DATA_DIR/layouts/KEY.layout``): a 24-byte header (magic, data and
parity counts) and then every logical disk index as little-endian ``uint16``.
A file that does not match its key's counts is ignored and recomputed.  The
files are a cache: written atomically but not fsynced.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import struct
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

from .media import MediaInfo
from .parity import FilePlacement, Layout
from .placement import LogicalDisk, ScalingHistory

T = TypeVar("T")
Run = Callable[..., "Deferred[Any]"]
SUFFIX = ".layout"
_HEADER = struct.Struct("<8sQQ")
_MAGIC = b"YLAYOUT1"


@lru_cache(maxsize=64)
def history_digest(history: ScalingHistory) -> str:
    """A short stable name for a scaling history (same history, same digest, every node)."""
    text = json.dumps(history.to_json(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def layout_key(info: MediaInfo, history: ScalingHistory) -> str:
    """The cache key (and file stem) of ``info``'s layout under ``history``."""
    return (
        f"{info.name}.{info.seed:x}.{info.blocks}.{info.parity_group}.{info.placement}."
        f"{history_digest(history)}"
    )


@attrs.frozen(eq=False)
class Placed:
    """A file's layout under one history, plus the sums callers ask of it."""

    history: ScalingHistory
    layout: Layout
    #: Blocks (data and parity) per physical disk.
    counts: Mapping[str, int]
    #: Data block indices per node, ascending.
    by_node: Mapping[str, tuple[int, ...]]

    def disk(self, index: int, parity: bool = False) -> LogicalDisk:
        """The logical disk of data block ``index`` (or of parity group ``index``)."""
        return self.history.disks[(self.layout.parity if parity else self.layout.data)[index]]


def summarise(history: ScalingHistory, layout: Layout) -> Placed:
    """:class:`Placed` from a layout (blocking: O(blocks))."""
    table = history.disks
    counts: dict[str, int] = {}
    per_disk = [0] * len(table)
    for d in layout.data:
        per_disk[d] += 1
    for d in layout.parity:
        per_disk[d] += 1
    for d, n in enumerate(per_disk):
        if n:
            phys = table[d].physical
            counts[phys] = counts.get(phys, 0) + n
    node_of = [d.node_id for d in table]
    by_node: dict[str, list[int]] = {}
    for i, d in enumerate(layout.data):
        by_node.setdefault(node_of[d], []).append(i)
    return Placed(history, layout, counts, {n: tuple(b) for n, b in by_node.items()})


def encode(layout: Layout) -> bytes:
    """The persisted form of a layout."""
    body = array("H", layout.data)
    body.extend(layout.parity)
    if struct.pack("=H", 1) != struct.pack("<H", 1):  # pragma: no cover - big-endian host
        body.byteswap()
    return _HEADER.pack(_MAGIC, len(layout.data), len(layout.parity)) + body.tobytes()


def decode(data: bytes, n_data: int, n_parity: int, n_disks: int) -> Layout | None:
    """Inverse of :func:`encode`; None unless it holds exactly these counts of valid disks."""
    if len(data) != _HEADER.size + 2 * (n_data + n_parity):
        return None
    magic, got_data, got_parity = _HEADER.unpack_from(data)
    if magic != _MAGIC or (got_data, got_parity) != (n_data, n_parity):
        return None
    body = array("H")
    body.frombytes(data[_HEADER.size :])
    if struct.pack("=H", 1) != struct.pack("<H", 1):  # pragma: no cover - big-endian host
        body.byteswap()
    if body and max(body) >= n_disks:
        return None
    return Layout(tuple(body[:n_data]), tuple(body[n_data:]))


Parts = tuple[Layout, dict[str, int], dict[str, tuple[int, ...]]]


def load_or_compute(placement: FilePlacement, history: ScalingHistory, path: Path | None) -> Parts:
    """The persisted layout at ``path`` if valid, else computed (and persisted), with its
    sums. Blocking and CPU-bound: run it in a process (or thread) pool."""
    layout = None
    if path is not None:
        try:
            layout = decode(
                path.read_bytes(), placement.n_blocks, placement.n_groups, history.n_disks
            )
        except OSError:
            layout = None
    if layout is None:
        layout = placement.layout(history)
        if path is not None:
            _save(path, encode(layout))
    placed = summarise(history, layout)
    return placed.layout, dict(placed.counts), dict(placed.by_node)


def _save(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        Logger().failure("layouts: cannot persist {path}", path=str(path))


def _prune(directory: Path, keep: frozenset[str]) -> int:
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name.endswith(SUFFIX) and entry.name[: -len(SUFFIX)] not in keep:
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed


class LayoutCache:
    """Layouts per (file, scaling history): in memory, persisted, computed by ``run``.

    ``run(f, *args) -> Deferred`` runs blocking work off the reactor (e.g.
    ``deferToThreadPool`` on the storage pool); every method here is called on
    the reactor thread and never computes a layout itself.
    """

    log = Logger()

    def __init__(self, run: Run, directory: Path | None = None) -> None:
        self._run = run
        self.directory = directory
        self._memory: dict[str, Placed] = {}
        self._waiting: dict[str, list[Deferred[Placed]]] = {}
        self._last: tuple[MediaInfo, ScalingHistory, Placed] | None = None
        #: Layouts computed or loaded (not served from memory), for status and tests.
        self.computed = 0

    def __len__(self) -> int:
        return len(self._memory)

    def get(self, info: MediaInfo, history: ScalingHistory) -> Placed | None:
        """The cached layout, or None (never computes)."""
        last = self._last
        if last is not None and last[0] is info and last[1] is history:
            return last[2]  # per-block callers ask for the same file again and again
        placed = self._memory.get(layout_key(info, history))
        if placed is not None:
            self._last = (info, history, placed)
        return placed

    def fetch(self, info: MediaInfo, history: ScalingHistory) -> Deferred[Placed]:
        """The layout, from memory, else loaded or computed off the reactor."""
        key = layout_key(info, history)
        hit = self._memory.get(key)
        if hit is not None:
            return succeed(hit)
        d: Deferred[Placed] = Deferred()
        waiters = self._waiting.get(key)
        if waiters is not None:
            waiters.append(d)
            return d
        self._waiting[key] = [d]
        path = None if self.directory is None else self.directory / f"{key}{SUFFIX}"
        work = self._run(load_or_compute, FilePlacement.of(info), history, path)
        work.addBoth(self._done, key, history)
        return d

    def _done(self, parts: Parts | Failure, key: str, history: ScalingHistory) -> None:
        result: Placed | Failure
        if isinstance(parts, Failure):
            result = parts
        else:
            layout, counts, by_node = parts
            result = self._memory[key] = Placed(history, layout, counts, by_node)
            self.computed += 1
        for d in self._waiting.pop(key, []):
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def retain(self, wanted: Iterable[tuple[MediaInfo, ScalingHistory]]) -> Deferred[int]:
        """Forget every layout but ``wanted`` (memory and disk); fires with files removed."""
        keep = frozenset(layout_key(i, h) for i, h in wanted)
        for key in [k for k in self._memory if k not in keep]:
            del self._memory[key]
        self._last = None
        if self.directory is None:
            return succeed(0)
        return self._run(_prune, self.directory, keep)


class ProcessRunner:
    """``run(f, *args) -> Deferred`` in a pool of spawned worker processes.

    Layouts are pure Python and CPU-bound: computed in a thread, they hold the
    GIL and starve the reactor thread (100+ ms answers were measured with the
    storage thread pool busy), so a node computes them in child processes.
    ``f`` and its arguments must be picklable; workers start on first use.
    """

    def __init__(self, reactor: IReactorFromThreads, workers: int = 1) -> None:
        self._reactor = reactor
        self._workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def __call__(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``f(*args)`` in a worker; fires on the reactor thread."""
        d: Deferred[T] = Deferred()
        try:
            future = self._pool().submit(f, *args)
        except BrokenProcessPool:  # a worker died (e.g. killed): start afresh, once
            self._executor = None
            try:
                future = self._pool().submit(f, *args)
            except Exception:
                return fail()
        except Exception:
            return fail()
        future.add_done_callback(lambda done: self._reactor.callFromThread(self._deliver, d, done))
        return d

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            context = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(
                self._workers,
                mp_context=context,
                initializer=_exit_with_parent,
                initargs=(os.getpid(),),
            )
        return self._executor

    def _deliver(self, d: Deferred[T], future: Future[T]) -> None:
        if future.cancelled():
            d.errback(Failure(CancelledError("layout computation cancelled")))
            return
        error = future.exception()
        if isinstance(error, BrokenProcessPool):
            self._executor = None  # the next call starts new workers
        if error is not None:
            d.errback(Failure(error))
        else:
            d.callback(future.result())

    def stop(self) -> None:
        """Stop the workers (pending work is cancelled; a worker also exits by itself
        within a second of its node's process ending, however that ends)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def _exit_with_parent(parent: int, period: float = 0.5) -> None:
    """In a worker: a daemon thread ends the process once ``parent`` is gone (a node
    stopped by a signal would otherwise leave its idle workers behind)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(period)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def counts_of(placed: Iterable[Placed], disks: Iterable[str]) -> dict[str, int]:
    """Blocks per physical disk summed over files (every disk in ``disks`` listed)."""
    out = dict.fromkeys(disks, 0)
    for p in placed:
        for disk, n in p.counts.items():
            out[disk] = out.get(disk, 0) + n
    return out
