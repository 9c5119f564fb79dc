"""One log line per event an operator acts on: node joined/left (with the reason), bucket
moves, disk full, parity lost. (Outbound queue stuck: tests/porcupine/test_outbound_events.py.)

Each test captures the events the real component publishes (a twisted.logger observer on
the global publisher) and checks the line, its ``event`` field, and that it comes once.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher

from yimaporc.cluster.bucketservice import BucketMapService, pack_commit
from yimaporc.cluster.membership import EMPTY_VIEW, Membership, View
from yimaporc.cluster.node import ClusterNode, NodeConfig
from yimaporc.cluster.wire import Member
from yimaporc.testing.pools import RecordingPool
from yimaporc.yima import store as store_module
from yimaporc.yima.disks import PhysicalDisk
from yimaporc.yima.events import ParityWatch
from yimaporc.yima.store import BlockStore, SynchronousReactor, SynchronousThreadPool


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    """Every event published while the test runs."""
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def of(events: list[LogEvent], kind: str) -> list[str]:
    """The text of every event whose ``event`` field is ``kind``."""
    return [formatEvent(e) for e in events if e.get("event") == kind]


def make_node(tmp_path: Path, node_id: str = "a") -> ClusterNode:
    cfg = NodeConfig(node_id, "porcupine", tmp_path / node_id, "127.0.0.1", 7946)
    # State files go to a pool that never runs: these tests read logs, not files.
    node = ClusterNode(Clock(), cfg, b"s" * 32, rng=random.Random(1), threadpool=RecordingPool())
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    node.core = Membership(Member(node_id, "127.0.0.1:7946", 1), seeds=(), rng=random.Random(2))
    return node


A, B, C, D = (Member(n, f"10.0.0.{i}:7946", 1) for i, n in enumerate("abcd", 1))


def test_joins_and_leaves_are_one_line_each_with_the_reason(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """d joined, b restarted (new incarnation), c left because this node accused it."""
    node = make_node(tmp_path)
    assert node.core is not None
    node.core.last_accused = "c"
    old = View(4, (A, B, C), "a")
    new = View(5, (A, attrs.evolve(B, incarnation=2), D), "a")
    node._view_changed(old, new)
    joined = of(logged, "node_joined")
    assert joined == [
        "membership: node b rejoined at 10.0.0.2:7946 (epoch 5): restarted since the last view",
        "membership: node d joined at 10.0.0.4:7946 (epoch 5)",
    ]
    (left,) = of(logged, "node_left")
    assert left == "membership: node c left (epoch 5): it stopped answering this node's pings"
    assert [e["log_level"] for e in logged if e.get("event") == "node_left"] == [LogLevel.warn]


def test_leave_reasons_when_this_node_did_not_accuse(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """Not accused here: 'did not answer this node's view round' when this node
    coordinates, else the other coordinator's view; a node's first view logs no joins."""
    node = make_node(tmp_path)
    node._view_changed(EMPTY_VIEW, View(1, (A, B, C), "a"))
    assert of(logged, "node_joined") == []
    node._view_changed(View(1, (A, B, C), "a"), View(2, (A, B), "a"))
    node._view_changed(View(2, (A, B), "a"), View(3, (A,), "b"))
    assert of(logged, "node_left") == [
        "membership: node c left (epoch 2): it did not answer this node's view round",
        "membership: node b left (epoch 3): not in the view b committed "
        "(another member's suspicion)",
    ]


def test_bucket_moves_are_one_line_per_map_change(tmp_path: Path, logged: list[LogEvent]) -> None:
    """A new member takes half the buckets: one line with the count and who to whom;
    a view that moves nothing logs nothing."""
    node = make_node(tmp_path)
    svc = BucketMapService(node)
    svc.membership_changed(EMPTY_VIEW, View(1, (A,), "a"))
    (first,) = of(logged, "buckets_moved")
    assert first == "buckets: epoch 1: 256 of 256 buckets moved ((none)->a 256)"
    grown = svc.map.reassign(["a", "b"], 2)
    moved = sum(1 for x, y in zip(svc.map.owners, grown.owners, strict=True) if x != y)
    attachment = pack_commit(View(1, (A,), "a"), grown)
    svc.membership_changed(View(1, (A,), "a"), View(2, (A, B), "a", attachment))
    lines = of(logged, "buckets_moved")
    assert len(lines) == 2 and moved > 0
    assert lines[1] == f"buckets: epoch 2: {moved} of 256 buckets moved (a->b {moved})"
    same = pack_commit(View(2, (A, B), "a"), grown)
    svc.membership_changed(View(2, (A, B), "a"), View(3, (A, B), "a", same))
    assert len(of(logged, "buckets_moved")) == 2


def test_disk_full_is_logged_once_until_a_write_succeeds(
    tmp_path: Path, logged: list[LogEvent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC on a block write: one disk_full error naming the disk (not one per block);
    a later successful write clears it, so the next ENOSPC is reported again."""
    store = BlockStore(SynchronousReactor(), SynchronousThreadPool(), {"y1-0": tmp_path})
    real = store_module.write_durably
    full = [True]

    def write(path: Path, data: bytes) -> None:
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(store_module, "write_durably", write)
    failures: list[Any] = []
    for i in range(3):
        store.write_block("m", i, b"x").addErrback(failures.append)
    assert len(failures) == 3 and store.full == {"y1-0"}
    (line,) = of(logged, "disk_full")
    assert line.startswith("storage: disk y1-0 is full (") and "No space left" in line
    full[0] = False
    assert store.write_block("m", 5, b"x").result == "y1-0"
    assert store.full == set()
    full[0] = True
    store.write_block("m", 6, b"x").addErrback(failures.append)
    assert len(of(logged, "disk_full")) == 2


