"""A disks add/remove walks the explicit, persisted phase table; a coordinator that crashed
mid-way resumes on restart (abandons before COMMITTING, finishes from it)."""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from yimaporc.cluster.node import ClusterNode, NodeConfig
from yimaporc.yima.disks import PhysicalDisk
from yimaporc.yima.storage import TRANSITIONS, Phase, PhaseError, YimaStorageService
from yimaporc.yima.storage._reorganise import STATE_FILE
from yimaporc.yima.store import SynchronousThreadPool

BLOB = random.Random(18).randbytes(120_000)


class _Reactor(MemoryReactorClock):
    def callFromThread(self, f: Callable[..., object], *args: Any, **kw: Any) -> None:
        f(*args, **kw)


def _service(tmp_path: Path, reactor: _Reactor) -> YimaStorageService:
    """A one-node storage service on ``tmp_path`` (a second call: the same node restarted)."""
    config = NodeConfig("y1", "yima", tmp_path / "data", "127.0.0.1", 1)
    node = ClusterNode(reactor, config, b"s" * 32, rng=random.Random(7))
    disks = [(tmp_path / f"d{i}", None) for i in range(4)]
    service = YimaStorageService(node, reactor, SynchronousThreadPool(), disks)
    service.startService()
    return service


def _settle(reactor: _Reactor, d: Deferred[Any] | None = None) -> list[Any]:
    out: list[Any] = []
    if d is not None:
        d.addBoth(out.append)
    for _ in range(2000):
        if d is not None and out:
            break
        reactor.advance(0.01)
    return out


def _result(reactor: _Reactor, d: Deferred[Any]) -> Any:
    out = _settle(reactor, d)
    assert out, "deferred never fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def _with_blob(tmp_path: Path) -> tuple[_Reactor, YimaStorageService]:
    reactor = _Reactor()
    service = _service(tmp_path, reactor)
    _result(reactor, service.ingest(io.BytesIO(BLOB), "blob", block_size=4096, opaque=True))
    return reactor, service


def _read_all(reactor: _Reactor, service: YimaStorageService) -> bytes:
    info = service.media_info("blob")
    return b"".join(_result(reactor, service.read_block("blob", i)) for i in range(info.blocks))


def _block_files(tmp_path: Path) -> int:
    return sum(1 for p in tmp_path.glob("d*/media/blob/*") if p.suffix in (".blk", ".par"))


def _state(tmp_path: Path) -> dict[str, Any] | None:
    path = tmp_path / "data" / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def test_the_table_refuses_every_undeclared_change(tmp_path: Path) -> None:
    """enter() allows exactly TRANSITIONS; anything else is a PhaseError and changes nothing."""
    reactor = _Reactor()
    reorg = _service(tmp_path, reactor).reorganiser
    for start in Phase:
        for target in Phase:
            reorg._phase = start  # place the machine at each phase in turn
            if target in TRANSITIONS[start]:
                continue
            with pytest.raises(PhaseError, match=f"{start.value} -> {target.value}"):
                reorg.enter(target)
            assert reorg.phase is start
    assert TRANSITIONS[Phase.ABANDONING] == {Phase.IDLE}
    assert TRANSITIONS[Phase.CLEANING] == {Phase.IDLE}


def test_a_disk_add_walks_the_table_and_persists_each_step(tmp_path: Path) -> None:
    """claiming, copying, committing, cleaning, idle, in order; the state file names each
    persisted phase while it runs and is gone at the end."""
    reactor, service = _with_blob(tmp_path)
    reorg = service.reorganiser
    seen: list[tuple[Phase, str | None]] = []
    real_enter = reorg.enter

    def enter(phase: Phase, record: Any = None) -> Deferred[None]:
        d = real_enter(phase, record)
        d.addCallback(lambda _: seen.append((phase, (_state(tmp_path) or {}).get("phase"))))
        return d

    reorg.enter = enter  # type: ignore[method-assign]
    disk = PhysicalDisk("y1-4", "y1", str(tmp_path / "d4"))
    out = _result(reactor, service.scale_add(disk, rate=1e9))
    assert out["moved"] > 0
    assert seen == [
        (Phase.CLAIMING, None),
        (Phase.COPYING, "copying"),
        (Phase.COMMITTING, "committing"),
        (Phase.CLEANING, "cleaning"),
        (Phase.IDLE, None),
    ]
    assert reorg.phase is Phase.IDLE and _state(tmp_path) is None
    assert service.status()["storage"]["reorganisation_phase"] == "idle"


