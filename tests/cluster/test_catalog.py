"""ReplicatedDocument: updates from any node reach all; newest version wins; newcomers catch up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred

from yimaporc.cluster.catalog import PutRecords, ReplicatedDocument, read_document
from yimaporc.cluster.membership import View
from yimaporc.cluster.wire import Member
from yimaporc.testing.simnet import SimNet, Watched


@attrs.define
class Net:
    """The documents' nodes, each a host (named by its address) of one simulation kernel;
    a PutRecords call is a kernel call, through the command's AMP encoding."""

    sim: SimNet = attrs.field(factory=SimNet)
    nodes: dict[str, FakeNode] = attrs.field(factory=dict)
    #: Addresses cut off (a kernel partition).
    down: set[str] = attrs.field(init=False)
    # When not None, calls wait here until the test delivers them.
    held: list[tuple[str, str, dict[str, Any], Deferred[Any]]] | None = None

    def __attrs_post_init__(self) -> None:
        self.down = Watched(lambda down: self.sim.set_topology(down))

    def put(self, src: str, address: str, kw: dict[str, Any]) -> Deferred[Any]:
        """PutRecords from ``src`` to ``address`` over the kernel."""

        def offer(name: str, body: bytes) -> Deferred[dict[str, int]]:
            doc = self.nodes[address].documents[name]
            return doc.offer(body).addCallback(lambda n: {"accepted": n})

        def lookup(name: bytes) -> Any:
            return PutRecords, offer

        return self.sim.amp_call(src, address, lookup, PutRecords, kw)

    def flush(self) -> None:
        """Carry every call (and its answer) that is due now."""
        self.sim.flush()


@attrs.define
class FakeRpc:
    net: Net
    me: str

    def call(self, address: str, command: Any, **kw: Any) -> Deferred[Any]:
        assert command is PutRecords
        if self.net.held is not None and address not in self.net.down:
            d: Deferred[Any] = Deferred()
            self.net.held.append((self.me, address, kw, d))
            return d
        return self.net.put(self.me, address, kw)


@attrs.define
class FakeNode:
    """What ReplicatedDocument uses of a ClusterNode."""

    node_id: str
    data_dir: Path
    net: Net
    view: View = attrs.field(factory=lambda: View(0, (), ""))
    documents: dict[str, Any] = attrs.field(factory=dict)
    listeners: list[Any] = attrs.field(factory=list)

    @property
    def config(self) -> Any:
        return self

    @property
    def cluster_address(self) -> str:
        return self.node_id + ":1"

    @property
    def rpc(self) -> FakeRpc:
        return FakeRpc(self.net, self.cluster_address)

    def subscribe(self, listener: Any) -> None:
        self.listeners.append(listener)


def cluster(tmp_path: Path, ids: str) -> tuple[Net, list[FakeNode], list[ReplicatedDocument]]:
    net = Net()
    nodes = [FakeNode(i, tmp_path / i, net) for i in ids]
    members = tuple(Member(n.node_id, n.cluster_address) for n in nodes)
    for n in nodes:
        n.view = View(1, members, nodes[0].node_id)
        net.nodes[n.cluster_address] = n
        net.sim.host(n.cluster_address)
    docs = [ReplicatedDocument(n, "catalog", {"media": []}) for n in nodes]  # type: ignore[arg-type]
    return net, nodes, docs


def test_update_anywhere_reaches_everyone(tmp_path: Path) -> None:
    """An update made on any node is held by all, and persisted."""
    net, _, docs = cluster(tmp_path, "abc")
    counts: list[int] = []
    docs[1].update(lambda v: {**v, "media": ["clip"]}).addCallback(counts.append)
    net.flush()
    assert counts == [3]
    assert all(d.value == {"media": ["clip"]} and d.version == (1, "b") for d in docs)
    again = ReplicatedDocument(FakeNode("c", tmp_path / "c", Net()), "catalog", {})  # type: ignore[arg-type]
    assert again.value == {"media": ["clip"]}


def test_older_version_is_refused_and_newcomer_catches_up(tmp_path: Path) -> None:
    """A stale offer is ignored; a node that was down gets the document when it reappears."""
    net, nodes, docs = cluster(tmp_path, "abc")
    net.down.add("c:1")
    counts: list[int] = []
    docs[0].update(lambda v: {"media": ["x"]}).addCallback(counts.append)
    net.flush()
    assert counts == [2] and docs[2].value == {"media": []}
    taken: list[int] = []
    docs[1].offer(b'[["", 0, "z", {"media": ["old"]}]]').addCallback(taken.append)
    assert taken == [0] and docs[1].value == {"media": ["x"]}
    net.down.clear()
    full = nodes[0].view
    docs[0].membership_changed(View(2, full.members[:2], "a"), View(3, full.members, "a"))
    net.flush()
    assert docs[2].value == {"media": ["x"]}


