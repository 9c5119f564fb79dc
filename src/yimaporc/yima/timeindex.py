"""Time indexes of media files, stored per file beside the data (not in the catalog).

The catalog record of a file names its time index by digest
(:attr:`~yimaporc.yima.media.MediaInfo.index_digest`); the index itself (one
int64 of media time per block, about 8 bytes a block) is written once, at
ingest, to ``DATA_DIR/time-index/NAME.DIGEST.idx`` on the ingesting node.  Any
other node reads it from its own copy or, when it has none, fetches it from a
peer that has, checks the digest and keeps a copy.  Reading, checking and
writing run through the injected ``run`` (the storage thread pool), never on
the reactor; loaded indexes are cached in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from .media import MediaInfo, check_name, index_digest, pack_index, unpack_index
from .store import BlockMissing

Run = Callable[..., Deferred[Any]]
#: Ask the peers for ``(media, digest)``: fires with the packed index (or fails).
Fetch = Callable[[str, str], Deferred[bytes]]


class IndexUnavailable(Exception):
    """No node could give a time index with the digest the catalog names."""


def _file(folder: Path, name: str, digest: str) -> Path:
    return folder / f"{check_name(name)}.{digest}.idx"


def _write(folder: Path, name: str, digest: str, data: bytes) -> None:
    """Durably write one index file (blocking)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = _file(folder, name, digest)
    tmp = folder / f".{path.name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read(folder: Path, name: str, digest: str) -> bytes | None:
    """The stored index file, if any and if its digest matches (blocking)."""
    try:
        data = _file(folder, name, digest).read_bytes()
    except FileNotFoundError:
        return None
    try:
        ok = index_digest(unpack_index(data)) == digest
    except ValueError:
        ok = False
    return data if ok else None


def _attach(info: MediaInfo, data: bytes) -> MediaInfo:
    """``info`` with the index ``data`` attached, checked against its digest (blocking)."""
    return info.with_index(unpack_index(data))


def _remove(folder: Path, names: set[str]) -> int:
    """Delete the index files of these media (blocking); how many went."""
    removed = 0
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.endswith(".idx") and entry[: -len(".idx")].rpartition(".")[0] in names:
            (folder / entry).unlink(missing_ok=True)
            removed += 1
    return removed


class TimeIndexes:
    """This node's time indexes: on disk under ``folder``, cached, fetched when missing."""

    log = Logger()

    def __init__(self, folder: Path, run: Run, fetch: Fetch) -> None:
        self.folder = folder
        self._run = run
        self._fetch = fetch
        #: name -> (catalog entry without index, entry with index)
        self._full: dict[str, tuple[MediaInfo, MediaInfo]] = {}
        self._loading: dict[tuple[str, str], list[Deferred[MediaInfo]]] = {}
        #: Indexes fetched from a peer (not found here).
        self.fetched = 0

    def cached(self, info: MediaInfo) -> MediaInfo | None:
        """``info`` with its index, if loaded (no I/O)."""
        if not info.index_digest:
            return info
        got = self._full.get(info.name)
        if got is not None and got[0] == info:
            return got[1]
        return None

    def store(self, info: MediaInfo) -> Deferred[MediaInfo]:
        """Write the index of a full ``info`` (ingest, migration); fires with the bare entry
        (the catalog record's) once on disk, the full one cached."""
        bare = info.bare()
        if not bare.index_digest:
            return succeed(bare)
        data = pack_index(info.block_times)
        d = self._run(_write, self.folder, info.name, bare.index_digest, data)

        def done(_: object) -> MediaInfo:
            self._full[info.name] = (bare, info)
            return bare

        return d.addCallback(done)

    def raw(self, name: str, digest: str) -> Deferred[bytes]:
        """The packed index with this digest, from this node's disk (for a peer)."""
        full = self._full.get(name)
        if full is not None and full[0].index_digest == digest:
            return succeed(pack_index(full[1].block_times))

        def found(data: bytes | None) -> bytes:
            if data is None:
                raise BlockMissing(f"no time index {name}.{digest} here")
            return data

        return self._run(_read, self.folder, name, digest).addCallback(found)

    def load(self, info: MediaInfo) -> Deferred[MediaInfo]:
        """``info`` with its index: from the cache, this node's disk, or a peer."""
        hit = self.cached(info)
        if hit is not None:
            return succeed(hit)
        key = (info.name, info.index_digest)
        waiters = self._loading.get(key)
        d: Deferred[MediaInfo] = Deferred()
        if waiters is not None:
            waiters.append(d)
            return d
        self._loading[key] = [d]
        work = self._run(_read, self.folder, info.name, info.index_digest)
        work.addCallback(self._local_or_peer, info)
        work.addBoth(self._loaded, info, key)
        return d

    def _local_or_peer(self, data: bytes | None, info: MediaInfo) -> Deferred[MediaInfo]:
        if data is not None:
            return self._run(_attach, info, data)

        def check(fetched: bytes) -> Deferred[MediaInfo]:
            d = self._run(_attach, info, fetched)
            d.addCallback(self._keep, fetched)
            return d

        return self._fetch(info.name, info.index_digest).addCallback(check)

    def _keep(self, full: MediaInfo, data: bytes) -> Deferred[MediaInfo]:
        self.fetched += 1
        write = self._run(_write, self.folder, full.name, full.index_digest, data)
        return write.addCallback(lambda _: full)

    def _loaded(self, result: MediaInfo | Failure, info: MediaInfo, key: tuple[str, str]) -> None:
        waiters = self._loading.pop(key, [])
        if isinstance(result, MediaInfo):
            self._full[info.name] = (info, result)
            for w in waiters:
                w.callback(result)
            return
        for w in waiters:
            w.errback(result)

    def forget(self, names: set[str]) -> Deferred[int]:
        """Drop the cached and stored indexes of these files (removed from the catalog)."""
        for name in names:
            self._full.pop(name, None)
        return self._run(_remove, self.folder, names)