def test_a_crash_while_copying_is_abandoned_on_restart(tmp_path: Path) -> None:
    """Killed during COPYING: on restart the pending history is dropped, old places serve."""
    reactor, first = _with_blob(tmp_path)
    old = first.catalog.history
    files = _block_files(tmp_path)
    hung: list[Deferred[Any]] = []

    def never(*args: Any) -> Deferred[Any]:
        hung.append(Deferred())
        return hung[-1]

    first.router.write_at = never  # type: ignore[method-assign]  # the copies never land
    disk = PhysicalDisk("y1-4", "y1", str(tmp_path / "d4"))
    scaling = _settle(reactor, first.scale_add(disk, rate=1e9))
    assert scaling == [] and hung, "the reorganisation should hang in COPYING"
    assert first.reorganiser.phase is Phase.COPYING
    assert (_state(tmp_path) or {}).get("phase") == "copying"
    assert first.catalog.pending is not None

    second = _service(tmp_path, reactor)  # the same node, restarted
    _settle(reactor)
    assert second.catalog.pending is None and second.catalog.history == old
    assert _state(tmp_path) is None and second.reorganiser.phase is Phase.IDLE
    assert _block_files(tmp_path) == files
    assert _read_all(reactor, second) == BLOB
    # The cluster takes a new disks add again.
    out = _result(reactor, second.scale_add(disk, rate=1e9))
    assert out["moved"] > 0 and _read_all(reactor, second) == BLOB


@pytest.mark.parametrize("crash_in", [Phase.COMMITTING, Phase.CLEANING])
def test_a_crash_from_committing_on_is_finished_on_restart(tmp_path: Path, crash_in: Phase) -> None:
    """Killed in COMMITTING or CLEANING: on restart the new history is committed and the
    old copies deleted, so the disks hold exactly the placed blocks."""
    reactor, first = _with_blob(tmp_path)
    reorg = first.reorganiser
    real_enter = reorg.enter

    def enter(phase: Phase, record: Any = None) -> Deferred[None]:
        d = real_enter(phase, record)
        if phase is crash_in:
            d.addCallback(lambda _: Deferred())  # the process dies right after the write
        return d

    reorg.enter = enter  # type: ignore[method-assign]
    disk = PhysicalDisk("y1-4", "y1", str(tmp_path / "d4"))
    assert _settle(reactor, first.scale_add(disk, rate=1e9)) == []
    assert (_state(tmp_path) or {}).get("phase") == crash_in.value
    committed = first.catalog.history
    assert committed is not None
    # In COMMITTING the new history is still pending; in CLEANING it is committed.
    assert (committed.n_disks, first.catalog.pending is None) == (
        (4, False) if crash_in is Phase.COMMITTING else (5, True)
    )
    extra = _block_files(tmp_path)  # the new copies and the old ones

    second = _service(tmp_path, reactor)
    _settle(reactor)
    assert second.catalog.history is not None and second.catalog.history.n_disks == 5
    assert second.catalog.pending is None
    assert _state(tmp_path) is None and second.reorganiser.phase is Phase.IDLE
    placed = _result(reactor, second.refresh_placed())
    assert _block_files(tmp_path) == sum(placed.values()) < extra
    assert _read_all(reactor, second) == BLOB


def test_an_unreadable_state_file_is_set_aside(tmp_path: Path) -> None:
    """Garbage in the state file: logged, removed, nothing else touched."""
    reactor, service = _with_blob(tmp_path)
    history = service.catalog.history
    (tmp_path / "data" / STATE_FILE).write_bytes(os.urandom(64))
    assert _result(reactor, service.reorganiser.resume()) is None
    assert _state(tmp_path) is None and service.catalog.history == history
