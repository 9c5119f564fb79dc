"""Node-local block storage: durable writes, reads, parity fall-back and rebuild."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from yimaporc.yima import store as store_module
from yimaporc.yima.media import MediaInfo, analyse_bytes, cut_blocks, reassemble
from yimaporc.yima.parity import FilePlacement
from yimaporc.yima.placement import LogicalDisk, ScalingHistory
from yimaporc.yima.store import (
    BlockKey,
    BlockMissing,
    BlockStore,
    Recovery,
    SynchronousReactor,
    SynchronousThreadPool,
    sized_blocks,
)

T = TypeVar("T")


def result(d: Deferred[T]) -> T:
    """The synchronous result of ``d`` (raising its failure)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred did not fire"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]  # type: ignore[no-any-return]


def make_store(tmp_path: Path, n: int = 3) -> BlockStore:
    """A store over ``n`` disk directories with synchronous fakes."""
    disks = {f"d{i}": tmp_path / f"disk{i}" for i in range(n)}
    return BlockStore(SynchronousReactor(), SynchronousThreadPool(), disks)


def test_write_read_list_count_delete(tmp_path: Path) -> None:
    """A block written to a disk is read back, listed, counted and deleted; the layout is DISK/media/NAME/INDEX.blk."""
    s = make_store(tmp_path)
    assert result(s.write_block("clip", 3, b"abc", disk_id="d1")) == "d1"
    assert result(s.write_block("clip", BlockKey(0, parity=True), b"p", disk_id="d2")) == "d2"
    assert (tmp_path / "disk1/media/clip/00000003.blk").read_bytes() == b"abc"
    assert (tmp_path / "disk2/media/clip/00000000.par").read_bytes() == b"p"
    assert result(s.read_block("clip", 3)) == b"abc"
    assert result(s.has_block("clip", 3))
    assert not result(s.has_block("clip", 3, disk_id="d0"))
    assert result(s.list_blocks("d1")) == [("clip", BlockKey(3))]
    assert result(s.block_counts()) == {"d0": 0, "d1": 1, "d2": 1}
    assert result(s.delete_block("clip", 3)) == 1
    with pytest.raises(BlockMissing):
        result(s.read_block("clip", 3))
    assert not list((tmp_path / "disk1/media/clip").glob(".*"))


