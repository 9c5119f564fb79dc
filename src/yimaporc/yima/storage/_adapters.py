"""The storage service's faces: the ``yima.*`` RPC handlers and the ``/api/yima/*`` admin routes.

Both only check and translate their input and call the service's public methods;
a bad request is a :class:`~..rpc.StorageRefused` (RPC) or an
:class:`~yimaporc.cluster.routes.ApiError` (HTTP), never a traceback.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.python.failure import Failure

from ...cluster.routes import ApiError, Route
from ...cluster.rpc import PeerUnavailable, RpcRegistry
from ..disks import DiskError, PhysicalDisk
from ..media import check_name
from ..rpc import (
    CountBlocks,
    DeleteBlock,
    DetachDisk,
    GetBlock,
    GetTimeIndex,
    PutBlock,
    RebuildDisk,
    StorageRefused,
)
from ..store import BlockKey, BlockMissing, expected_length

if TYPE_CHECKING:
    from ._service import YimaStorageService

__all__ = ["StorageRoutes", "StorageRpc"]


class StorageRpc:
    """Answers the ``yima.*`` block commands for this node's disks."""

    def __init__(self, storage: YimaStorageService) -> None:
        self.storage = storage

    def register(self, registry: RpcRegistry) -> None:
        """Answer every storage command on ``registry``."""
        registry.register(PutBlock, self.put)
        registry.register(GetBlock, self.get)
        registry.register(DeleteBlock, self.delete)
        registry.register(CountBlocks, self.count)
        registry.register(DetachDisk, self.detach)
        registry.register(RebuildDisk, self.rebuild)
        registry.register(GetTimeIndex, self.time_index)

    def _check_local(self, media: str, disk_id: str) -> None:
        try:
            check_name(media)
        except ValueError as e:
            raise StorageRefused(str(e)) from e
        if disk_id not in self.storage.store.disk_ids:
            raise StorageRefused(f"no disk {disk_id} on node {self.storage.node.node_id}")

    def put(
        self, media: str, index: int, parity: bool, disk_id: str, data: bytes
    ) -> Deferred[dict[str, Any]]:
        self._check_local(media, disk_id)
        d = self.storage.store.write_block(media, BlockKey(index, parity), data, disk_id=disk_id)
        return d.addCallback(lambda _: {})

    def get(self, media: str, index: int, parity: bool, disk_id: str) -> Deferred[dict[str, Any]]:
        self._check_local(media, disk_id)
        d = self.storage.store.read_block(media, BlockKey(index, parity), disk_id=disk_id)
        return d.addCallback(lambda data: {"data": data})

    def delete(
        self, media: str, index: int, parity: bool, disk_id: str
    ) -> Deferred[dict[str, Any]]:
        self._check_local(media, disk_id)
        d = self.storage.store.delete_block(media, BlockKey(index, parity), disk_id=disk_id)
        return d.addCallback(lambda n: {"removed": n})

    def count(self) -> Deferred[dict[str, Any]]:
        d = self.storage.refresh_stored()
        return d.addCallback(lambda counts: {"counts": json.dumps(counts)})

    def rebuild(self, disk_id: str) -> Deferred[dict[str, Any]]:
        if disk_id not in self.storage.store.disk_ids:
            raise StorageRefused(f"no disk {disk_id} on node {self.storage.node.node_id}")
        return self.storage.rebuild_local(disk_id)

    def detach(self, disk_id: str) -> dict[str, Any]:
        return {"detached": self.storage.detach(disk_id)}

    def time_index(self, media: str, digest: str) -> Deferred[dict[str, Any]]:
        try:
            check_name(media)
        except ValueError as e:
            raise StorageRefused(str(e)) from e
        d: Deferred[bytes] = self.storage.indexes.raw(media, digest)
        return d.addCallback(lambda data: {"data": data})


