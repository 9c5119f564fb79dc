"""A node's block storage over its physical disk directories.

Layout (docs/storage.md)::

    DISK/media/NAME/00000012.blk    data block 12 of file NAME
    DISK/media/NAME/00000003.par    parity block of group 3

Writes are durable before they are acknowledged: write a temp file, fsync,
rename over the final name, fsync the directory.  Every blocking call runs in
the injected thread pool (``deferToThreadPool``); nothing here touches the
global reactor.  Where a block lives is decided by an injected *locator*
(placement math, new place first then old during a reorganisation); when a
block cannot be read locally, a caller-supplied :class:`Recovery` rebuilds it
from its parity group through ``fetch(media, key) -> Deferred[bytes]``.
"""

from __future__ import annotations

import errno
import os
import re
import threading
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, FirstError, gatherResults, inlineCallbacks
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from .media import MediaInfo, check_name
from .parity import group_members, make_parity, reconstruct

T = TypeVar("T")
MEDIA_DIR = "media"
_FILE = re.compile(r"(\d{8,})\.(blk|par)\Z")


class BlockMissing(Exception):
    """The block is on none of the disks tried and could not be rebuilt."""


@attrs.frozen(order=True)
class BlockKey:
    """A data block (``index``) or the parity block of group ``index``."""

    index: int
    parity: bool = False

    def __attrs_post_init__(self) -> None:
        if self.index < 0:
            raise ValueError("block index must be >= 0")

    @property
    def filename(self) -> str:
        """The block's file name on disk."""
        return f"{self.index:08d}.{'par' if self.parity else 'blk'}"

    @classmethod
    def from_filename(cls, name: str) -> BlockKey | None:
        """The key a file name stands for, or None for anything else."""
        m = _FILE.match(name)
        return None if m is None else cls(int(m.group(1)), m.group(2) == "par")


Fetch = Callable[[str, BlockKey], "Deferred[bytes]"]
Locator = Callable[[str, BlockKey], Sequence[str]]


@attrs.frozen
class Recovery:
    """How to rebuild a block from its parity group: the file's info and a fetcher."""

    info: MediaInfo
    fetch: Fetch


@attrs.frozen
class RebuildReport:
    """Outcome of :meth:`BlockStore.rebuild`."""

    restored: tuple[BlockKey, ...]
    present: int


def _as_key(key: BlockKey | int) -> BlockKey:
    return key if isinstance(key, BlockKey) else BlockKey(key)


def expected_length(info: MediaInfo, key: BlockKey) -> int:
    """Size of a block: data blocks from the file size, parity as its group's longest member."""
    if not key.parity:
        return info.block_length(key.index)
    return info.block_length(key.index * info.parity_group)


class SynchronousThreadPool:
    """Test helper: a ``ThreadPool`` look-alike that runs work at once in the caller."""

    def callInThreadWithCallback(
        self,
        onResult: Callable[[bool, Any], object],
        func: Callable[..., Any],
        *args: Any,
        **kw: Any,
    ) -> None:
        """Run ``func`` now and report like ``ThreadPool`` does."""
        try:
            result = func(*args, **kw)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