def test_writes_fsync_file_and_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write fsyncs the data and the directory holding the new name before it is acknowledged."""
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(store_module.os, "fsync", spy)
    s = make_store(tmp_path, 1)
    result(s.write_block("clip", 0, b"x", disk_id="d0"))
    folder = str(tmp_path / "disk0/media/clip")
    assert synced[0].startswith(folder + "/.00000000.blk.")
    assert folder in synced[1:]


def test_reads_try_new_place_then_old(tmp_path: Path) -> None:
    """With a locator naming the new then the old disk, a block not yet moved is still found."""
    s = make_store(tmp_path)
    s.set_locator(lambda media, key: ["d2", "d0"])
    result(s.write_block("clip", 1, b"old", disk_id="d0"))
    assert result(s.read_block("clip", 1)) == b"old"
    assert result(s.write_block("clip", 1, b"new")) == "d2"
    assert result(s.read_block("clip", 1)) == b"new"


def test_bad_names_and_disks_are_refused(tmp_path: Path) -> None:
    """Media names cannot escape the disk directory; unknown disks are an error."""
    s = make_store(tmp_path)
    with pytest.raises(ValueError):
        s.write_block("../etc", 0, b"x", disk_id="d0")
    with pytest.raises(KeyError):
        s.write_block("clip", 0, b"x", disk_id="nope")
    with pytest.raises(ValueError):
        BlockKey(-1)
    assert BlockKey.from_filename("x.tmp") is None
    with pytest.raises(ValueError):
        s.add_disk("d0", tmp_path)


def test_temp_files_of_interrupted_writes_are_cleaned(tmp_path: Path) -> None:
    """Temp files left by a crash are removed, real blocks are kept."""
    s = make_store(tmp_path, 1)
    result(s.write_block("clip", 0, b"x", disk_id="d0"))
    (tmp_path / "disk0/media/clip/.00000001.blk.1.2.tmp").write_bytes(b"partial")
    assert result(s.clean_temp()) == 1
    assert result(s.list_blocks("d0")) == [("clip", BlockKey(0))]


def test_real_thread_pool(tmp_path: Path) -> None:
    """The same calls work through a real twisted ThreadPool."""
    pool = ThreadPool(1, 2)
    pool.start()
    s = BlockStore(SynchronousReactor(), pool, {"d0": tmp_path})
    written = s.write_block("clip", 5, b"threaded", disk_id="d0")
    pool.stop()  # joins the workers, so the write has finished
    assert result(written) == "d0"
    pool = ThreadPool(1, 2)
    pool.start()
    s = BlockStore(SynchronousReactor(), pool, {"d0": tmp_path})
    read = s.read_block("clip", 5)
    pool.stop()
    assert result(read) == b"threaded"


class Cluster:
    """One file's data and parity blocks placed over three disks of one store."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = make_store(tmp_path)
        self.history = ScalingHistory([LogicalDisk(f"d{i}#0", "n1", f"d{i}") for i in range(3)])
        data = bytes(range(256)) * 200 + b"tail"
        self.data = data
        self.info: MediaInfo = analyse_bytes("clip", data, seed=99, block_size=3000, parity_group=2)
        self.placement = FilePlacement(self.info.seed, self.info.blocks, self.info.parity_group)
        layout = self.placement.layout(self.history)
        self.where: dict[BlockKey, str] = {}
        for i, d in enumerate(layout.data):
            self.where[BlockKey(i)] = self.history.disks[d].physical
        for g, d in enumerate(layout.parity):
            self.where[BlockKey(g, True)] = self.history.disks[d].physical
        self.store.set_locator(lambda media, key: [self.where[key]])
        for key, block in sized_blocks(self.info, cut_blocks(data, self.info.block_size)):
            result(self.store.write_block("clip", key, block))

    def fetch(self, media: str, key: BlockKey) -> Deferred[bytes]:
        """Plain local read: what the cluster-wide fetch does for a healthy block."""
        return self.store.read_block(media, key)


def test_lost_disk_reads_through_parity_and_rebuilds(tmp_path: Path) -> None:
    """After a disk's files vanish every block still reads via parity, and rebuild restores the files byte-identically."""
    c = Cluster(tmp_path)
    lost = "d1"
    before = {p.name: p.read_bytes() for p in (tmp_path / "disk1/media/clip").iterdir()}
    assert before
    shutil.rmtree(tmp_path / "disk1/media")
    recover = Recovery(c.info, c.fetch)
    blocks = [result(c.store.read_block("clip", i, recover=recover)) for i in range(c.info.blocks)]
    assert reassemble(blocks) == c.data
    keys = sorted(k for k, d in c.where.items() if d == lost)
    report = result(c.store.rebuild(lost, c.info, keys, c.fetch))
    assert (sorted(report.restored), report.present) == (keys, 0)
    again = result(c.store.rebuild(lost, c.info, keys, c.fetch))
    assert (again.restored, again.present) == ((), len(keys))
    after = {p.name: p.read_bytes() for p in (tmp_path / "disk1/media/clip").iterdir()}
    assert after == before


def test_damaged_block_is_rebuilt_and_double_loss_is_reported(tmp_path: Path) -> None:
    """A truncated block reads correctly via parity; with two group members gone the error is BlockMissing."""
    c = Cluster(tmp_path)
    recover = Recovery(c.info, c.fetch)
    c.store.path_of(c.where[BlockKey(0)], "clip", 0).write_bytes(b"short")
    assert result(c.store.read_block("clip", 0, recover=recover)) == c.data[:3000]
    result(c.store.delete_block("clip", 0))
    result(c.store.delete_block("clip", 1))
    with pytest.raises(BlockMissing):
        result(c.store.read_block("clip", 0, recover=recover))
    no_parity = MediaInfo("clip", "opaque", c.info.size, c.info.block_size, 1)
    with pytest.raises(BlockMissing, match="no parity"):
        result(c.store.read_block("clip", 1, recover=Recovery(no_parity, c.fetch)))