class StorageRoutes:
    """The ``/api/yima/*`` admin routes of the storage service."""

    def __init__(self, storage: YimaStorageService) -> None:
        self.storage = storage

    def routes(self) -> list[Route]:
        """Every route, to mount on the node."""
        return [
            Route("GET", "/api/yima/media", self._route_list, mutates=False),
            Route("POST", "/api/yima/media", self._route_ingest, raw=True),
            Route("GET", "/api/yima/block", self._route_block),
            Route("POST", "/api/yima/disks", self._route_add_disk),
            Route("POST", "/api/yima/disks/remove", self._route_remove_disk),
            Route("POST", "/api/yima/rebuild", self._route_rebuild),
            Route("GET", "/api/yima/stored", self._route_stored),
            Route("POST", "/api/yima/media/delete", self._route_remove_media),
        ]

    def _route_list(self, body: dict[str, Any], query: dict[str, str]) -> dict[str, Any]:
        media = [
            {**m.to_record(), "block_times": m.blocks if m.index_digest else 0}
            for m in sorted(self.storage.catalog.media.values(), key=lambda m: m.name)
        ]
        return {"media": media}

    def _route_ingest(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        name = query.get("name", "")
        size = query.get("block_size")
        if size is not None and not size.isdigit():
            raise ApiError("block_size must be a positive integer")
        group = query.get("parity_group")
        if group is not None and not group.isdigit():
            raise ApiError("parity_group must be a whole number (0: no parity)")
        if "content" not in body:
            raise ApiError("upload the file as the request body")
        return self.storage.ingest(
            body["content"],
            name,
            int(size) if size else None,
            int(group) if group else None,
            opaque=query.get("opaque", "0") in ("1", "true", "yes"),
        )

    def _route_remove_media(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        """``POST /api/yima/media/delete {name}``: see :meth:`YimaStorageService.remove_media`."""
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError('give the media name as {"name": NAME}')
        return self.storage.remove_media(name)

    def _route_block(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        name = query.get("name", "")
        info = self.storage.catalog.media.get(name)
        if info is None:
            raise ApiError(f"no such media: {name}", 404)
        try:
            key = BlockKey(int(query.get("index", "")), query.get("parity", "0") == "1")
            expected_length(info, key)
            if key.parity and key.index >= -(-info.blocks // max(info.parity_group, 1)):
                raise IndexError("no such parity group")
        except (ValueError, IndexError) as e:
            raise ApiError(f"bad block: {e}") from e
        d = self.storage.read(name, key, recover=query.get("recover", "1") == "1")

        def missing(f: Failure) -> None:
            f.trap(BlockMissing)
            raise ApiError(f.getErrorMessage(), 503)

        d.addCallbacks(lambda data: {"data": base64.b64encode(data).decode("ascii")}, missing)
        return d

    def _route_add_disk(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        path = body.get("path")
        node_id = body.get("node") or self.storage.node.node_id
        capacity = body.get("capacity")
        if not isinstance(path, str) or not Path(path).is_absolute():
            raise ApiError("path must be an absolute directory path on the disk's node")
        if capacity is not None and (not isinstance(capacity, int) or capacity <= 0):
            raise ApiError("capacity must be a positive number of bytes")
        members = {m.node_id for m in self.storage.node.view.members} | {self.storage.node.node_id}
        if node_id not in members:
            raise ApiError(f"node {node_id} is not a member of the cluster", 404)
        taken = {d.disk_id for d in self.storage.catalog.all_disks()}
        k = 0
        while f"{node_id}-{k}" in taken:
            k += 1
        try:
            disk = PhysicalDisk(f"{node_id}-{k}", node_id, path, capacity)
        except DiskError as e:
            raise ApiError(str(e)) from e
        d = self.storage.scale_add(disk, self._rate(body))
        return d.addCallback(lambda r: {**r, "disk_id": disk.disk_id})

    def _route_remove_disk(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        disk_id = body.get("disk_id")
        if not isinstance(disk_id, str) or not disk_id:
            raise ApiError("disk_id is required")
        return self.storage.scale_remove(disk_id, self._rate(body))

    @staticmethod
    def _rate(body: dict[str, Any]) -> float | None:
        rate = body.get("rate")
        if rate is None:
            return None
        if not isinstance(rate, int | float) or rate <= 0:
            raise ApiError("rate must be a positive number of bytes per second")
        return float(rate)

    def _route_rebuild(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        disk_id = body.get("disk_id")
        disk = next((d for d in self.storage.catalog.disks if d.disk_id == disk_id), None)
        if disk is None:
            raise ApiError(f"no such disk: {disk_id}", 404)
        if self.storage.catalog.pending is not None or self.storage.reorganiser.busy:
            raise ApiError("a disk reorganisation is under way; rebuild when it ends", 409)
        d = self.storage.router.at(
            disk.node_id,
            lambda: self.storage.rebuild_local(disk.disk_id),
            RebuildDisk,
            disk_id=disk.disk_id,
        )

        def down(f: Failure) -> None:
            f.trap(PeerUnavailable)
            raise ApiError(f"node {disk.node_id} holding {disk.disk_id} is down", 503)

        def report(result: dict[str, Any]) -> dict[str, Any]:
            return {"disk_id": disk.disk_id, **result}

        d.addErrback(down)
        return d.addCallback(report)

    def _route_stored(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[Any]:
        """Block files actually on disk, per disk, asked of every member."""
        nodes = sorted({d.node_id for d in self.storage.catalog.all_disks()})

        def one(node_id: str) -> Deferred[dict[str, int]]:
            d = self.storage.router.at(node_id, self.storage.refresh_stored, CountBlocks)
            if node_id != self.storage.node.node_id:
                d.addCallback(lambda r: json.loads(r["counts"]))
            return d.addErrback(lambda f: {})

        d = gatherResults([one(n) for n in nodes])

        def merge(results: list[dict[str, int]]) -> dict[str, Any]:
            out: dict[str, int] = {}
            for r in results:
                out.update(r)
            return {"stored": out}

        return d.addCallback(merge)
