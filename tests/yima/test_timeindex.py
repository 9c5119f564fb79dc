"""The time index out of the replicated catalog: stored per file, fetched, verified, migrated."""

from __future__ import annotations

import io
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from yimaporc.cluster.catalog import read_document
from yimaporc.cluster.node import ClusterNode, NodeConfig
from yimaporc.yima.media import MediaInfo, index_digest, pack_index, unpack_index
from yimaporc.yima.media.sample import make_sample_wav
from yimaporc.yima.service import YimaStorageService, join_catalog
from yimaporc.yima.store import BlockMissing, SynchronousThreadPool
from yimaporc.yima.timeindex import TimeIndexes


class _Reactor(MemoryReactorClock):
    def callFromThread(self, f: Callable[..., object], *args: Any, **kw: Any) -> None:
        f(*args, **kw)


def _result(reactor: _Reactor, d: Deferred[Any]) -> Any:
    for _ in range(1000):
        if d.called:
            break
        reactor.advance(0.01)
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "deferred never fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


TIMES = tuple(i * 40_000 + (i % 3) for i in range(500))


def _info(times: tuple[int, ...] = TIMES) -> MediaInfo:
    return MediaInfo("film", "mpeg-ts", 1316 * len(times), 1316, 5, streamable=True,
                     duration=len(times) * 0.04, block_times=times)  # fmt: skip


def _service(tmp_path: Path) -> tuple[_Reactor, YimaStorageService]:
    reactor = _Reactor()
    config = NodeConfig("y1", "yima", tmp_path / "data", "127.0.0.1", 1)
    node = ClusterNode(reactor, config, b"s" * 32, rng=random.Random(7))
    disks = [(tmp_path / f"d{i}", None) for i in range(3)]
    service = YimaStorageService(node, reactor, SynchronousThreadPool(), disks)
    service.startService()
    return reactor, service


def test_pack_round_trip_and_digest() -> None:
    """A packed index unpacks to the same times; the digest names it and changes with it."""
    assert unpack_index(pack_index(TIMES)) == TIMES
    assert len(pack_index(TIMES)) == 8 * len(TIMES)
    assert index_digest(TIMES) != index_digest((*TIMES[:-1], TIMES[-1] + 1))
    assert index_digest(()) == ""
    with pytest.raises(ValueError):
        unpack_index(b"\x00" * 9)


def test_record_names_the_index_by_digest_and_attaching_checks_it() -> None:
    """The catalog record has no block_times, only the digest; a wrong index is refused."""
    info = _info()
    record = info.to_record()
    assert "block_times" not in record and record["index_digest"] == index_digest(TIMES)
    assert len(json.dumps(record)) < 1000 < len(json.dumps(info.to_json()))
    bare = MediaInfo.from_json(record)
    assert bare == info.bare() and bare.block_times == ()
    assert bare.with_index(TIMES) == info.bare().with_index(TIMES)
    with pytest.raises(ValueError, match="does not match"):
        bare.with_index(TIMES[:-1])


def test_missing_index_is_fetched_from_a_peer_verified_and_kept(tmp_path: Path) -> None:
    """A node without the file asks a peer, checks the digest, writes it and caches it;
    a peer answering a wrong index is not believed."""
    full = _info()
    peer = TimeIndexes(tmp_path / "peer", maybeDeferred, lambda n, d: fail(BlockMissing(n)))
    bare = _result(_Reactor(), peer.store(full))
    asked: list[tuple[str, str]] = []

    def fetch(name: str, digest: str) -> Deferred[bytes]:
        asked.append((name, digest))
        return peer.raw(name, digest)

    here = TimeIndexes(tmp_path / "here", maybeDeferred, fetch)
    assert here.cached(bare) is None
    got = _result(_Reactor(), here.load(bare))
    assert got.block_times == TIMES and asked == [("film", bare.index_digest)]
    assert here.fetched == 1 and here.cached(bare) is got
    # Written beside the data: a fresh instance (a restart) reads it without asking.
    again = TimeIndexes(tmp_path / "here", maybeDeferred, fetch)
    assert _result(_Reactor(), again.load(bare)).block_times == TIMES and len(asked) == 1
    liar = TimeIndexes(tmp_path / "liar", maybeDeferred,
                       lambda n, d: succeed(pack_index(TIMES[:-1])))  # fmt: skip
    with pytest.raises(ValueError, match="does not match"):
        _result(_Reactor(), liar.load(bare))
    assert not list((tmp_path / "liar").glob("*.idx"))


