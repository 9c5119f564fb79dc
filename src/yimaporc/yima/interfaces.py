"""What Yima's streaming side may use of the storage service (and what fakes must provide).

:class:`IMediaStorage` is provided by :class:`~yimaporc.yima.storage.YimaStorageService`
and by the shipped fake :class:`yimaporc.testing.yima.MemoryMediaStorage`; the same
contract tests (``tests/yima/test_storage_contract.py``) run against both.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Interface

from .media import MediaInfo
from .placement import LogicalDisk
from .store import BlockKey

__all__ = ["IMediaStorage"]


class IMediaStorage(Interface):
    """The stored media of the cluster, as one node reads it."""

    def media_info(name: str) -> MediaInfo:
        """The catalog entry of ``name`` (with its time index once loaded); KeyError if
        there is no such media."""

    def time_index(name: str) -> Deferred[MediaInfo]:
        """The entry of ``name`` with its time index, loaded off the reactor."""

    def read_block(name: str, index: int) -> Deferred[bytes]:
        """Data block ``index`` of ``name``, from wherever it is (rebuilt if lost)."""

    def read(
        name: str, key: BlockKey, recover: bool = True, avoid: Collection[str] = ()
    ) -> Deferred[bytes]:
        """A block of ``name``; places on the nodes in ``avoid`` are not asked.
        Fails with :class:`~yimaporc.yima.store.BlockMissing` when it cannot be had."""

    def places(info: MediaInfo, key: BlockKey) -> list[LogicalDisk]:
        """Where ``key`` of ``info`` may be, in read order (never empty)."""

    def blocks_of_node(name: str, node_id: str) -> Deferred[list[int]]:
        """Data blocks of ``name`` whose first place is on ``node_id`` (every block is
        on exactly one node)."""

    def run_blocking(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """``f(*args)`` off the reactor (or inline, in a fake); fires with its result."""
