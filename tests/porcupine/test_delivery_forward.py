"""Deliveries handed to the user's manager node (``DeliveryProxy.forward``): one call
between nodes per delivery where plan, store and add_fragment were three, none at the
manager itself; a hand-over that never reached the manager is delivered from here, one
that may have is not (SMTP 451), a refusal there is the same SMTP reply here."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cluster_sim import Net, add_user, users_managed_by
from twisted.internet.defer import fail
from twisted.mail import smtp
from twisted.python.failure import Failure

from yimaporc.cluster.rpc import PeerUnavailable
from yimaporc.porcupine.balancer import LoadBalancer
from yimaporc.porcupine.cluster import DlDeliver
from yimaporc.porcupine.usermap import bucket_of


def forwarding_net(tmp_path: Path, n: int = 3) -> Net:
    """``n`` nodes handing deliveries to managers, each with the real load balancer
    (its own load read live, as MailCluster wires it)."""
    net = Net(tmp_path)
    net.forwarding = True
    ids = [f"n{i}" for i in range(1, n + 1)]
    for i in ids:
        node = net.add(i)
        lb = LoadBalancer(i)
        lb.own_load = node.cluster.meter.load
        node.cluster.balancer = node.cluster.meter.balancer = lb
        node.mail.delivery.balancer = lb
    net.commit(ids)
    return net


def smtp_delivery(net: Net, at: str, user: str, body: bytes) -> list[str]:
    """RCPT TO (the profile lookup) then the delivery at ``at``; the storing nodes."""
    proxy = net.nodes[at].mail.delivery
    assert net.result_of(proxy.lookup(user)) is not None
    return [d.node for d in net.result_of(proxy.deliver([user], body))]


def test_delivery_elsewhere_is_one_call_to_the_manager_which_stores_it(tmp_path: Path) -> None:
    """At a node that is not the user's manager: the first delivery also looks the
    profile up and records the manager's node as holder on a majority; every later one
    is exactly one call (porcupine.dl.deliver), stored on the manager's node."""
    net = forwarding_net(tmp_path)
    user = users_managed_by(net, "n3", 1)[0]
    add_user(net, "n1", user)
    assert smtp_delivery(net, "n1", user, b"first\r\n") == ["n3"]
    for i in range(3):
        net.calls.clear()
        assert smtp_delivery(net, "n1", user, b"m%d\r\n" % i) == ["n3"]
        assert dict(net.calls) == {"porcupine.dl.deliver": 1}
    assert net.nodes["n1"].mail.delivery.forwarded == 4


def test_delivery_at_the_manager_makes_no_call(tmp_path: Path) -> None:
    """At the user's manager node the whole delivery is local: stored there, no call."""
    net = forwarding_net(tmp_path)
    user = users_managed_by(net, "n2", 1)[0]
    add_user(net, "n1", user)
    smtp_delivery(net, "n2", user, b"first\r\n")
    net.calls.clear()
    assert smtp_delivery(net, "n2", user, b"second\r\n") == ["n2"]
    assert not net.calls
    assert net.nodes["n2"].mail.delivery.forwarded == 0


def test_eight_nodes_one_call_per_delivery_at_another_node(tmp_path: Path) -> None:
    """8 nodes, 10 users, deliveries at every node in turn (after each user's first):
    exactly one porcupine.dl.deliver per delivery received away from the user's
    manager, none other than RCPT's first profile lookups at a node (the receiving
    node placing mail itself made ~2.8 calls a delivery: plan, store, add_fragment)."""
    net = forwarding_net(tmp_path, 8)
    users = [f"u{k}@example.org" for k in range(10)]
    for u in users:
        add_user(net, "n1", u)
    ids = sorted(net.nodes)
    for k, u in enumerate(users):
        smtp_delivery(net, ids[k % 8], u, b"first\r\n")
    net.calls.clear()
    count = 160
    for k in range(count):
        smtp_delivery(net, ids[k % 8], users[(k * 7) % 10], b"m%d\r\n" % k)
    away = sum(
        1 for k in range(count) if net.map.owners[bucket_of(users[(k * 7) % 10])] != ids[k % 8]
    )
    assert net.calls["porcupine.dl.deliver"] == away
    assert set(net.calls) <= {"porcupine.dl.deliver", "porcupine.um.profile"}, net.calls
    assert net.calls["porcupine.um.profile"] <= 8 * 10 - 10, "RCPT's, cached after the first"


def test_a_hand_over_that_never_reached_the_manager_is_delivered_from_here(
    tmp_path: Path,
) -> None:
    """The call to the manager fails before reaching it (connection refused): the
    receiving node delivers the usual way (plan from the manager, store, records)."""
    net = forwarding_net(tmp_path)
    user = users_managed_by(net, "n3", 1)[0]
    add_user(net, "n1", user)
    net.refuse = {("n3", DlDeliver.commandName)}  # type: ignore[misc]
    assert smtp_delivery(net, "n1", user, b"hello\r\n")
    proxy = net.nodes["n1"].mail.delivery
    assert (proxy.forwarded, proxy.forward_fallbacks) == (1, 1)
    assert net.calls["porcupine.um.plan"] == 1


def test_a_hand_over_that_may_have_reached_the_manager_fails_without_a_second_copy(
    tmp_path: Path,
) -> None:
    """The call timed out after it was sent (``maybe_done``): SMTP 451 (peer
    unavailable), and the message is not stored again from here."""
    net = forwarding_net(tmp_path)
    user = users_managed_by(net, "n3", 1)[0]
    add_user(net, "n1", user)
    proxy = net.nodes["n1"].mail.delivery
    err = PeerUnavailable("timed out")
    err.maybe_done = True
    proxy.forward = lambda *a: fail(err)
    out: list[object] = []
    proxy.deliver([user], b"hello\r\n").addBoth(out.append)
    net.flush()
    (f,) = out
    assert isinstance(f, Failure) and f.check(PeerUnavailable)
    assert proxy.forward_fallbacks == 0
    assert "porcupine.mb.store" not in net.calls and "porcupine.um.plan" not in net.calls


def test_a_refusal_at_the_manager_is_the_same_smtp_reply_here(tmp_path: Path) -> None:
    """The manager's node refuses (no such user there): the receiving node answers the
    same permanent SMTP code, not a local error."""
    net = forwarding_net(tmp_path)
    proxy = net.nodes["n1"].mail.delivery
    out: list[object] = []
    proxy._forward("n3", "nobody@example.org", b"x\r\n", 0.0).addBoth(out.append)
    net.flush()
    (f,) = out
    assert isinstance(f, Failure)
    with pytest.raises(smtp.SMTPServerError) as e:
        f.raiseException()
    assert e.value.code == 550
