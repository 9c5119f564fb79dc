"""No 250 before the holder record is durable on a majority (issue 14, chaos bug 4:
mail hidden, then shown below): a delivery whose holder record failed answers a
temporary error, and the next delivery to that node records it, even though the
manager's soft fragment list names the node already."""

from __future__ import annotations

from pathlib import Path

import pytest
from mailtest_helpers import ImmediateReactor, SyncPool, result_of
from test_cluster_sim import Net, add_user, users_managed_by
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from yimaporc.cluster.buckets import BucketMap
from yimaporc.cluster.rpc import PeerUnavailable
from yimaporc.porcupine.cluster import ClusterUserManager, HolderNotRecorded, UidHolders
from yimaporc.porcupine.profiledb import ProfileDB
from yimaporc.porcupine.usermap import N_BUCKETS, bucket_of

USER = "ulla@example.org"
B = bucket_of(USER)


def holders_on_majority(net: Net, user: str, node: str) -> int:
    """How many nodes recorded ``node`` as a holder of ``user``'s mail."""
    pair = [user, node]
    return sum(
        pair in n.mail.fragment_store.bucket_holders(bucket_of(user)) for n in net.nodes.values()
    )


def test_failed_holder_record_fails_the_delivery_and_the_next_one_records_it(
    tmp_path: Path,
) -> None:
    """Holder records refused by the other nodes: no 250 (PeerUnavailable, one retry);
    once they answer, the next delivery records the holder on a majority although the
    fragment list already names it."""
    net = Net(tmp_path)
    for i in (1, 2, 3):
        net.add(f"n{i}")
    net.commit(["n1", "n2", "n3"])
    user = users_managed_by(net, "n3", 1)[0]
    add_user(net, "n1", user)
    for n in ("n1", "n2"):
        net.refuse.add((n, UidHolders.commandName))
    with pytest.raises(PeerUnavailable):
        net.nodes["n2"].deliver(user, b"first\r\n")
    assert net.nodes["n2"].mail.delivery.holder_retries == 1
    holder = net.nodes["n3"].cluster.user_manager.state.fragment_list(user)
    assert holder, "the store happened; the soft list names its node"
    net.refuse.clear()
    [dig] = net.nodes["n2"].deliver(user, b"second\r\n")
    assert dig.node in holder
    assert holders_on_majority(net, user, dig.node) >= 2


def test_second_record_of_one_holder_waits_for_the_running_write(tmp_path: Path) -> None:
    """While a holder record is being written, another add_fragment for the same
    holder does not fire at once; both fail when no majority recorded it."""
    clock = ImmediateReactor()
    profiles = ProfileDB(clock, SyncPool(), tmp_path / "p.sqlite", clock.seconds)  # type: ignore[arg-type]
    um = ClusterUserManager("n1", profiles, clock)
    um.known = {"n1", "n2", "n3"}
    um.install(BucketMap(("n1",) * N_BUCKETS, (2,) * N_BUCKETS), ["n1", "n2", "n3"])
    for n in ("n1", "n2", "n3"):
        um.apply(n, [B, 2, [], [], 1, []])
    assert um.may_number(USER)
    writes: list[tuple[str, Deferred[bool]]] = []

    def holders_on(node: str, bucket: int, fence: str, holders: list[list[str]]) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        writes.append((node, d))
        return d

    um.holders_on = holders_on
    first = um.add_fragment(USER, "n2")
    second = um.add_fragment(USER, "n2")
    got: list[object] = []
    for d in (first, second):
        d.addBoth(got.append)
    assert got == [], "no answer before the majority write ends"
    while any(not d.called for _, d in writes):
        for _, d in list(writes):
            if not d.called:
                d.callback(False)
    assert len(got) == 2
    assert all(isinstance(f, Failure) and f.check(HolderNotRecorded) for f in got)
    writes.clear()
    third = um.add_fragment(USER, "n2")
    for _, d in list(writes):
        d.callback(True)
    assert result_of(third) is None
    writes.clear()
    assert result_of(um.add_fragment(USER, "n2")) is None and writes == []
