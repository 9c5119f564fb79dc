"""AMP commands between yima nodes for block storage (namespaced ``yima.*``).

Every block command names the physical disk explicitly: the caller has
already done the placement math, the owner only reads or writes files.
"""

from __future__ import annotations

from twisted.protocols import amp

from ..cluster.rpc import BigBytes
from .store import BlockMissing


class StorageRefused(Exception):
    """The owner node refused a storage command (unknown disk, bad name, ...)."""


_ERRORS: dict[type[Exception], bytes] = {
    BlockMissing: b"BLOCK_MISSING",
    StorageRefused: b"STORAGE_REFUSED",
}

_BLOCK = [
    (b"media", amp.Unicode()),
    (b"index", amp.Integer()),
    (b"parity", amp.Boolean()),
    (b"disk_id", amp.Unicode()),
]


class PutBlock(amp.Command):
    """Durably store one block on the owner's disk ``disk_id``."""

    commandName = b"yima.put-block"
    arguments = [*_BLOCK, (b"data", BigBytes())]
    response = []  # type: ignore[var-annotated]
    errors = _ERRORS


class GetBlock(amp.Command):
    """Read one block from the owner's disk ``disk_id`` (no parity recovery)."""

    commandName = b"yima.get-block"
    arguments = _BLOCK
    response = [(b"data", BigBytes())]
    errors = _ERRORS


class DeleteBlock(amp.Command):
    """Delete one block from the owner's disk ``disk_id``; answers how many files went."""

    commandName = b"yima.delete-block"
    arguments = _BLOCK
    response = [(b"removed", amp.Integer())]
    errors = _ERRORS


class CountBlocks(amp.Command):
    """Number of block files per local disk of the owner (JSON object)."""

    commandName = b"yima.count-blocks"
    arguments = []  # type: ignore[var-annotated]
    response = [(b"counts", amp.Unicode())]
    errors = _ERRORS


class DetachDisk(amp.Command):
    """Stop using a disk that has been removed from the cluster (after its blocks moved)."""

    commandName = b"yima.detach-disk"
    arguments = [(b"disk_id", amp.Unicode())]
    response = [(b"detached", amp.Boolean())]
    errors = _ERRORS


class RebuildDisk(amp.Command):
    """Restore every block that belongs on the owner's disk ``disk_id`` from parity."""

    commandName = b"yima.rebuild-disk"
    arguments = [(b"disk_id", amp.Unicode())]
    response = [
        (b"restored", amp.Integer()),
        (b"present", amp.Integer()),
        (b"lost", amp.Integer()),
        (b"unprotected", amp.ListOf(amp.Unicode())),
    ]
    errors = _ERRORS


class GetTimeIndex(amp.Command):
    """A media file's time index (packed, :func:`~yimaporc.yima.media.pack_index`) with
    this digest, from a node that stores it; BLOCK_MISSING if it does not."""

    commandName = b"yima.get-time-index"
    arguments = [(b"media", amp.Unicode()), (b"digest", amp.Unicode())]
    response = [(b"data", BigBytes())]
    errors = _ERRORS
