"""Placement layouts off the reactor: cached per (file, history), persisted, never computed inline."""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from yimaporc.cluster.node import ClusterNode, NodeConfig
from yimaporc.yima.disks import PhysicalDisk
from yimaporc.yima.layouts import LayoutCache, ProcessRunner, decode, encode, layout_key
from yimaporc.yima.media import MediaInfo
from yimaporc.yima.parity import FilePlacement, Layout
from yimaporc.yima.placement import LogicalDisk, ScalingHistory
from yimaporc.yima.reorg import plan_for
from yimaporc.yima.service import YimaStorageService
from yimaporc.yima.store import BlockKey


class _Reactor(MemoryReactorClock):
    def callFromThread(self, f: Callable[..., object], *args: Any, **kw: Any) -> None:
        f(*args, **kw)


class ManualPool:
    """A ``ThreadPool`` look-alike that only queues work; :meth:`run` does it."""

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[..., object], Callable[..., Any], tuple[Any, ...]]] = []
        self.done = 0

    def callInThreadWithCallback(
        self, on_result: Callable[..., object], f: Callable[..., Any], *args: Any
    ) -> None:
        """Queue ``f(*args)``."""
        self.queue.append((on_result, f, args))

    def run(self) -> int:
        """Run everything queued (and queued meanwhile); how many jobs ran."""
        n = 0
        while self.queue:
            on_result, f, args = self.queue.pop(0)
            try:
                result = f(*args)
            except BaseException:
                on_result(False, Failure())
            else:
                on_result(True, result)
            n += 1
        self.done += n
        return n


def _history(steps: int = 0) -> ScalingHistory:
    h = ScalingHistory(
        [LogicalDisk(f"n{n}-{k}", f"n{n}", f"n{n}-{k}") for n in range(3) for k in range(2)]
    )
    for s in range(steps):
        h = h.add([LogicalDisk(f"x{s}", f"n{s % 3}", f"x{s}")]) if s % 2 == 0 else h.remove([0])
    return h


def _info(name: str = "film", blocks: int = 400, group: int = 2, seed: int = 99) -> MediaInfo:
    return MediaInfo(name, "opaque", blocks * 1000, 1000, seed, group)


def _cache(tmp_path: Path | None) -> tuple[ManualPool, LayoutCache]:
    reactor = _Reactor()
    pool = ManualPool()

    def run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, pool, f, *args)  # type: ignore[arg-type]

    return pool, LayoutCache(run, None if tmp_path is None else tmp_path / "layouts")


