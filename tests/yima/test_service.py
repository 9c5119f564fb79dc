"""YimaStorageService in one process: a one-node cluster, synchronous thread pool, fake clock."""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from yimaporc.admin.routes import ApiError
from yimaporc.cluster.node import ClusterNode, NodeConfig
from yimaporc.yima.disks import PhysicalDisk
from yimaporc.yima.media.sample import make_sample_wav
from yimaporc.yima.reorg import plan_for
from yimaporc.yima.service import YimaStorageService
from yimaporc.yima.store import BlockKey, SynchronousThreadPool


class _Reactor(MemoryReactorClock):
    def callFromThread(self, f: Callable[..., object], *args: Any, **kw: Any) -> None:
        f(*args, **kw)


def _make(tmp_path: Path, n_disks: int = 4) -> tuple[_Reactor, YimaStorageService]:
    reactor = _Reactor()
    config = NodeConfig("y1", "yima", tmp_path / "data", "127.0.0.1", 1)
    node = ClusterNode(reactor, config, b"s" * 32, rng=random.Random(7))
    disks = [(tmp_path / f"d{i}", None) for i in range(n_disks)]
    service = YimaStorageService(node, reactor, SynchronousThreadPool(), disks)
    service.startService()
    return reactor, service


def _result(reactor: _Reactor, d: Deferred[Any]) -> Any:
    for _ in range(10_000):
        if d.called:
            break
        reactor.advance(0.01)
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "deferred never fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def _check_all(reactor: _Reactor, service: YimaStorageService, name: str, data: bytes) -> None:
    info = service.media_info(name)
    got = [_result(reactor, service.read_block(name, i)) for i in range(info.blocks)]
    assert b"".join(got) == data


def test_registers_local_disks_and_reports_them(tmp_path: Path) -> None:
    """The node's --disk directories become cluster disks y1-0..y1-3 in status."""
    _, service = _make(tmp_path)
    status = service.status()
    assert [d["disk_id"] for d in status["disks"]] == ["y1-0", "y1-1", "y1-2", "y1-3"]
    assert status["media"] == []
    assert service.catalog.history is not None
    assert service.catalog.history.n_disks == 4


def test_ingest_wav_and_opaque_read_back_identical(tmp_path: Path) -> None:
    """A WAV and an opaque file (refused unless opaque) are placed with parity, read back identical."""
    reactor, service = _make(tmp_path)
    wav = make_sample_wav(tmp_path / "s.wav", seconds=1.0).read_bytes()
    out = _result(reactor, service.ingest(io.BytesIO(wav), "tone", block_size=20_000))
    assert out["kind"] == "wav" and out["streamable"] and out["parity_group"] == 3
    _check_all(reactor, service, "tone", wav)
    blob = os.urandom(100_000).replace(b"\x47", b"\x48")  # no TS sync byte: never MPEG-TS
    with pytest.raises(ApiError, match="cannot be streamed: not MPEG-TS or WAV; not stored"):
        _result(reactor, service.ingest(io.BytesIO(blob), "blob", block_size=8192))
    out = _result(reactor, service.ingest(io.BytesIO(blob), "blob", block_size=8192, opaque=True))
    assert out["kind"] == "opaque" and not out["streamable"]
    assert "cannot be streamed" in out["message"]
    _check_all(reactor, service, "blob", blob)
    status = service.status()
    assert {m["name"] for m in status["media"]} == {"tone", "blob"}
    placed = sum(d["blocks"] for d in status["disks"])
    stored = sum(d["stored"] for d in status["disks"])
    assert placed == stored > 0
    with pytest.raises(ApiError, match="already exists"):
        _result(reactor, service.ingest(io.BytesIO(blob), "blob", opaque=True))


