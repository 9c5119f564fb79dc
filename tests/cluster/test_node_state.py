"""membership.json is written off the reactor: ordered, coalesced, flushed at stop."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock

from yimaporc.cluster.buckets import BucketMap
from yimaporc.cluster.bucketservice import BucketMapService, pack_commit
from yimaporc.cluster.membership import View
from yimaporc.cluster.node import CannotStart, ClusterNode, NodeConfig
from yimaporc.cluster.statefile import StateFile
from yimaporc.cluster.wire import Member
from yimaporc.testing.pools import RecordingPool
from yimaporc.testing.pytest_plugin import LoggedFailures


class _UdpPort:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))

    def stopListening(self) -> Deferred[None]:
        return succeed(None)


class _Reactor(MemoryReactorClock):
    """Memory reactor whose UDP ports start their protocol, as a real one does."""

    def __init__(self) -> None:
        super().__init__()
        self.udp: list[_UdpPort] = []

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        f(*args, **kw)

    def listenUDP(
        self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192
    ) -> Any:
        t = _UdpPort()
        self.udp.append(t)
        protocol.makeConnection(t)
        return t


def _node(tmp_path: Path) -> tuple[_Reactor, RecordingPool, ClusterNode]:
    reactor, pool = _Reactor(), RecordingPool()
    cfg = NodeConfig("n1", "yima", tmp_path, "127.0.159.1", 7946, join=("127.0.159.2:7946",))
    node = ClusterNode(
        reactor, cfg, b"s" * 32, rng=random.Random(1), wall_clock=lambda: 1000.0, threadpool=pool
    )
    return reactor, pool, node


def _started(tmp_path: Path) -> tuple[_Reactor, RecordingPool, ClusterNode]:
    reactor, pool, node = _node(tmp_path)
    node.startService()
    pool.run_all()
    return reactor, pool, node


def _on_disk(tmp_path: Path) -> dict[str, Any]:
    return dict(json.loads((tmp_path / "membership.json").read_text()))


def _change_view(node: ClusterNode, epoch: int) -> None:
    old = node.view
    node._view_changed(old, View(epoch, old.members, node.node_id))


def _fired(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_the_node_announces_itself_only_once_its_incarnation_is_on_disk(tmp_path: Path) -> None:
    """Ports bind at start, but no datagram leaves and when_ready waits until the start-up write ran in the pool."""
    reactor, pool, node = _node(tmp_path)
    node.startService()
    assert len(reactor.udp) == 1 and len(reactor.tcpServers) == 1
    assert not (tmp_path / "membership.json").exists()
    ready = _fired(node.when_ready())
    reactor.advance(5)
    assert reactor.udp[0].sent == [] and ready == []
    assert len(pool.pending) == 1
    pool.run_next()
    assert _on_disk(tmp_path)["incarnation"] == node.state.incarnation == 1_000_000
    assert ready == [None]
    reactor.advance(5)
    assert reactor.udp[0].sent, "the join to the seed goes out once the state is durable"
    node.stopService()


def test_a_view_change_leaves_the_writing_to_the_pool(tmp_path: Path) -> None:
    """During a view change the reactor thread touches no file: the file changes only when the pool's job runs."""
    _, pool, node = _started(tmp_path)
    before = (tmp_path / "membership.json").read_bytes()
    _change_view(node, 7)
    assert (tmp_path / "membership.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["membership.json"]
    assert len(pool.pending) == 1
    pool.run_next()
    assert _on_disk(tmp_path)["epoch"] == 7
    node.stopService()


def test_view_changes_during_a_slow_write_coalesce_and_the_last_wins(tmp_path: Path) -> None:
    """Three view changes while a write is in flight make two writes, in order, the last state on disk."""
    _, pool, node = _started(tmp_path)
    written = len(pool.done)
    writes = node.status()["state_files"]["membership"]["writes"]
    _change_view(node, 11)  # in flight (held by the pool)
    _change_view(node, 12)
    _change_view(node, 13)
    assert len(pool.pending) == 1, "one writer at a time"
    pool.run_next()
    assert _on_disk(tmp_path)["epoch"] == 11
    assert len(pool.pending) == 1
    pool.run_next()
    assert _on_disk(tmp_path)["epoch"] == 13
    assert len(pool.done) - written == 2
    stats = node.status()["state_files"]["membership"]
    assert stats == {"writes": writes + 2, "failed": 0, "coalesced": 1}
    node.stopService()


def test_stopping_waits_for_the_last_state_to_be_on_disk(tmp_path: Path) -> None:
    """stopService fires only after the pending write ran: shutdown flushes the state."""
    _, pool, node = _started(tmp_path)
    _change_view(node, 21)
    _change_view(node, 22)
    stopped = _fired(node.stopService())
    assert stopped == []
    pool.run_all()
    assert len(stopped) == 1
    assert _on_disk(tmp_path)["epoch"] == 22


def test_a_failed_write_is_counted_logged_once_and_the_node_goes_on(
    tmp_path: Path, logged_failures: LoggedFailures
) -> None:
    """Writes that fail are counted, the first of a run logged once; the node keeps running and the next save succeeds."""
    _, pool, node = _started(tmp_path)
    epoch = _on_disk(tmp_path)["epoch"]
    blocker = tmp_path / "membership.json.tmp"
    blocker.mkdir()  # the temporary file cannot be opened for writing
    _change_view(node, 31)
    pool.run_all()
    _change_view(node, 32)
    pool.run_all()
    assert node.status()["state_files"]["membership"]["failed"] == 2
    assert len(logged_failures.take()) == 1
    assert _on_disk(tmp_path)["epoch"] == epoch < 31
    blocker.rmdir()
    _change_view(node, 33)
    pool.run_all()
    assert _on_disk(tmp_path)["epoch"] == 33
    assert node.status()["epoch"] == node.view.epoch  # still answering
    stopped = _fired(node.stopService())
    assert stopped == [None]


def test_a_failed_start_up_write_fails_when_ready_and_keeps_quiet(
    tmp_path: Path, logged_failures: LoggedFailures
) -> None:
    """If the new incarnation cannot be written, when_ready errbacks with CannotStart and no datagram is sent."""
    (tmp_path / "membership.json.tmp").mkdir()
    reactor, pool, node = _node(tmp_path)
    node.startService()
    pool.run_all()
    got = _fired(node.when_ready())
    assert len(got) == 1 and got[0].check(CannotStart)
    assert "membership.json" in got[0].getErrorMessage()
    assert reactor.udp[0].sent == []
    assert len(logged_failures.take()) == 1
    node.stopService()


def test_state_file_waiters_fire_in_order_and_see_failures(
    tmp_path: Path, logged_failures: LoggedFailures
) -> None:
    """when_saved fires once the newest state at call time is written, errbacks if that write fails."""
    pool = RecordingPool()
    reactor = _Reactor()
    outcomes: list[bytes | None] = [b"a", None, b"c"]
    written: list[bytes] = []

    def write(path: Path, data: bytes) -> None:
        if not data:
            raise OSError("disk full")
        written.append(data)

    f = StateFile(reactor, pool, tmp_path / "x", durable=True, write=write)
    f.save(lambda: outcomes[0] or b"")
    first = _fired(f.when_saved())
    f.save(lambda: outcomes[1] or b"")
    second = _fired(f.when_saved())
    pool.run_next()
    assert first == [None] and second == []
    with pytest.raises(OSError):
        pool.run_next()  # the failure travels to the waiter
        second[0].raiseException()
    f.save(lambda: outcomes[2] or b"")
    pool.run_all()
    assert written == [b"a", b"c"]
    assert f.stats == {"writes": 2, "failed": 1, "coalesced": 0}
    assert _fired(f.when_saved()) == [None]
    assert len(logged_failures.take()) == 1


def test_the_bucket_map_cache_is_written_in_the_pool_too(tmp_path: Path) -> None:
    """BucketMapService saves its map through the node's pool: nothing on the reactor thread, counted under state_files.bucketmap."""
    _, pool, node = _node(tmp_path)
    buckets = BucketMapService(node, 16)
    node.startService()
    pool.run_all()
    assert (tmp_path / "bucketmap.bin").exists()  # the boot's group of one
    before = (tmp_path / "bucketmap.bin").read_bytes()
    old = node.view
    me = old.members
    other = Member("n2", "127.0.159.2:7946", 1)
    grown = buckets.map.reassign(["n1", "n2"], old.epoch + 1)
    attachment = pack_commit(old, grown)
    node._view_changed(old, View(old.epoch + 1, (*me, other), "n1", attachment))
    assert buckets.map == grown
    assert (tmp_path / "bucketmap.bin").read_bytes() == before
    pool.run_all()
    assert BucketMap.parse((tmp_path / "bucketmap.bin").read_bytes()) == grown
    assert node.status()["state_files"]["bucketmap"]["writes"] == 2
    node.stopService()


def _restarted(tmp_path: Path) -> ClusterNode:
    """A new process on the same data dir, booted (its start-up write done)."""
    _, pool, node = _node(tmp_path)
    node.startService()
    pool.run_all()
    return node


def test_a_crash_before_the_view_is_on_disk_restarts_above_it(tmp_path: Path) -> None:
    """A node killed after a view change but before the pool wrote it restarts with a higher epoch, not the one on disk."""
    _, pool, node = _started(tmp_path)
    _change_view(node, 7)
    assert pool.pending and _on_disk(tmp_path)["epoch"] < 7  # crash now: the write is lost
    again = _restarted(tmp_path)
    assert again.view.epoch > 7
    again.stopService()


def test_an_epoch_jump_past_the_reservation_on_disk_is_written_at_once(tmp_path: Path) -> None:
    """A view far above what membership.json reserves writes membership.floor on the reactor before listeners hear of it; a crash then restarts above it."""
    _, _, node = _started(tmp_path)
    reserved = _on_disk(tmp_path)["reserved"]
    _change_view(node, reserved + 5)
    assert node.floor_writes == 1
    floor = json.loads((tmp_path / "membership.floor").read_text())["reserved"]
    assert floor > reserved + 5
    _change_view(node, reserved + 6)  # covered by the floor: no second write
    assert node.floor_writes == 1
    again = _restarted(tmp_path)  # the pool's write of membership.json never ran
    assert again.view.epoch > reserved + 6
    again.stopService()


def test_status_shows_the_membership_state(tmp_path: Path) -> None:
    """/api/status membership: datagram counters, the round state, the timer's punctuality
    and the epoch reservation writes (docs/operations.md)."""
    reactor, _, node = _started(tmp_path)
    reactor.advance(0.0)
    mem = node.status()["membership"]
    assert mem["round"] is None and mem["held"] is False
    assert mem["views_installed"] == 1 and mem["rounds_started"] == 0
    assert mem["sent_by_type"] == {"Probe": 1} and mem["sent"] == 1
    assert mem["epoch_floor_writes"] == 0
    assert mem["next_tick_in"] is not None and mem["next_tick_in"] >= 0
    reactor.advance(mem["next_tick_in"] + 0.3)  # the timer ran 0.3 s late
    mem = node.status()["membership"]
    assert mem["last_tick_ago"] == 0.0 and mem["last_tick_late"] == mem["max_tick_late"] == 0.3
    node.stopService()