def test_a_member_restarted_since_the_last_view_catches_up(tmp_path: Path) -> None:
    """A member back under a new incarnation before anyone saw it gone gets the records it
    missed (found by the kernel scenario tests/sim/test_catalog_sim.py)."""
    net, nodes, docs = cluster(tmp_path, "abc")
    net.down.add("c:1")
    docs[0].update(lambda v: {"media": ["x"]})
    net.flush()
    assert docs[2].value == {"media": []}
    net.down.clear()
    full = nodes[0].view
    members = tuple(
        attrs.evolve(m, incarnation=m.incarnation + 1) if m.node_id == "c" else m
        for m in full.members
    )
    docs[0].membership_changed(full, View(full.epoch + 1, members, "a"))
    net.flush()
    assert docs[2].value == {"media": ["x"]}


def deliver(net: Net, order: str) -> None:
    """Deliver the held calls in ``order`` (a string of indexes into ``net.held``)."""
    assert net.held is not None
    for i in order:
        src, address, kw, d = net.held[int(i)]
        net.put(src, address, kw).chainDeferred(d)
        net.flush()


@pytest.mark.parametrize("order", ["0123", "2301", "0213", "3120", "1032"])
def test_concurrent_claims_at_most_one_wins(tmp_path: Path, order: str) -> None:
    """Two nodes claim at once (e.g. two `disks add`): whatever the message order, one wins."""
    net, _, docs = cluster(tmp_path, "abc")
    net.held = []
    won: dict[str, bool] = {}

    def claim(doc: ReplicatedDocument, who: str) -> None:
        def record(ok: bool) -> None:
            won[who] = ok

        doc.claim(lambda v: {**v, "pending": v.get("pending") or who}).addCallback(record)

    claim(docs[0], "a")
    claim(docs[1], "b")
    net.flush()
    assert len(net.held) == 4  # each writer offers to the two others
    deliver(net, order)
    assert sorted(won) == ["a", "b"]
    assert list(won.values()).count(True) <= 1, won
    winner = [w for w, ok in won.items() if ok]
    values = {d.value.get("pending") for d in docs}
    if winner:
        assert values == set(winner), (won, values)


def test_uncontested_claim_wins(tmp_path: Path) -> None:
    """Alone, a claim wins and every member holds it."""
    net, _, docs = cluster(tmp_path, "abc")
    won: list[bool] = []
    docs[2].claim(lambda v: {**v, "pending": "c"}).addCallback(won.append)
    net.flush()
    assert won == [True] and all(d.value["pending"] == "c" for d in docs)


@attrs.define
class QueuedRun:
    """A ``run`` that holds blocking work until the test calls :meth:`step`."""

    jobs: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = attrs.field(factory=list)

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((f, args, d))
        return d

    def step(self) -> None:
        f, args, d = self.jobs.pop(0)
        d.callback(f(*args))


def _stored(path: Path) -> Any:
    return json.loads(path.read_text())


def test_writes_run_off_the_caller_and_bursts_are_written_once(tmp_path: Path) -> None:
    """update() writes through ``run`` (not inline), fires only once on disk, and a burst
    of changes during a write is written once, as its last version."""
    run = QueuedRun()
    node = FakeNode("a", tmp_path / "a", Net())
    node.view = View(1, (Member("a", "a:1"),), "a")
    doc = ReplicatedDocument(node, "catalog", {"n": 0}, run=run)  # type: ignore[arg-type]
    fired: list[int] = []
    doc.update(lambda v: {"n": 1}).addCallback(fired.append)
    assert doc.value == {"n": 1} and not doc.path.exists() and fired == []
    for n in (2, 3, 4):
        doc.update(lambda v, n=n: {"n": n}).addCallback(fired.append)
    assert len(run.jobs) == 1  # one write in flight, the burst waits
    run.step()
    assert read_document(tmp_path / "a", "catalog") == {"n": 1} and fired == [1]
    assert len(run.jobs) == 1
    run.step()
    assert _stored(doc.path / "r-.json") == {"counter": 4, "writer": "a", "value": {"n": 4}}
    assert fired == [1, 1, 1, 1] and doc.writes == 2 and not run.jobs