class SynchronousReactor:
    """Test helper: ``callFromThread`` that calls at once."""

    def callFromThread(self, f: Callable[..., object], *args: Any, **kw: Any) -> None:
        """Call ``f`` now."""
        f(*args, **kw)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (blocking)."""
    folder = path.parent
    missing = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    for d in [folder, *(m.parent for m in missing)]:
        _fsync_dir(d)


def _is_complete(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Write errors that mean "the disk is full" (logged once per disk until a write succeeds).
_FULL = (errno.ENOSPC, errno.EDQUOT)


class BlockStore:
    """Blocks of media files on this node's physical disks."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool | SynchronousThreadPool,
        disks: Mapping[str, str | Path],
        locate: Locator | None = None,
    ) -> None:
        self._reactor = reactor
        self._pool = threadpool
        self._disks = {d: Path(p) for d, p in disks.items()}
        self._locate = locate
        #: Disks whose last write failed for want of space.
        self.full: set[str] = set()

    # -- disks ---------------------------------------------------------------

    @property
    def disk_ids(self) -> tuple[str, ...]:
        """This node's physical disk ids."""
        return tuple(sorted(self._disks))

    def add_disk(self, disk_id: str, path: str | Path) -> None:
        """Start using a disk directory."""
        if disk_id in self._disks:
            raise ValueError(f"disk {disk_id} already attached")
        self._disks[disk_id] = Path(path)

    def remove_disk(self, disk_id: str) -> None:
        """Stop using a disk (its files stay where they are)."""
        del self._disks[disk_id]

    def set_locator(self, locate: Locator | None) -> None:
        """Replace the locator (e.g. after a scaling operation)."""
        self._locate = locate

    def path_of(self, disk_id: str, media: str, key: BlockKey | int) -> Path:
        """Where a block lives on ``disk_id``."""
        return self._disks[disk_id] / MEDIA_DIR / check_name(media) / _as_key(key).filename

    def _candidates(self, media: str, key: BlockKey, disk_id: str | None) -> list[str]:
        if disk_id is not None:
            if disk_id not in self._disks:
                raise KeyError(f"no such disk on this node: {disk_id}")
            return [disk_id]
        if self._locate is not None:
            return [d for d in self._locate(media, key) if d in self._disks]
        return list(self.disk_ids)

    def _run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, f, *args)  # type: ignore[arg-type]

    # -- blocks --------------------------------------------------------------

    def write_block(
        self, media: str, key: BlockKey | int, data: bytes, disk_id: str | None = None
    ) -> Deferred[str]:
        """Durably store a block on ``disk_id`` (default: the locator's first choice)."""
        k = _as_key(key)
        where = self._candidates(media, k, disk_id)
        if not where:
            raise KeyError(f"{media} {k}: no local disk to write to")
        path = self.path_of(where[0], media, k)
        d = self._run(write_durably, path, bytes(data))
        return d.addCallbacks(
            self._written, self._write_failed, callbackArgs=(where[0],), errbackArgs=(where[0],)
        )

    def _written(self, _: object, disk_id: str) -> str:
        if disk_id in self.full:
            self.full.discard(disk_id)
            self.log.info("storage: disk {disk} takes writes again", disk=disk_id)
        return disk_id

    def _write_failed(self, failure: Failure, disk_id: str) -> Failure:
        err = failure.value
        if isinstance(err, OSError) and err.errno in _FULL and disk_id not in self.full:
            self.full.add(disk_id)
            self.log.error(
                "storage: disk {disk} is full ({path}): {e}; blocks placed on it cannot be "
                "stored until space is freed or the disk is removed (yimaporc disks remove)",
                disk=disk_id,
                path=str(self._disks.get(disk_id, "")),
                e=err.strerror,
                event="disk_full",
            )
        return failure

    def _read_local(self, paths: list[Path], expect: int | None) -> bytes:
        for path in paths:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            if expect is None or len(data) == expect:
                return data
        raise BlockMissing(", ".join(str(p) for p in paths) or "no candidate disk")

    def read_block(
        self,
        media: str,
        key: BlockKey | int,
        disk_id: str | None = None,
        recover: Recovery | None = None,
    ) -> Deferred[bytes]:
        """Read a block, trying the locator's disks in order; rebuild it from parity if asked."""
        k = _as_key(key)
        paths = [self.path_of(d, media, k) for d in self._candidates(media, k, disk_id)]
        expect = None if recover is None else expected_length(recover.info, k)
        d = self._run(self._read_local, paths, expect)
        if recover is not None:

            def fall_back(f: Failure) -> Deferred[bytes]:
                f.trap(BlockMissing)
                return self._recover(media, k, recover)

            d.addErrback(fall_back)
        return d

    def _recover(self, media: str, key: BlockKey, recover: Recovery) -> Deferred[bytes]:
        info = recover.info
        g = info.parity_group
        if g <= 0:
            raise BlockMissing(f"{media} {key}: missing and the file has no parity")
        group = key.index if key.parity else key.index // g
        members = list(group_members(group, g, info.blocks))
        wanted = [BlockKey(i) for i in members if key.parity or i != key.index]
        if not key.parity:
            wanted.append(BlockKey(group, parity=True))
        fetched = gatherResults([recover.fetch(media, w) for w in wanted], consumeErrors=True)

        def rebuild(blocks: list[bytes]) -> bytes:
            if key.parity:
                return make_parity(blocks)
            others = dict(zip((w.index for w in wanted[:-1]), blocks[:-1]))
            return reconstruct(key.index, others, blocks[-1], info.block_length(key.index))

        def unwrap(f: Failure) -> Failure:
            return f.value.subFailure if isinstance(f.value, FirstError) else f

        return fetched.addCallbacks(rebuild, unwrap)

    def has_block(
        self, media: str, key: BlockKey | int, disk_id: str | None = None
    ) -> Deferred[bool]:
        """Whether the block is on any of the candidate disks."""
        k = _as_key(key)
        paths = [self.path_of(d, media, k) for d in self._candidates(media, k, disk_id)]
        return self._run(lambda: any(p.exists() for p in paths))

    def delete_block(
        self, media: str, key: BlockKey | int, disk_id: str | None = None
    ) -> Deferred[int]:
        """Delete a block from ``disk_id`` (default: every local disk); count the files removed."""
        k = _as_key(key)
        disks = [disk_id] if disk_id is not None else list(self.disk_ids)
        paths = [self.path_of(d, media, k) for d in disks]

        def delete() -> int:
            removed = 0
            for p in paths:
                try:
                    p.unlink()
                except FileNotFoundError:
                    continue
                removed += 1
                _fsync_dir(p.parent)
            return removed

        return self._run(delete)

    def list_blocks(self, disk_id: str) -> Deferred[list[tuple[str, BlockKey]]]:
        """Every ``(media, key)`` stored on ``disk_id``, sorted."""
        root = self._disks[disk_id] / MEDIA_DIR

        def scan() -> list[tuple[str, BlockKey]]:
            out: list[tuple[str, BlockKey]] = []
            if not root.is_dir():
                return out
            for media_dir in root.iterdir():
                if not media_dir.is_dir():
                    continue
                for entry in os.scandir(media_dir):
                    key = BlockKey.from_filename(entry.name)
                    if key is not None:
                        out.append((media_dir.name, key))
            return sorted(out)

        return self._run(scan)

    def block_counts(self) -> Deferred[dict[str, int]]:
        """Number of stored blocks (data and parity) per local disk (one scan, in the pool)."""
        roots = {i: self._disks[i] / MEDIA_DIR for i in self.disk_ids}

        def count(root: Path) -> int:
            # Names only, no per-block objects: cheap in the GIL even for 100k blocks.
            if not root.is_dir():
                return 0
            n = 0
            for media_dir in os.scandir(root):
                if media_dir.is_dir():
                    n += sum(1 for e in os.scandir(media_dir.path) if _FILE.match(e.name))
            return n

        return self._run(lambda: {i: count(r) for i, r in roots.items()})

    def clean_temp(self) -> Deferred[int]:
        """Remove temp files left by writes interrupted by a crash."""
        roots = [p / MEDIA_DIR for p in self._disks.values()]

        def clean() -> int:
            n = 0
            for root in roots:
                for tmp in root.glob("*/.*.tmp"):
                    tmp.unlink(missing_ok=True)
                    n += 1
            return n

        return self._run(clean)

    @inlineCallbacks
    def rebuild(
        self,
        disk_id: str,
        info: MediaInfo,
        keys: Iterable[BlockKey],
        fetch: Fetch,
    ) -> Generator[Deferred[Any], Any, RebuildReport]:
        """Restore the blocks ``keys`` that belong on ``disk_id`` but are gone or damaged.

        Each is rebuilt from its parity group through ``fetch`` and written
        durably; fires with a :class:`RebuildReport`.
        """
        restored = []
        present = 0
        recovery = Recovery(info, fetch)
        for key in keys:
            path = self.path_of(disk_id, info.name, key)
            ok = yield self._run(_is_complete, path, expected_length(info, key))
            if ok:
                present += 1
                continue
            data = yield self._recover(info.name, key, recovery)
            yield self.write_block(info.name, key, data, disk_id=disk_id)
            restored.append(key)
        return RebuildReport(tuple(restored), present)


def sized_blocks(info: MediaInfo, blocks: Sequence[bytes]) -> list[tuple[BlockKey, bytes]]:
    """A file's data blocks plus its parity blocks, keyed (for ingest)."""
    out = [(BlockKey(i), b) for i, b in enumerate(blocks)]
    g = info.parity_group
    if g > 0:
        for group in range(-(-len(blocks) // g)):
            out.append((BlockKey(group, True), make_parity(blocks[group * g : (group + 1) * g])))
    return out
