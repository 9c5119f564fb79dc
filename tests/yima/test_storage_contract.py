"""IMediaStorage: the same contract tests against the real YimaStorageService and the shipped
MemoryMediaStorage fake."""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from yimaporc.cluster.node import ClusterNode, NodeConfig
from yimaporc.testing.yima import MemoryMediaStorage
from yimaporc.yima.interfaces import IMediaStorage
from yimaporc.yima.placement import LogicalDisk
from yimaporc.yima.storage import YimaStorageService
from yimaporc.yima.store import BlockKey, BlockMissing, SynchronousThreadPool

DATA = random.Random(4).randbytes(50_000)
BLOCK = 4096


class _Reactor(MemoryReactorClock):
    def callFromThread(self, f: Callable[..., object], *args: Any, **kw: Any) -> None:
        f(*args, **kw)


@attrs.define
class Subject:
    """A storage holding DATA as ``clip``, the node ids it spreads over, and a clock to turn."""

    storage: Any
    nodes: tuple[str, ...]
    reactor: _Reactor

    def result(self, d: Deferred[Any]) -> Any:
        out: list[Any] = []
        d.addBoth(out.append)
        for _ in range(1000):
            if out:
                break
            self.reactor.advance(0.01)
        assert out, "deferred never fired"
        if isinstance(out[0], Failure):
            out[0].raiseException()
        return out[0]


def _real(tmp_path: Path) -> Subject:
    reactor = _Reactor()
    config = NodeConfig("y1", "yima", tmp_path / "data", "127.0.0.1", 1)
    node = ClusterNode(reactor, config, b"s" * 32, rng=random.Random(3))
    disks = [(tmp_path / f"d{i}", None) for i in range(3)]
    storage = YimaStorageService(node, reactor, SynchronousThreadPool(), disks)
    storage.startService()
    subject = Subject(storage, ("y1",), reactor)
    subject.result(storage.ingest(io.BytesIO(DATA), "clip", block_size=BLOCK, opaque=True))
    return subject


def _fake(tmp_path: Path) -> Subject:
    storage = MemoryMediaStorage(("y1", "y2", "y3"))
    storage.add("clip", DATA, BLOCK)
    return Subject(storage, storage.nodes, _Reactor())


@pytest.fixture(params=[_real, _fake], ids=["YimaStorageService", "MemoryMediaStorage"])
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    yield request.param(tmp_path)


def test_provides_the_interface(subject: Subject) -> None:
    """verifyObject: every IMediaStorage method is there with a compatible signature."""
    assert verifyObject(IMediaStorage, subject.storage)


def test_blocks_read_back_the_stored_bytes(subject: Subject) -> None:
    """read_block of every index, in order, is the stored file; read() agrees with it."""
    info = subject.storage.media_info("clip")
    assert (info.name, info.size, info.block_size) == ("clip", len(DATA), BLOCK)
    blocks = [subject.result(subject.storage.read_block("clip", i)) for i in range(info.blocks)]
    assert b"".join(blocks) == DATA
    assert subject.result(subject.storage.read("clip", BlockKey(1))) == blocks[1]


def test_unknown_media_is_a_key_error_or_block_missing(subject: Subject) -> None:
    """media_info of an unknown name raises KeyError; reading from it fails with BlockMissing."""
    with pytest.raises(KeyError):
        subject.storage.media_info("nope")
    with pytest.raises(BlockMissing):
        subject.result(subject.storage.read("nope", BlockKey(0)))
    with pytest.raises(KeyError):
        subject.result(subject.storage.blocks_of_node("nope", subject.nodes[0]))


def test_every_block_has_places_and_exactly_one_node(subject: Subject) -> None:
    """places() is never empty; blocks_of_node over all nodes covers each block once, on the
    node of its first place."""
    storage = subject.storage
    info = storage.media_info("clip")
    owner: dict[int, str] = {}
    for node in subject.nodes:
        for index in subject.result(storage.blocks_of_node("clip", node)):
            assert index not in owner
            owner[index] = node
    assert sorted(owner) == list(range(info.blocks))
    for index in range(info.blocks):
        places = storage.places(info, BlockKey(index))
        assert places and all(isinstance(p, LogicalDisk) for p in places)
        assert places[0].node_id == owner[index]


def test_time_index_and_run_blocking(subject: Subject) -> None:
    """time_index fires with the entry of the name; run_blocking fires with f(*args)."""
    assert subject.result(subject.storage.time_index("clip")).name == "clip"
    assert subject.result(subject.storage.run_blocking(divmod, 17, 5)) == (3, 2)
