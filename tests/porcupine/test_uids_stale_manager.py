"""A node's user manager is certain only of users whose bucket it manages (sim.mail
seeds 203 and 214 of the 5-node shape: a session kept the manager it found at login,
the map then moved the bucket away, and the old manager's empty soft state listed the
INBOX as empty, UIDNEXT 1)."""

from __future__ import annotations

from pathlib import Path

from test_cluster_sim import add_user, users_managed_by
from test_uids_partition import PartNet


def test_only_the_manager_of_a_users_bucket_answers_certain(tmp_path: Path) -> None:
    """With every hint in and a majority, the bucket's manager is certain of the user's
    holders; the other members, which keep no soft state for that bucket, are not (a
    reader that asks them is refused instead of shown an empty mailbox)."""
    net = PartNet(tmp_path)
    for n in ("n1", "n2", "n3"):
        net.add(n)
    net.commit(["n1", "n2", "n3"])
    net.start()
    user = users_managed_by(net, "n3", 1)[0]
    add_user(net, "n1", user)
    net.run(0.5)
    managers = {n: net.nodes[n].cluster.user_manager for n in ("n1", "n2", "n3")}
    assert managers["n3"].certain(user)
    assert not managers["n1"].certain(user)
    assert not managers["n2"].certain(user)
    # the map moves the bucket when its manager leaves: the new manager becomes certain
    # once it settles, the remaining member is not
    net.commit(["n1", "n2"], on=["n1", "n2"])
    net.run(4.0)
    now_managing = [n for n in ("n1", "n2") if managers[n].core.state.manages(user)]
    assert len(now_managing) == 1
    assert managers[now_managing[0]].certain(user)
    other = "n2" if now_managing == ["n1"] else "n1"
    assert not managers[other].certain(user)
    net.stop()
