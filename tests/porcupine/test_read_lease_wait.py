"""A manager whose read lease lapsed only because its renewal is slow (a loaded node)
makes a read wait for the next renewal instead of refusing it; a manager that cannot
renew (cut off) still refuses, after the wait (``ClusterUserManager.read_wait``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_uids_partition import PartNet
from twisted.python.failure import Failure

from yimaporc.porcupine.cluster import ReadLease
from yimaporc.porcupine.reconstruct import NODE_READ_LEASE, READ_WAIT
from yimaporc.porcupine.values import INBOX, MailUnavailable


def started(tmp_path: Path) -> tuple[PartNet, str]:
    """Three started nodes, a user managed by n3 with one message; n3 waits for renewals."""
    net, user = PartNet.with_user(tmp_path, ["n1", "n2", "n3"], "n3")
    net.run(0.5)
    net.nodes["n1"].deliver(user, b"hello\r\n")
    net.nodes["n3"].cluster.user_manager.read_wait = READ_WAIT
    return net, user


def listing(net: PartNet, at: str, user: str) -> list[Any]:
    """A complete INBOX listing started at ``at`` (its outcome lands in the list), and
    what is due now run."""
    out: list[Any] = []
    mail = net.nodes[at].mail.retrieval.open(user)
    mail.digests(INBOX, complete=True).addBoth(out.append)
    net.flush()
    return out


def test_read_waits_for_a_slow_renewal_then_lists(tmp_path: Path) -> None:
    """Renewals held back past the lease: a read at the manager waits (nothing answered,
    nothing refused) and lists the mailbox, complete, once a renewal gets through."""
    net, user = started(tmp_path)
    um = net.nodes["n3"].cluster.user_manager
    net.hold.add(ReadLease.commandName)
    net.run(NODE_READ_LEASE)
    assert not um.certain(user), "the lease lapsed"
    out = listing(net, "n3", user)
    assert out == [] and um.read_waits == 1, "waits for the renewal"
    net.hold.clear()
    net.release()
    net.run(0.25)
    assert len(out) == 1 and not isinstance(out[0], Failure), out
    assert [d.uid for d in out[0]] == [1]
    assert um.read_wait_lapsed == 0
    net.stop()


def test_read_at_a_cut_off_manager_is_refused_after_the_wait(tmp_path: Path) -> None:
    """Renewals fail (n3 cut off, its view unchanged): the read waits READ_WAIT, then is
    refused as out of reach, counted as lapsed."""
    net, user = started(tmp_path)
    um = net.nodes["n3"].cluster.user_manager
    net.sides = [{"n3"}]
    net.run(NODE_READ_LEASE)
    out = listing(net, "n3", user)
    net.run(READ_WAIT - 0.5)
    assert out == [], "still waiting"
    net.run(0.75)
    assert len(out) == 1 and isinstance(out[0], Failure)
    with pytest.raises(MailUnavailable):
        out[0].raiseException()
    assert (um.read_waits, um.read_wait_lapsed) == (1, 1)
    net.sides = []
    net.stop()


def test_a_lagging_reactor_keeps_its_read_lease_through_the_pause_grace(tmp_path: Path) -> None:
    """A tick 0.6 s late (a loaded reactor looks paused): no numbering for the pause
    grace, as before, but the read lease is still renewed by majority rounds, so reads
    stay certain instead of being refused for those 5 s."""
    net, user = started(tmp_path)
    cluster = net.nodes["n3"].cluster
    loop = cluster._lease_loop
    assert loop is not None
    loop.stop()
    net.run(0.75)
    loop.start(cluster.lease / 4, now=True)
    assert cluster.pauses == 1 and not cluster.lease_ok()
    net.run(NODE_READ_LEASE + 1.0)
    assert not cluster.lease_ok(), "still in the pause grace"
    assert cluster.user_manager.certain(user)
    out = listing(net, "n3", user)
    assert len(out) == 1 and not isinstance(out[0], Failure)
    net.stop()
