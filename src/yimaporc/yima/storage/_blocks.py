"""Block routing: a block's bytes to and from the node owning its physical disk.

:class:`BlockRouter` writes, reads and deletes a block on a given logical disk (locally
through the :class:`~..store.BlockStore`, or with the ``yima.*`` AMP commands of
:mod:`..rpc` at the owner), and reads a file's block from wherever it is: its new
place, its old place, else rebuilt from its parity group.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Generator
from typing import Any

from twisted.internet.defer import (
    Deferred,
    FirstError,
    gatherResults,
    inlineCallbacks,
    maybeDeferred,
)

from ...cluster.rpc import PeerUnavailable
from ..events import ParityWatch
from ..media import MediaInfo
from ..parity import group_members, make_parity
from ..parity import reconstruct as parity_reconstruct
from ..placement import LogicalDisk
from ..rpc import DeleteBlock, GetBlock, PutBlock
from ..store import BlockKey, BlockMissing, expected_length
from ._context import StorageContext
from ._placing import Placements

__all__ = ["BlockRouter"]


class BlockRouter:
    """Block I/O by owner, and reads with recovery."""

    def __init__(self, ctx: StorageContext, placements: Placements, watch: ParityWatch) -> None:
        self.ctx = ctx
        self.placements = placements
        self.watch = watch

    def address(self, node_id: str) -> str:
        """``node_id``'s cluster address (PeerUnavailable when it is not a member)."""
        for m in self.ctx.node.view.members:
            if m.node_id == node_id:
                return m.address
        raise PeerUnavailable(f"node {node_id} is not a member (down?)")

    def at(
        self, node_id: str, local: Callable[[], Deferred[Any]], command: Any, **kw: Any
    ) -> Deferred[Any]:
        """``local()`` on this node, else ``command(**kw)`` over RPC at ``node_id``."""
        node = self.ctx.node
        if node_id == node.node_id:
            return maybeDeferred(local)
        try:
            address = self.address(node_id)
        except PeerUnavailable:
            return maybeDeferred(self.address, node_id)
        return node.rpc.call(address, command, **kw)

    def write_at(self, disk: LogicalDisk, media: str, key: BlockKey, data: bytes) -> Deferred[Any]:
        """Store a block on physical disk ``disk.physical`` of its node."""
        return self.at(
            disk.node_id,
            lambda: self.ctx.store.write_block(media, key, data, disk_id=disk.physical),
            PutBlock,
            media=media,
            index=key.index,
            parity=key.parity,
            disk_id=disk.physical,
            data=data,
        )

    def read_at(self, disk: LogicalDisk, media: str, key: BlockKey) -> Deferred[bytes]:
        """Read a block from physical disk ``disk.physical`` (no recovery)."""
        d = self.at(
            disk.node_id,
            lambda: self.ctx.store.read_block(media, key, disk_id=disk.physical),
            GetBlock,
            media=media,
            index=key.index,
            parity=key.parity,
            disk_id=disk.physical,
        )
        if disk.node_id != self.ctx.node.node_id:
            d.addCallback(lambda r: r["data"])
        return d

    def delete_at(self, disk: LogicalDisk, media: str, key: BlockKey) -> Deferred[Any]:
        """Delete a block from physical disk ``disk.physical``."""
        return self.at(
            disk.node_id,
            lambda: self.ctx.store.delete_block(media, key, disk_id=disk.physical),
            DeleteBlock,
            media=media,
            index=key.index,
            parity=key.parity,
            disk_id=disk.physical,
        )

    @inlineCallbacks
    def read(
        self, name: str, key: BlockKey, recover: bool = True, avoid: Collection[str] = ()
    ) -> Generator[Deferred[Any], Any, bytes]:
        """A block of ``name`` (new place, then old, then parity recovery).

        Places on the nodes in ``avoid`` (silent ones, not yet declared gone) are
        not asked: the block is rebuilt from its parity group instead.
        """
        info = self.ctx.catalog.media.get(name)
        if info is None:
            raise BlockMissing(f"no such media: {name}")
        expect = expected_length(info, key)
        problems = []
        for disk in self.placements.places(info, key):
            if disk.node_id in avoid:
                problems.append(f"{disk.physical}: node {disk.node_id} is silent")
                continue
            try:
                data = yield self.read_at(disk, name, key)
            except Exception as e:
                problems.append(f"{disk.physical}: {e}")
                continue
            if len(data) == expect:
                return data
            problems.append(f"{disk.physical}: {len(data)} bytes, expected {expect}")
        if recover and info.parity_group > 0:
            data = yield self._recover(info, key, avoid)
            return data
        raise BlockMissing(f"{name} {key.filename}: {'; '.join(problems)}")

    @inlineCallbacks
    def _recover(
        self, info: MediaInfo, key: BlockKey, avoid: Collection[str] = ()
    ) -> Generator[Deferred[Any], Any, bytes]:
        g = info.parity_group
        group = key.index if key.parity else key.index // g
        members = list(group_members(group, g, info.blocks))
        wanted = [BlockKey(i) for i in members if key.parity or i != key.index]
        if not key.parity:
            wanted.append(BlockKey(group, parity=True))
        try:
            blocks = yield gatherResults(
                [self.read(info.name, w, recover=False, avoid=avoid) for w in wanted],
                consumeErrors=True,
            )
        except FirstError as e:
            why = e.subFailure.getErrorMessage()
            self.watch.group_incomplete(info.name, group, key.filename, why)
            raise BlockMissing(
                f"{info.name} {key.filename}: lost, and its parity group is incomplete "
                f"({e.subFailure.getErrorMessage()})"
            ) from e

        def rebuild() -> bytes:
            if key.parity:
                return make_parity(blocks)
            others = dict(zip((w.index for w in wanted[:-1]), blocks[:-1], strict=True))
            return parity_reconstruct(key.index, others, blocks[-1], info.block_length(key.index))

        data = yield self.ctx.in_pool(rebuild)
        return data