def test_add_then_remove_moves_plan_counts_and_keeps_data(tmp_path: Path) -> None:
    """disks add/remove move exactly plan_for's blocks and every block still reads back."""
    reactor, service = _make(tmp_path)
    blob = os.urandom(400_000)
    _result(reactor, service.ingest(io.BytesIO(blob), "blob", block_size=4096, opaque=True))
    info = service.media_info("blob")
    old = service.catalog.history
    assert old is not None
    disk = PhysicalDisk("y1-4", "y1", str(tmp_path / "d4"))
    out = _result(reactor, service.scale_add(disk, rate=1e9))
    new = service.catalog.history
    assert new is not None and new.n_disks == 5
    plan = plan_for(info, old, new)
    assert (out["moved"], out["total"]) == (plan.moved, plan.total)
    assert 0.1 < out["moved"] / out["total"] < 0.45
    _check_all(reactor, service, "blob", blob)
    counts = _result(reactor, service.store.block_counts())
    assert counts == {d["disk_id"]: d["blocks"] for d in service.status()["disks"]}

    on_removed = counts["y1-1"]
    out = _result(reactor, service.scale_remove("y1-1", rate=1e9))
    after = service.catalog.history
    assert after is not None
    plan = plan_for(info, new, after)
    assert out["summary"] == f"moved {plan.moved} of {plan.total} blocks"
    # Every block of the removed disk moves (plus a few parity-conflict re-resolutions).
    assert sum(1 for m in plan.moves if m.src_disk.physical == "y1-1") == on_removed
    assert "y1-1" not in service.store.disk_ids
    assert not list((tmp_path / "d1" / "media" / "blob").glob("*.blk"))
    _check_all(reactor, service, "blob", blob)


def test_remove_unknown_or_last_disk_is_refused(tmp_path: Path) -> None:
    """Removing a disk that does not exist, or the last one, is a clear error."""
    _, service = _make(tmp_path, n_disks=1)
    with pytest.raises(ApiError, match="no such disk: nope"):
        service.scale_remove("nope")
    with pytest.raises(ApiError, match="last disk"):
        service.scale_remove("y1-0")


def test_parity_reads_and_rebuilds_a_wiped_disk(tmp_path: Path) -> None:
    """Delete one disk's block files behind the node's back: reads still work, rebuild restores."""
    reactor, service = _make(tmp_path)
    blob = os.urandom(200_000)
    _result(reactor, service.ingest(io.BytesIO(blob), "blob", block_size=4096, opaque=True))
    victim = tmp_path / "d2" / "media" / "blob"
    wiped = sorted(p.name for p in victim.iterdir())
    assert wiped
    for p in victim.iterdir():
        p.unlink()
    _check_all(reactor, service, "blob", blob)
    parity_on_victim = [n for n in wiped if n.endswith(".par")]
    if parity_on_victim:
        key = BlockKey(int(parity_on_victim[0][:8]), parity=True)
        assert len(_result(reactor, service.read("blob", key))) > 0
    out = _result(reactor, service.rebuild_local("y1-2"))
    assert out["restored"] == len(wiped)
    assert sorted(p.name for p in victim.iterdir()) == wiped
    _check_all(reactor, service, "blob", blob)


def test_failed_ingest_deletes_its_blocks_and_can_be_retried(tmp_path: Path) -> None:
    """A write failing mid-ingest: the error reaches the caller, no block file stays behind."""
    reactor, service = _make(tmp_path)
    blob = os.urandom(200_000)
    real_write = service.router.write_at
    calls = [0]

    def flaky(disk: Any, media: str, key: BlockKey, data: bytes) -> Deferred[Any]:
        calls[0] += 1
        if calls[0] == 10:
            raise OSError("disk full")
        return real_write(disk, media, key, data)

    service.router.write_at = flaky  # type: ignore[method-assign]
    with pytest.raises(OSError, match="disk full"):
        _result(reactor, service.ingest(io.BytesIO(blob), "blob", block_size=4096, opaque=True))
    assert calls[0] > 10, "other groups were written before the cleanup"
    assert not list(tmp_path.glob("d*/media/blob/*")), "orphan blocks left behind"
    assert "blob" not in service.catalog.media
    service.router.write_at = real_write  # type: ignore[method-assign]
    _result(reactor, service.ingest(io.BytesIO(blob), "blob", block_size=4096, opaque=True))
    _check_all(reactor, service, "blob", blob)