def test_a_member_answers_a_push_only_once_written(tmp_path: Path) -> None:
    """offer() takes a newer record at once but fires (the push's answer) after the write."""
    run = QueuedRun()
    doc = ReplicatedDocument(FakeNode("b", tmp_path / "b", Net()), "catalog", {}, run=run)  # type: ignore[arg-type]
    answers: list[int] = []
    doc.offer(b'[["", 1, "a", {"media": ["x"]}]]').addCallback(answers.append)
    assert doc.value == {"media": ["x"]} and answers == []
    run.step()
    assert answers == [1] and read_document(tmp_path / "b", "catalog") == {"media": ["x"]}
    doc.offer(b'[["", 1, "a", {"media": ["y"]}]]').addCallback(answers.append)
    assert answers == [1, 0] and not run.jobs


def _split(doc: dict[str, Any]) -> dict[str, Any]:
    return {"top": doc["top"], **{"m/" + k: v for k, v in doc["m"].items()}}


def _join(records: dict[str, Any]) -> dict[str, Any]:
    m = {k[2:]: v for k, v in records.items() if k.startswith("m/")}
    return {"top": records.get("top", 0), "m": m}


def record_cluster(tmp_path: Path, ids: str) -> tuple[Net, list[ReplicatedDocument]]:
    net, nodes, _ = cluster(tmp_path, ids)
    docs = [
        ReplicatedDocument(n, "cat", {}, split=_split, join=_join)  # type: ignore[arg-type]
        for n in nodes
    ]
    return net, docs


def test_only_changed_records_travel_and_are_written(tmp_path: Path) -> None:
    """Changing one record pushes and writes that record alone, not the document."""
    net, docs = record_cluster(tmp_path, "ab")
    docs[0].update(lambda v: {"top": 1, "m": {"big": list(range(1000)), "small": 1}})
    net.flush()
    writes = docs[1].writes
    net.held = []
    docs[0].put({"m/small": 2})
    assert len(net.held) == 1
    sent = json.loads(net.held[0][2]["body"])
    assert sent == [["m/small", 2, "a", 2]]
    deliver(net, "0")
    assert docs[1].value == {"top": 1, "m": {"big": list(range(1000)), "small": 2}}
    assert docs[1].writes == writes + 1


def test_concurrent_changes_of_different_records_both_survive(tmp_path: Path) -> None:
    """Two nodes changing different records at once: every node ends with both changes."""
    net, docs = record_cluster(tmp_path, "abc")
    net.held = []
    docs[0].put({"m/x": "from a"})
    docs[1].put({"m/y": "from b"})
    deliver(net, "3210")
    for d in docs:
        assert d.value["m"] == {"x": "from a", "y": "from b"}, d.node.node_id  # type: ignore[attr-defined]


def test_removal_travels_as_a_tombstone_and_newcomers_catch_up(tmp_path: Path) -> None:
    """A removed record is removed everywhere, also on a node that was down meanwhile."""
    net, docs = record_cluster(tmp_path, "abc")
    docs[0].put({"top": 5, "m/x": 1, "m/y": 2})
    net.flush()
    net.down.add("c:1")
    docs[1].update(lambda v: {**v, "m": {"y": 3}})
    net.flush()
    assert docs[0].value == {"top": 5, "m": {"y": 3}}
    assert docs[2].value == {"top": 5, "m": {"x": 1, "y": 2}}
    net.down.clear()
    full = docs[0].node.view  # type: ignore[attr-defined]
    docs[0].membership_changed(View(2, full.members[:2], "a"), View(3, full.members, "a"))
    net.flush()
    assert docs[2].value == {"top": 5, "m": {"y": 3}}
    again = ReplicatedDocument(FakeNode("c", tmp_path / "c", Net()), "cat", {}, split=_split,
                               join=_join)  # type: ignore[arg-type]  # fmt: skip
    assert again.value == {"top": 5, "m": {"y": 3}}


def test_a_single_file_document_is_read_and_rewritten_as_records(tmp_path: Path) -> None:
    """A node upgraded from DATA_DIR/NAME.json keeps its document and version."""
    folder = tmp_path / "a"
    folder.mkdir()
    legacy = {"counter": 7, "writer": "b", "value": {"top": 2, "m": {"x": 1}}}
    (folder / "cat.json").write_text(json.dumps(legacy))
    node = FakeNode("a", folder, Net())
    doc = ReplicatedDocument(node, "cat", {}, split=_split, join=_join)  # type: ignore[arg-type]
    assert doc.value == {"top": 2, "m": {"x": 1}} and doc.version == (7, "b")
    doc.put({"m/y": 2})
    assert not (folder / "cat.json").exists()
    assert read_document(folder, "cat", _join) == {"top": 2, "m": {"x": 1, "y": 2}}
    assert doc.records["m/y"][0] == (1, "a") and doc.records["top"][0] == (7, "b")