def _value(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def test_fetch_computes_in_the_pool_once_and_then_hits() -> None:
    """fetch() computes nothing inline; concurrent fetches share one job; the next one hits."""
    pool, cache = _cache(None)
    info, history = _info(), _history(4)
    first, second = cache.fetch(info, history), cache.fetch(info, history)
    assert not first.called and not second.called and len(pool.queue) == 1
    assert cache.get(info, history) is None
    assert pool.run() == 1
    placed = _value(first)
    assert _value(second) is placed
    assert placed.layout == FilePlacement.of(info).layout(history)
    assert _value(cache.fetch(info, history)) is placed and not pool.queue
    assert cache.get(info, history) is placed


def test_same_history_rebuilt_from_json_hits_other_history_misses() -> None:
    """The key is the history's content: a re-parsed equal history hits, one more step misses."""
    pool, cache = _cache(None)
    info, history = _info(), _history(3)
    cache.fetch(info, history)
    pool.run()
    again = ScalingHistory.from_json(history.to_json())
    assert again is not history
    assert cache.get(info, again) is not None
    assert layout_key(info, again) == layout_key(info, history)
    assert cache.get(info, _history(4)) is None
    assert cache.get(_info(seed=100), history) is None


def test_summary_counts_and_node_blocks_match_the_layout() -> None:
    """Placed.counts sums blocks per physical disk; by_node lists each node's data blocks."""
    pool, cache = _cache(None)
    info, history = _info(blocks=101, group=3), _history(2)
    d = cache.fetch(info, history)
    pool.run()
    placed = _value(d)
    layout = FilePlacement.of(info).layout(history)
    assert sum(placed.counts.values()) == len(layout.data) + len(layout.parity)
    for node in ("n0", "n1", "n2"):
        want = [i for i, x in enumerate(layout.data) if history.disks[x].node_id == node]
        assert list(placed.by_node.get(node, ())) == want
    assert placed.disk(5) == history.disks[layout.data[5]]
    assert placed.disk(2, parity=True) == history.disks[layout.parity[2]]


def test_persisted_layout_is_loaded_not_recomputed(tmp_path: Path) -> None:
    """A second cache over the same directory reads the stored file instead of computing."""
    pool, cache = _cache(tmp_path)
    info, history = _info(), _history(2)
    cache.fetch(info, history)
    pool.run()
    path = tmp_path / "layouts" / f"{layout_key(info, history)}.layout"
    assert path.exists()
    # Plant a different valid layout of the right shape: a reload must return it as is.
    planted = Layout((0,) * info.blocks, (1,) * (info.blocks // 2))
    path.write_bytes(encode(planted))
    pool2, cache2 = _cache(tmp_path)
    d = cache2.fetch(info, history)
    pool2.run()
    assert _value(d).layout == planted


def test_damaged_persisted_layout_is_recomputed(tmp_path: Path) -> None:
    """A truncated or wrong-shaped layout file is ignored and the layout recomputed."""
    pool, cache = _cache(tmp_path)
    info, history = _info(), _history(1)
    path = tmp_path / "layouts" / f"{layout_key(info, history)}.layout"
    path.parent.mkdir(parents=True)
    path.write_bytes(encode(Layout((0,) * 3, ()))[:-1])
    d = cache.fetch(info, history)
    pool.run()
    assert _value(d).layout == FilePlacement.of(info).layout(history)
    assert decode(path.read_bytes(), info.blocks, info.blocks // 2, history.n_disks) is not None


def test_decode_rejects_other_shapes_and_out_of_range_disks() -> None:
    """decode() takes only its own format with the expected counts and valid disk indices."""
    layout = Layout((0, 5, 2), (4,))
    data = encode(layout)
    assert decode(data, 3, 1, 6) == layout
    assert decode(data, 3, 0, 6) is None
    assert decode(data, 3, 1, 5) is None
    assert decode(b"X" + data[1:], 3, 1, 6) is None


def test_retain_forgets_unwanted_layouts_in_memory_and_on_disk(tmp_path: Path) -> None:
    """retain() keeps only the wanted (file, history) layouts, in memory and as files."""
    pool, cache = _cache(tmp_path)
    info, old, new = _info(), _history(1), _history(2)
    cache.fetch(info, old)
    cache.fetch(info, new)
    pool.run()
    d = cache.retain([(info, new)])
    pool.run()
    assert _value(d) == 1
    assert cache.get(info, old) is None and cache.get(info, new) is not None
    files = sorted(p.name for p in (tmp_path / "layouts").iterdir())
    assert files == [f"{layout_key(info, new)}.layout"]


# --- the storage service over a queued pool --------------------------------------------------


def _service(tmp_path: Path) -> tuple[_Reactor, ManualPool, YimaStorageService]:
    reactor = _Reactor()
    config = NodeConfig("y1", "yima", tmp_path / "data", "127.0.0.1", 1)
    node = ClusterNode(reactor, config, b"s" * 32, rng=random.Random(7))
    pool = ManualPool()
    disks = [(tmp_path / f"d{i}", None) for i in range(3)]
    service = YimaStorageService(node, reactor, pool, disks)  # type: ignore[arg-type]
    service.startService()
    pool.run()
    return reactor, pool, service


def _publish(service: YimaStorageService, *infos: MediaInfo) -> None:
    entries = {i.name: i.to_json() for i in infos}
    service.doc.update(lambda v: {**v, "media": {**v["media"], **entries}})


def test_status_never_computes_a_layout_inline(tmp_path: Path) -> None:
    """/api/status answers at once from cached counts and leaves the layouts to the pool."""
    _, pool, service = _service(tmp_path)
    info = _info(blocks=3000, group=2)
    _publish(service, info)
    assert pool.queue, "the catalog change queues the layout in the pool"
    status = service.status()
    assert [d["blocks"] for d in status["disks"]] == [0, 0, 0]
    assert service.layouts.get(info, service.catalog.history) is None  # type: ignore[arg-type]
    pool.run()
    status = service.status()
    assert sum(d["blocks"] for d in status["disks"]) == 3000 + 1500
    assert not pool.queue


def test_unrelated_catalog_changes_keep_cached_layouts(tmp_path: Path) -> None:
    """Publishing another file recomputes nothing for the first; a scaling history does."""
    _, pool, service = _service(tmp_path)
    film = _info("film", blocks=2000)
    _publish(service, film)
    pool.run()
    computed = service.layouts.computed
    _publish(service, _info("clip", blocks=10, seed=5))
    pool.run()
    assert service.layouts.computed == computed + 1  # the clip only
    history = service.catalog.history
    assert history is not None
    grown = history.add([LogicalDisk("y1-9", "y1", "y1-9")])
    service.doc.update(lambda v: {**v, "history": grown.to_json()})
    assert service.layouts.get(film, grown) is None
    pool.run()
    assert service.layouts.computed == computed + 3  # both files under the new history
    assert service.layouts.get(film, grown) is not None
    assert service.layouts.get(film, history) is None  # the old one is forgotten


def test_stream_share_waits_for_the_layout(tmp_path: Path) -> None:
    """blocks_of_node() fires only after the pool computed the layout, with the node's blocks."""
    _, pool, service = _service(tmp_path)
    film = _info("film", blocks=500)
    _publish(service, film)
    d = service.blocks_of_node("film", "y1")
    assert not d.called
    pool.run()
    assert _value(d) == list(range(500))  # one node: every data block is its own
    assert service.blocks_of_node("film", "y1").called  # cached now


def test_places_on_a_miss_agrees_with_the_layout(tmp_path: Path) -> None:
    """places() without a cached layout computes only the block's group, same answer."""
    _, pool, service = _service(tmp_path)
    film = _info("film", blocks=300, group=2)
    _publish(service, film)
    history = service.catalog.history
    assert history is not None
    layout = FilePlacement.of(film).layout(history)
    for i in (0, 7, 299):
        assert service.places(film, BlockKey(i)) == [history.disks[layout.data[i]]]
    assert service.places(film, BlockKey(149, True)) == [history.disks[layout.parity[149]]]
    pool.run()
    assert service.places(film, BlockKey(7)) == [history.disks[layout.data[7]]]


def _pump(reactor: _Reactor, pool: ManualPool, d: Deferred[Any]) -> Any:
    for _ in range(20_000):
        if d.called:
            break
        pool.run()
        reactor.advance(0.001)
    return _value(d)


def test_ingest_and_scaling_leave_the_new_layouts_cached_and_persisted(tmp_path: Path) -> None:
    """Ingest and disk add compute layouts in the pool; moves match plan_for; the new
    history's layout is cached and on disk when the add returns."""
    reactor, pool, service = _service(tmp_path)
    blob = random.Random(3).randbytes(120_000)
    d = service.ingest(io.BytesIO(blob), "blob", block_size=1000, opaque=True)
    assert not d.called
    _pump(reactor, pool, d)
    info = service.media_info("blob")
    old = service.catalog.history
    assert old is not None and service.layouts.get(info, old) is not None
    d = service.scale_add(PhysicalDisk("y1-3", "y1", str(tmp_path / "d3")), rate=1e12)
    assert not d.called
    out = _pump(reactor, pool, d)
    new = service.catalog.history
    assert new is not None and new.n_disks == old.n_disks + 1
    plan = plan_for(info, old, new)
    assert (out["moved"], out["total"]) == (plan.moved, plan.total) and plan.moved > 0
    assert service.layouts.get(info, new) is not None
    stored = tmp_path / "data" / "layouts" / f"{layout_key(info, new)}.layout"
    assert stored.exists()
    for i in (0, 60, 119):
        assert (
            _pump(reactor, pool, service.read_block("blob", i)) == blob[i * 1000 : i * 1000 + 1000]
        )
    assert service.status()["disks"][3]["blocks"] == service.placed_counts()["y1-3"] > 0


def _square(x: int) -> int:
    return x * x


def test_process_runner_computes_in_a_child_process() -> None:
    """ProcessRunner runs picklable work in a spawned process and fires on the reactor thread."""
    reactor = _Reactor()
    runner = ProcessRunner(reactor)
    try:
        d = runner(os.getpid)
        e = runner(_square, 12)
        deadline = time.monotonic() + 60
        while not (d.called and e.called) and time.monotonic() < deadline:
            threading.Event().wait(0.05)  # bounded wait for a real child process
        assert _value(e) == 144
        assert _value(d) != os.getpid()
    finally:
        runner.stop()


def test_layout_computed_in_a_process_matches(tmp_path: Path) -> None:
    """A LayoutCache over a ProcessRunner persists and returns the same layout."""
    reactor = _Reactor()
    runner = ProcessRunner(reactor)
    try:
        cache = LayoutCache(runner, tmp_path)
        info, history = _info(blocks=200), _history(3)
        d = cache.fetch(info, history)
        deadline = time.monotonic() + 60
        while not d.called and time.monotonic() < deadline:
            threading.Event().wait(0.05)
        placed = _value(d)
        assert placed.layout == FilePlacement.of(info).layout(history)
        assert placed.history is history
        assert (tmp_path / f"{layout_key(info, history)}.layout").exists()
    finally:
        runner.stop()


def test_process_runner_recovers_from_a_killed_worker() -> None:
    """After its worker process is killed, the runner starts a new one for the next job."""
    reactor = _Reactor()
    runner = ProcessRunner(reactor)
    try:

        def wait(d: Deferred[Any]) -> None:
            deadline = time.monotonic() + 60
            while not d.called and time.monotonic() < deadline:
                threading.Event().wait(0.05)  # bounded wait for a real child process

        first = runner(os.getpid)
        wait(first)
        os.kill(_value(first), signal.SIGKILL)
        broken = runner(_square, 3)
        wait(broken)
        broken.addErrback(lambda f: None)  # the job that met the dead worker may fail
        again = runner(_square, 4)
        wait(again)
        assert _value(again) == 16
    finally:
        runner.stop()


def test_layout_workers_exit_when_their_node_is_killed(tmp_path: Path) -> None:
    """A node killed by a signal leaves no layout worker behind."""
    script = tmp_path / "node.py"
    script.write_text(
        "import os, sys, threading\n"
        "from yimaporc.yima.layouts import ProcessRunner\n"
        "class R:\n"
        "    def callFromThread(self, f, *a): f(*a)\n"
        "if __name__ == '__main__':\n"  # spawned workers import this module too
        "    runner = ProcessRunner(R())\n"
        "    d = runner(os.getpid)\n"
        "    d.addCallback(lambda pid: print(pid, flush=True))\n"
        "    threading.Event().wait(120)\n"
    )
    node = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert node.stdout is not None
        worker = int(node.stdout.readline())
    finally:
        node.kill()
        node.wait()
    deadline = time.monotonic() + 30
    alive = True
    while alive and time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            alive = False
        else:
            threading.Event().wait(0.1)  # bounded wait for the worker to notice
    assert not alive, "the layout worker outlived its node"
