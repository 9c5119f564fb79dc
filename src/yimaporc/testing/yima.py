"""A shipped fake of Yima's storage for tests of the streaming side.

:class:`MemoryMediaStorage` provides :class:`~yimaporc.yima.interfaces.IMediaStorage`
from memory: each file is cut into blocks and block ``i`` lives on node
``nodes[i % len(nodes)]``.  It passes the same contract tests as the real
:class:`~yimaporc.yima.storage.YimaStorageService`
(``tests/yima/test_storage_contract.py``).

:class:`UdpClock` is a :class:`~twisted.internet.task.Clock` whose ``listenUDP``
hands out in-memory ports (writes are dropped), for the streaming service's
protocol tests.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from ..yima.interfaces import IMediaStorage
from ..yima.media import KIND_OPAQUE, MediaInfo
from ..yima.placement import LogicalDisk
from ..yima.store import BlockKey, BlockMissing

__all__ = ["MemoryMediaStorage", "MemoryUdpPort", "UdpClock"]


class MemoryUdpPort:
    """A listening UDP port that is only a number: writes go nowhere."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.socket = None

    def getHost(self) -> Any:
        return SimpleNamespace(host="127.0.0.1", port=self.port)

    def stopListening(self) -> None:
        pass

    def write(self, data: bytes, addr: Any) -> None:
        pass


class UdpClock(Clock):
    """A Clock with in-memory UDP ports (numbered from 6002 up, two apart)."""

    ports = 6000

    def __init__(self) -> None:
        super().__init__()
        #: The protocol of every port opened, by port number.
        self.protocols: dict[int, Any] = {}

    def listenUDP(self, port: int, proto: Any, interface: str = "") -> MemoryUdpPort:
        self.ports += 2
        self.protocols[port or self.ports] = proto
        return MemoryUdpPort(port or self.ports)


@implementer(IMediaStorage)
class MemoryMediaStorage:
    """Media held in memory, spread round-robin over ``nodes`` (one disk each)."""

    def __init__(self, nodes: Sequence[str] = ("y1",)) -> None:
        if not nodes:
            raise ValueError("at least one node")
        self.nodes = tuple(nodes)
        self.infos: dict[str, MediaInfo] = {}
        self.blocks: dict[str, list[bytes]] = {}
        #: Every block read, as (name, index, parity), in order.
        self.reads: list[tuple[str, int, bool]] = []

    def add(
        self, name: str, data: bytes, block_size: int, *, info: MediaInfo | None = None
    ) -> MediaInfo:
        """Store ``data`` as ``name`` (opaque unless ``info`` says otherwise)."""
        if info is None:
            info = MediaInfo(name, KIND_OPAQUE, len(data), block_size, seed=0)
        self.infos[name] = info
        self.blocks[name] = [data[i : i + block_size] for i in range(0, len(data), block_size)]
        return info

    def _disk(self, index: int) -> LogicalDisk:
        node = self.nodes[index % len(self.nodes)]
        return LogicalDisk(f"{node}-0#0", node, f"{node}-0")

    def media_info(self, name: str) -> MediaInfo:
        """The entry of ``name`` (KeyError if unknown)."""
        return self.infos[name]

    def time_index(self, name: str) -> Deferred[MediaInfo]:
        """The entry of ``name`` (a fake keeps its index in the entry)."""
        return maybeDeferred(self.media_info, name)

    def read_block(self, name: str, index: int) -> Deferred[bytes]:
        """Data block ``index`` of ``name``."""
        return self.read(name, BlockKey(index))

    def read(
        self, name: str, key: BlockKey, recover: bool = True, avoid: Collection[str] = ()
    ) -> Deferred[bytes]:
        """A data block (parity blocks are not kept: BlockMissing)."""
        blocks = self.blocks.get(name)
        if blocks is None or key.parity or not 0 <= key.index < len(blocks):
            return fail(BlockMissing(f"{name} {key.filename}: not stored"))
        self.reads.append((name, key.index, key.parity))
        return succeed(blocks[key.index])

    def places(self, info: MediaInfo, key: BlockKey) -> list[LogicalDisk]:
        """The one disk holding ``key``."""
        return [self._disk(key.index)]

    def blocks_of_node(self, name: str, node_id: str) -> Deferred[list[int]]:
        """Data blocks of ``name`` on ``node_id``."""
        if name not in self.blocks:
            return fail(KeyError(name))
        count = len(self.blocks[name])
        return succeed([i for i in range(count) if self._disk(i).node_id == node_id])

    def run_blocking(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """``f(*args)`` inline."""
        return maybeDeferred(f, *args)
