"""Rebuild: restore the blocks that belong on a local disk and are missing or damaged."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks

from ..store import BlockKey
from ._blocks import BlockRouter
from ._context import StorageContext
from ._placing import Placements

__all__ = ["Rebuilder"]


class Rebuilder:
    """Restores a local disk's blocks from their parity groups (run on the disk's node)."""

    def __init__(
        self,
        ctx: StorageContext,
        router: BlockRouter,
        placements: Placements,
        refresh_stored: Callable[[], object],
    ) -> None:
        self.ctx = ctx
        self.router = router
        self.placements = placements
        self._refresh_stored = refresh_stored

    @inlineCallbacks
    def rebuild_local(self, disk_id: str) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        """Restore every block that belongs on local ``disk_id`` and is missing or damaged.

        Blocks of files ingested without parity cannot be restored: they are
        counted as ``lost`` (and the files named in ``unprotected``).
        """
        store = self.ctx.store
        restored = present = lost = 0
        unprotected: list[str] = []
        for info in sorted(self.ctx.catalog.media.values(), key=lambda m: m.name):
            found = yield self.placements.layout_of(info)
            if found is None:
                continue
            history, layout = found.history, found.layout
            keys = [
                BlockKey(i)
                for i, d in enumerate(layout.data)
                if history.disks[d].physical == disk_id
            ]
            keys += [
                BlockKey(g, True)
                for g, d in enumerate(layout.parity)
                if history.disks[d].physical == disk_id
            ]
            if info.parity_group == 0:
                here = yield gatherResults([store.has_block(info.name, k, disk_id) for k in keys])
                missing = sum(1 for ok in here if not ok)
                present += len(keys) - missing
                if missing:
                    lost += missing
                    unprotected.append(info.name)
                continue

            def fetch(media: str, key: BlockKey) -> Deferred[bytes]:
                return self.router.read(media, key, recover=False)

            report = yield store.rebuild(disk_id, info, keys, fetch)
            restored += len(report.restored)
            present += report.present
        self._refresh_stored()
        return {"restored": restored, "present": present, "lost": lost, "unprotected": unprotected}