def test_a_damaged_local_copy_is_replaced_from_a_peer(tmp_path: Path) -> None:
    """A local index file that does not match its digest is ignored and fetched again."""
    full = _info()
    peer = TimeIndexes(tmp_path / "peer", maybeDeferred, lambda n, d: fail(BlockMissing(n)))
    bare = _result(_Reactor(), peer.store(full))
    here = TimeIndexes(tmp_path / "here", maybeDeferred, peer.raw)
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / f"film.{bare.index_digest}.idx").write_bytes(pack_index(TIMES[1:]))
    assert _result(_Reactor(), here.load(bare)).block_times == TIMES
    assert here.fetched == 1


def test_ingest_stores_the_index_beside_the_data_not_in_the_catalog(tmp_path: Path) -> None:
    """After an ingest the replicated record holds the digest, the index is one file, and
    a restarted node has it back (loaded off the reactor) with the same times."""
    reactor, service = _service(tmp_path)
    wav = make_sample_wav(tmp_path / "s.wav", seconds=2.0).read_bytes()
    _result(reactor, service.ingest(io.BytesIO(wav), "tone", block_size=8_000))
    full = service.media_info("tone")
    assert len(full.block_times) == full.blocks > 10
    doc = read_document(tmp_path / "data", "yima-storage", join_catalog)
    record = doc["media"]["tone"]
    assert "block_times" not in record and record["index_digest"] == full.digest()
    files = list((tmp_path / "data" / "time-index").glob("tone.*.idx"))
    assert [f.name for f in files] == [f"tone.{full.digest()}.idx"]
    service.stopService()
    reactor2, again = _service(tmp_path)
    assert _result(reactor2, again.time_index("tone")).block_times == full.block_times
    assert again.media_info("tone").block_times == full.block_times


def test_a_record_that_still_carries_the_index_is_migrated(tmp_path: Path) -> None:
    """An old catalog (block_times in the record, no digest) loads; the index moves to its
    file and the record is rewritten with the digest only."""
    reactor, service = _service(tmp_path)
    wav = make_sample_wav(tmp_path / "s.wav", seconds=2.0).read_bytes()
    _result(reactor, service.ingest(io.BytesIO(wav), "tone", block_size=8_000))
    full = service.media_info("tone")
    service.stopService()
    # Make it look like a catalog written before this change.
    shutil.rmtree(tmp_path / "data" / "time-index")
    path = tmp_path / "data" / "yima-storage.d" / "r-media%2Ftone.json"
    raw: dict[str, Any] = json.loads(path.read_text())
    del raw["value"]["index_digest"]
    raw["value"]["block_times"] = list(full.block_times)
    path.write_text(json.dumps(raw))
    reactor2, again = _service(tmp_path)
    reactor2.advance(0.1)
    assert again.media_info("tone").block_times == full.block_times
    record = read_document(tmp_path / "data", "yima-storage", join_catalog)["media"]["tone"]
    assert "block_times" not in record and record["index_digest"] == full.digest()
    assert again.doc.record("media/tone")["index_digest"] == full.digest()
    assert (tmp_path / "data" / "time-index" / f"tone.{full.digest()}.idx").exists()


def test_removed_media_lose_their_index_file(tmp_path: Path) -> None:
    """Deleting a file from the catalog deletes its time index file too."""
    reactor, service = _service(tmp_path)
    wav = make_sample_wav(tmp_path / "s.wav", seconds=1.0).read_bytes()
    _result(reactor, service.ingest(io.BytesIO(wav), "tone", block_size=8_000))
    assert list((tmp_path / "data" / "time-index").glob("tone.*.idx"))
    _result(reactor, service.doc.put({"media/tone": None}))
    assert not list((tmp_path / "data" / "time-index").glob("tone.*.idx"))