@attrs.frozen
class Title:
    name: str
    parity_group: int


@attrs.frozen
class FakeCatalog:
    disks: tuple[PhysicalDisk, ...]
    media: dict[str, Title]


def test_parity_lost_when_a_node_with_disks_leaves_and_when_a_group_cannot_rebuild(
    logged: list[LogEvent],
) -> None:
    """A member holding disks leaves: one parity_lost warning with its disks and how many
    titles lost redundancy or blocks; a member without disks: nothing. A block whose
    group is incomplete: one error per title and group."""
    disks = (PhysicalDisk("y2-0", "y2", "/d"), PhysicalDisk("y2-1", "y2", "/e"))
    cat = FakeCatalog(disks, {"a": Title("a", 4), "b": Title("b", 0), "c": Title("c", 2)})
    watch = ParityWatch(lambda: cat)
    y1, y2, y3 = (Member(n, f"10.0.1.{i}:7946", 1) for i, n in enumerate(("y1", "y2", "y3"), 1))
    watch.membership_changed(View(1, (y1, y2, y3), "y1"), View(2, (y1,), "y1"))
    (line,) = of(logged, "parity_lost")
    assert line.startswith("storage: parity lost: node y2 left with disk(s) y2-0,y2-1: 2 title(s)")
    assert "1 title(s) without parity lost those blocks" in line
    watch.group_incomplete("a", 3, "12.blk", "y2-0 unreachable")
    watch.group_incomplete("a", 3, "13.blk", "y2-0 unreachable")
    watch.group_incomplete("a", 4, "16.blk", "y2-0 unreachable")
    lost = of(logged, "parity_lost")[1:]
    assert len(lost) == 2 and "a block 12.blk is missing and parity group 3" in lost[0]
    assert [e["log_level"] for e in logged if e.get("event") == "parity_lost"][1:] == [
        LogLevel.error
    ] * 2


def test_storage_service_logs_parity_lost_for_a_group_it_cannot_rebuild(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """Through the real storage service: two wiped disks leave groups with two blocks
    missing; reading such a block fails and logs parity_lost once for that group."""
    import io
    import os

    from twisted.internet.defer import Deferred
    from twisted.internet.testing import MemoryReactorClock
    from twisted.python.failure import Failure

    from yimaporc.yima.service import YimaStorageService
    from yimaporc.yima.store import BlockMissing

    class Reactor(MemoryReactorClock):
        def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
            f(*args, **kw)

    def result(d: Deferred[Any]) -> Any:
        for _ in range(10_000):
            if d.called:
                break
            reactor.advance(0.01)
        out: list[Any] = []
        d.addBoth(out.append)
        return out[0]

    reactor = Reactor()
    config = NodeConfig("y1", "yima", tmp_path / "data", "127.0.0.1", 1)
    node = ClusterNode(reactor, config, b"s" * 32, rng=random.Random(7))
    disks = [(tmp_path / f"d{i}", None) for i in range(4)]
    service = YimaStorageService(node, reactor, SynchronousThreadPool(), disks)
    service.startService()
    assert service.parity_watch in node._listeners
    blob = os.urandom(100_000)
    result(service.ingest(io.BytesIO(blob), "blob", block_size=4096, parity_group=3, opaque=True))
    for d in ("d1", "d2"):
        for p in (tmp_path / d / "media" / "blob").iterdir():
            p.unlink()
    outcomes = [result(service.read_block("blob", i)) for i in range(25)]
    lost = [o for o in outcomes if isinstance(o, Failure)]
    assert lost and all(f.check(BlockMissing) for f in lost)
    lines = of(logged, "parity_lost")
    groups = {int(line.split("parity group ")[1].split()[0]) for line in lines}
    assert len(lines) == len(groups) >= 1  # once per group, however many reads failed
    assert all("blob block" in line for line in lines)
