"""BucketMapService: the coordinator's map rides in the commit; members install it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from yimaporc.cluster.bucketservice import BucketMapService, unpack_commit
from yimaporc.cluster.membership import View
from yimaporc.cluster.statefile import StateFile
from yimaporc.cluster.wire import Member
from yimaporc.testing.pools import CallsNow, ImmediatePool


@attrs.define
class FakeNode:
    """Just what BucketMapService uses of a ClusterNode."""

    data_dir: Path
    provider: Any = None
    listeners: list[Any] = attrs.field(factory=list)

    @property
    def config(self) -> Any:
        return self

    def set_commit_attachment(self, provider: Any) -> None:
        self.provider = provider

    def subscribe(self, listener: Any) -> None:
        self.listeners.append(listener)

    def state_file_for(self, name: str, path: Path, *, durable: bool) -> StateFile:
        return StateFile(CallsNow(), ImmediatePool(), path, durable=durable)


def members(*ids: str) -> tuple[Member, ...]:
    return tuple(Member(i, f"10.0.0.{n}:1", 1) for n, i in enumerate(ids, 1))


def test_commit_map_installed_everywhere_and_fresh_buckets_reported(tmp_path: Path) -> None:
    """The coordinator's computed map is what every member installs; fresh sets are exact."""
    nodes = [FakeNode(tmp_path / x) for x in "abc"]
    services = [BucketMapService(n, 64) for n in nodes]  # type: ignore[arg-type]
    seen: list[set[int]] = []
    services[1].subscribe(lambda old, new, fresh: seen.append(fresh))
    ms = members("a", "b", "c")
    attachment = nodes[0].provider(View(1, ms[:1], "a"), ms, 5)
    view = View(5, ms, "a", attachment)
    for s in services:
        s.membership_changed(View(1, ms[:1], "a"), view)
    assert len({s.map for s in services}) == 1
    assert services[0].map.counts() == {"a": 22, "b": 21, "c": 21}
    assert seen == [set(range(64))]
    # c fails: only c's buckets are fresh.
    ms2 = members("a", "b")
    att2 = nodes[1].provider(view, ms2, 9)
    services[1].membership_changed(view, View(9, ms2, "b", att2))
    assert seen[-1] == set(unpack_commit(attachment)[1].buckets_of("c"))
    assert services[1].status() == {"buckets": {"a": 32, "b": 32}}


def test_map_survives_restart_from_data_dir(tmp_path: Path) -> None:
    """A restarted node starts from its cached map, so its next commit moves little."""
    node = FakeNode(tmp_path)
    s = BucketMapService(node, 64)  # type: ignore[arg-type]
    ms = members("a", "b")
    s.membership_changed(View(0, (), ""), View(3, ms, "a", node.provider(View(0, (), ""), ms, 3)))
    again = BucketMapService(FakeNode(tmp_path), 64)  # type: ignore[arg-type]
    assert again.map == s.map


def test_owners_lists_every_buckets_manager(tmp_path: Path) -> None:
    """GET /api/buckets's handler gives the owner of each bucket, in bucket order, as the
    installed map has them."""
    node = FakeNode(tmp_path / "a")
    service = BucketMapService(node, 8)  # type: ignore[arg-type]
    ms = members("a", "b")
    attachment = node.provider(View(1, ms[:1], "a"), ms, 2)
    service.membership_changed(View(1, ms[:1], "a"), View(2, ms, "a", attachment))
    owners = service.owners({}, {})["owners"]
    assert owners == list(service.map.owners) and sorted(set(owners)) == ["a", "b"]  # type: ignore[arg-type]
    assert [service.owner(b) for b in range(8)] == owners
