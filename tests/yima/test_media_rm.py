"""``POST /api/yima/media/delete`` (``yimaporc media rm``) on a one-node storage service."""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from yimaporc.admin.routes import ApiError
from yimaporc.cluster.node import ClusterNode, NodeConfig
from yimaporc.yima.storage import Phase, YimaStorageService
from yimaporc.yima.store import SynchronousThreadPool


class _Reactor(MemoryReactorClock):
    def callFromThread(self, f: Callable[..., object], *args: Any, **kw: Any) -> None:
        f(*args, **kw)


def _make(tmp_path: Path) -> tuple[_Reactor, YimaStorageService]:
    reactor = _Reactor()
    config = NodeConfig("y1", "yima", tmp_path / "data", "127.0.0.1", 1)
    node = ClusterNode(reactor, config, b"s" * 32, rng=random.Random(7))
    disks = [(tmp_path / f"d{i}", None) for i in range(4)]
    service = YimaStorageService(node, reactor, SynchronousThreadPool(), disks)
    service.startService()
    return reactor, service


def _result(reactor: _Reactor, d: Deferred[Any]) -> Any:
    for _ in range(10_000):
        if d.called:
            break
        reactor.advance(0.01)
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "deferred never fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def _rm(reactor: _Reactor, service: YimaStorageService, name: str) -> Any:
    route = next(r for r in service.node.routes if r.path == "/api/yima/media/delete")
    return _result(reactor, maybeDeferred(route.handler, {"name": name}, {}))


def _block_files(tmp_path: Path, name: str) -> int:
    return sum(
        1 for i in range(4) for _ in (tmp_path / f"d{i}" / "media" / name).glob("*.[bp][la][kr]")
    )


def test_rm_deletes_every_block_and_the_catalog_entry(tmp_path: Path) -> None:
    """media rm removes the title from the catalog and its data and parity blocks from all
    disks; the same name can be ingested again afterwards."""
    reactor, service = _make(tmp_path)
    blob = os.urandom(100_000)
    _result(reactor, service.ingest(io.BytesIO(blob), "blob", block_size=4096, opaque=True))
    keep = os.urandom(50_000)
    _result(reactor, service.ingest(io.BytesIO(keep), "keep", block_size=4096, opaque=True))
    on_disk = _block_files(tmp_path, "blob")
    placed = sum(d["blocks"] for d in service.status()["disks"])
    assert on_disk > 25
    out = _rm(reactor, service, "blob")
    assert out == {"name": "blob", "blocks_deleted": on_disk, "blocks_not_reached": 0}
    assert _block_files(tmp_path, "blob") == 0
    status = service.status()
    assert [m["name"] for m in status["media"]] == ["keep"]
    assert sum(d["blocks"] for d in status["disks"]) == placed - on_disk
    info = service.media_info("keep")
    got = b"".join(_result(reactor, service.read_block("keep", i)) for i in range(info.blocks))
    assert got == keep
    again = os.urandom(30_000)
    _result(reactor, service.ingest(io.BytesIO(again), "blob", block_size=4096, opaque=True))
    info = service.media_info("blob")
    got = b"".join(_result(reactor, service.read_block("blob", i)) for i in range(info.blocks))
    assert got == again


def test_rm_is_not_undone_by_the_node_that_published_it(tmp_path: Path) -> None:
    """The ingesting node re-publishes titles a racing catalog update lost, but not one
    removed by media rm (a tombstone with its seed keeps it out)."""
    reactor, service = _make(tmp_path)
    _result(reactor, service.ingest(io.BytesIO(os.urandom(20_000)), "x", 4096, opaque=True))
    entry = service.catalog.media["x"].to_json()
    _rm(reactor, service, "x")
    service._published["x"] = entry  # as the node that ingested it still remembers it
    service._reconcile()
    reactor.advance(1)
    assert "x" not in service.catalog.media
    # a lost publication of another title (or of x ingested anew) still comes back
    service._published["x"] = {**entry, "seed": entry["seed"] + 1}
    service._reconcile()
    reactor.advance(1)
    assert service.catalog.media["x"].seed == entry["seed"] + 1


def test_rm_refuses_unknown_names_and_reorganisations(tmp_path: Path) -> None:
    """Unknown title: 404; while disks are reorganised: 409 and nothing deleted."""
    reactor, service = _make(tmp_path)
    _result(reactor, service.ingest(io.BytesIO(os.urandom(20_000)), "x", 4096, opaque=True))
    with pytest.raises(ApiError, match="no media named nope") as e:
        _rm(reactor, service, "nope")
    assert e.value.status == 404
    with pytest.raises(ApiError, match="give the media name"):
        _rm(reactor, service, "")
    service.reorganiser.enter(Phase.CLAIMING)  # this node coordinates a disks add/remove
    with pytest.raises(ApiError, match="reorganisation") as e:
        _rm(reactor, service, "x")
    assert e.value.status == 409
    assert "x" in service.catalog.media and _block_files(tmp_path, "x") > 0
